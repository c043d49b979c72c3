// codellm for VS Code: starts codellm-serve for shell scripts; VS Code shows its inline completions
// as ghost text (Tab accepts).
"use strict";
const vscode = require("vscode");
const { LanguageClient } = require("vscode-languageclient/node");
const { initializationOptions, serverCommand } = require("./options");

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
      synchronize: { configurationSection: "codellm" },
    },
  );
  await client.start();
}

async function activate(context) {
  context.subscriptions.push(
    vscode.workspace.onDidChangeConfiguration(async (event) => {
      // settings the server reads at start-up need a restart; the rest arrive as didChangeConfiguration
      if (event.affectsConfiguration("codellm.serverCommand") || event.affectsConfiguration("codellm.serverArgs")) {
        if (client) await client.stop();
        await start();
      }
    }),
    vscode.commands.registerCommand("codellm.restart", async () => {
      if (client) await client.stop();
      await start();
    }),
  );
  await start();
}

async function deactivate() {
  if (client) await client.stop();
}

module.exports = { activate, deactivate };
