// codellm for VS Code: starts codellm-serve for shell scripts; VS Code shows its inline completions
// as ghost text (Tab accepts).
"use strict";
const vscode = require("vscode");
const { LanguageClient } = require("vscode-languageclient/node");
const { initializationOptions, serverCommand, RESTART_SETTINGS } = require("./options");

let client;

async function start() {
  const config = vscode.workspace.getConfiguration("codellm");
  const { command, args } = serverCommand(config);
  client = new LanguageClient(
    "codellm",
    "codellm",
    { command, args },
    {
      documentSelector: [{ language: "shellscript" }],
      initializationOptions: initializationOptions(config),
    },
  );
  await client.start();
}

async function restart() {
  if (client) await client.stop();
  await start();
}

async function activate(context) {
  context.subscriptions.push(
    vscode.workspace.onDidChangeConfiguration(async (event) => {
      if (!event.affectsConfiguration("codellm")) return;
      if (RESTART_SETTINGS.some((name) => event.affectsConfiguration(`codellm.${name}`))) {
        await restart();
      } else if (client && client.isRunning()) {
        // the server's own names and values, as at start-up (an empty model path stays unset)
        const settings = initializationOptions(vscode.workspace.getConfiguration("codellm"));
        await client.sendNotification("workspace/didChangeConfiguration", { settings: { codellm: settings } });
      }
    }),
    vscode.commands.registerCommand("codellm.restart", restart),
  );
  await start();
}

async function deactivate() {
  if (client) await client.stop();
}

module.exports = { activate, deactivate };
