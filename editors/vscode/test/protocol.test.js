// Speaks to codellm-serve over stdio with vscode-jsonrpc, sending the extension's own initialization
// options, and gets an inline completion, as VS Code would.
"use strict";
const test = require("node:test");
const assert = require("node:assert");
const { spawn } = require("node:child_process");
const rpc = require("vscode-jsonrpc/node");
const { initializationOptions, serverCommand } = require("../options");

// settings as a user would write them in settings.json
function settings(values) {
  return { get: (key, fallback) => (key in values ? values[key] : fallback) };
}

test("inline completion through the extension's options", { timeout: 120000 }, async () => {
  const bundle = process.env.CODELLM_TEST_BUNDLE;
  assert.ok(bundle, "CODELLM_TEST_BUNDLE must name a model bundle");
  const config = settings({
    serverCommand: process.env.CODELLM_TEST_PYTHON || "python3",
    serverArgs: ["-m", "codellm.server.cli"],
    modelPath: bundle,
    multiline: "never",
    minConfidence: 0,  // a test model is unsure of everything: show what it has
    cutConfidence: 0,
  });
  const { command, args } = serverCommand(config);
  const server = spawn(command, args, { stdio: ["pipe", "pipe", "inherit"] });
  const connection = rpc.createMessageConnection(
    new rpc.StreamMessageReader(server.stdout), new rpc.StreamMessageWriter(server.stdin));
  const messages = [];
  connection.onNotification("window/showMessage", (p) => messages.push(p.message));
  connection.listen();
  try {
    const init = await connection.sendRequest("initialize", {
      processId: process.pid, rootUri: null,
      capabilities: { textDocument: { inlineCompletion: {}, completion: {} } },
      initializationOptions: initializationOptions(config),
    });
    assert.ok(init.capabilities.inlineCompletionProvider, "inline completion is advertised");
    assert.strictEqual(init.capabilities.completionProvider, undefined, "no popup items for an inline client");
    await connection.sendNotification("initialized", {});
    const uri = "file:///tmp/vscode/deploy.sh";
    const text = "#!/bin/bash\nfor host in web1 web2; do\n    ssh \"$host\" sudo systemctl rest";
    await connection.sendNotification("textDocument/didOpen", {
      textDocument: { uri, languageId: "shellscript", version: 1, text } });
    const lines = text.split("\n");
    const position = { line: lines.length - 1, character: lines[lines.length - 1].length };
    const result = await connection.sendRequest("textDocument/inlineCompletion", {
      textDocument: { uri }, position, context: { triggerKind: 1 } });
    assert.ok(Array.isArray(result.items));
    assert.ok(result.items.length >= 1, "a suggestion came back");
    for (const item of result.items) {
      assert.strictEqual(typeof item.insertText, "string");
      assert.ok(!item.insertText.includes("\n"), "multiline: never gives one line");
      assert.deepStrictEqual(item.range, { start: position, end: position });
    }
    const status = await connection.sendRequest("codellm/status", null);
    assert.strictEqual(status.model, require("node:path").resolve(bundle));
    assert.strictEqual(status.settings.multiline, "never");
    assert.strictEqual(status.settings.min_confidence, 0);
    await connection.sendRequest("shutdown", null);
    await connection.sendNotification("exit", null);
  } finally {
    connection.dispose();
    server.kill();
  }
});
