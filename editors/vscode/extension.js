// codellm for VS Code: starts codellm-serve for shell scripts; VS Code shows its inline completions
// as ghost text (Tab accepts).
"use strict";
const vscode = require("vscode");
const { LanguageClient } = require("vscode-languageclient/node");
const { initializationOptions, serverCommand, RESTART_SETTINGS } = require("./options");

let client;

// The cursor at rest somewhere new (a click, a jump, a file opened) is told to the server, which reads
// the prompt there before the first keystroke (codellm/cursor; with prefetch off it reads nothing). Not
// after typing: the server reads the cursor from the edit itself. 150 ms: most of the time a hand takes
// from the mouse to the keys (0.4 s) is left for the read, and a held arrow key sends one notification.
const CURSOR_REST_MS = 150;
const TYPING_MS = 100; // a selection change this soon after an edit of its document is the typing's
let restTimer;
let lastEdit = { uri: "", at: 0 };

function cursorMoved(editor) {
  clearTimeout(restTimer);
  const doc = editor.document;
  const typed = lastEdit.uri === doc.uri.toString() && Date.now() - lastEdit.at < TYPING_MS;
  if (typed || doc.languageId !== "shellscript" || !editor.selection.isEmpty) return;
  restTimer = setTimeout(() => {
    if (!client || !client.isRunning() || vscode.window.activeTextEditor !== editor) return;
    const { line, character } = editor.selection.active;
    client.sendNotification("codellm/cursor", {
      textDocument: { uri: client.code2ProtocolConverter.asUri(doc.uri) },
      position: { line, character },
    });
  }, CURSOR_REST_MS);
}

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
  // the file whose opening started the server was opened before it ran
  if (vscode.window.activeTextEditor) cursorMoved(vscode.window.activeTextEditor);
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
    vscode.workspace.onDidChangeTextDocument((event) => {
      if (event.contentChanges.length === 0) return;
      lastEdit = { uri: event.document.uri.toString(), at: Date.now() };
      clearTimeout(restTimer);
    }),
    vscode.window.onDidChangeTextEditorSelection((event) => cursorMoved(event.textEditor)),
    vscode.window.onDidChangeActiveTextEditor((editor) => editor && cursorMoved(editor)),
    { dispose: () => clearTimeout(restTimer) },
  );
  await start();
}

async function deactivate() {
  if (client) await client.stop();
}

module.exports = { activate, deactivate };
