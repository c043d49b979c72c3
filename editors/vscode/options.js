// What the extension sends to codellm-serve, from its settings: the initialization options, and the
// same object again as `workspace/didChangeConfiguration` when a setting changes. Kept free of the
// `vscode` module so that tests can use exactly what the extension sends.
"use strict";

// settings the server reads only when it starts: changing one restarts it
const RESTART_SETTINGS = ["serverCommand", "serverArgs", "completionItems"];

function integerOrNull(value) {
  return Number.isInteger(value) ? value : null;
}

function numberOrNull(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

function initializationOptions(config) {
  const device = config.get("device", "auto");
  return {
    modelPath: config.get("modelPath", "") || null,
    device: device === "auto" ? null : device,
    threads: integerOrNull(config.get("threads", null)),
    multiline: config.get("multiline", "auto"),
    maxTokens: integerOrNull(config.get("maxTokens", null)),
    multilineMs: config.get("multilineMs", 40),
    lineMs: config.get("lineMs", 25),
    timeoutMs: config.get("timeoutMs", 2000),
    completionItems: config.get("completionItems", "auto"),
    minConfidence: numberOrNull(config.get("minConfidence", null)),
    cutConfidence: numberOrNull(config.get("cutConfidence", null)),
    fileContext: config.get("fileContext", true) !== false,
    prefetch: config.get("prefetch", "auto"),
  };
}

function serverCommand(config) {
  return { command: config.get("serverCommand", "codellm-serve"), args: config.get("serverArgs", []) };
}

module.exports = { initializationOptions, serverCommand, RESTART_SETTINGS };
