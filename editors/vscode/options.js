// Initialization options sent to codellm-serve, from the extension's settings. Kept free of the
// `vscode` module so that tests can use exactly what the extension sends.
"use strict";

function initializationOptions(config) {
  const device = config.get("device", "auto");
  const maxTokens = config.get("maxTokens", null);
  const minConfidence = config.get("minConfidence", null);
  const cutConfidence = config.get("cutConfidence", null);
  return {
    modelPath: config.get("modelPath", "") || null,
    device: device === "auto" ? null : device,
    multiline: config.get("multiline", "auto"),
    maxTokens: typeof maxTokens === "number" ? maxTokens : null,
    minConfidence: typeof minConfidence === "number" ? minConfidence : null,
    cutConfidence: typeof cutConfidence === "number" ? cutConfidence : null,
  };
}

function serverCommand(config) {
  return { command: config.get("serverCommand", "codellm-serve"), args: config.get("serverArgs", []) };
}

module.exports = { initializationOptions, serverCommand };
