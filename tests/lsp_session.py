"""A real LSP client (pygls) driving `codellm-serve` over stdio, with a timeout on every call."""
from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path
from typing import Awaitable, Callable

from lsprotocol import types
from pygls.lsp.client import LanguageClient

TIMEOUT = 30
# the test models are random and unsure of everything: by default a session shows whatever they suggest
SHOW_EVERYTHING = ("--min-confidence", "0", "--cut-confidence", "0")
# answers are compared with the engine's, which decodes whole lines: no lineMs cut on a busy test machine
# unless a test asks for one
WHOLE_LINES = {"lineMs": 600_000}


def client_capabilities(inline: bool = True, snippets: bool = True) -> types.ClientCapabilities:
    return types.ClientCapabilities(text_document=types.TextDocumentClientCapabilities(
        completion=types.CompletionClientCapabilities(
            completion_item=types.ClientCompletionItemOptions(snippet_support=snippets)),
        inline_completion=types.InlineCompletionClientCapabilities() if inline else None,
    ))


class Session:
    def __init__(self, *server_args: str, init_options: dict | None = None, inline: bool = True,
                 snippets: bool = True, confidence_defaults: bool = False, workspace: str | None = None,
                 before_initialize: Callable[[], Awaitable] | None = None):
        self.args = server_args if confidence_defaults else (*server_args, *SHOW_EVERYTHING)
        self.init_options = {**WHOLE_LINES, **(init_options or {})}
        self.workspace = workspace  # a folder path declared as the workspace
        self.caps = client_capabilities(inline, snippets)
        self.before_initialize = before_initialize  # awaited once the server runs, before `initialize`
        self.client = LanguageClient("codellm-tests", "1")
        self.messages: list[str] = []
        self.versions: dict[str, int] = {}

        @self.client.feature(types.WINDOW_SHOW_MESSAGE)
        def show_message(params):
            self.messages.append(params.message)

        @self.client.feature(types.WINDOW_LOG_MESSAGE)
        def log_message(params):
            pass

    async def __aenter__(self) -> "Session":
        await self.client.start_io(sys.executable, "-m", "codellm.server.cli", *self.args)
        if self.before_initialize:
            await self.before_initialize()
        folders = None
        if self.workspace:
            uri = Path(self.workspace).resolve().as_uri()
            folders = [types.WorkspaceFolder(uri=uri, name=Path(self.workspace).name)]
        self.init = await asyncio.wait_for(self.client.initialize_async(types.InitializeParams(
            capabilities=self.caps, initialization_options=self.init_options, workspace_folders=folders,
            root_uri=folders[0].uri if folders else None)), TIMEOUT)
        self.client.initialized(types.InitializedParams())
        return self

    async def __aexit__(self, *exc):
        try:
            await asyncio.wait_for(self.client.shutdown_async(None), 10)
            self.client.exit(None)
        except Exception:
            pass
        try:
            await asyncio.wait_for(self.client.stop(), 10)
        except Exception:
            if self.client._server:
                self.client._server.kill()

    @property
    def pid(self) -> int:
        return self.client._server.pid

    def open(self, uri: str, text: str, language: str = "shellscript") -> None:
        self.versions[uri] = 1
        self.client.text_document_did_open(types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(uri=uri, language_id=language, version=1, text=text)))

    def edit(self, uri: str, line: int, char: int, text: str, end: tuple[int, int] | None = None) -> None:
        self.versions[uri] += 1
        end_line, end_char = end or (line, char)
        self.client.text_document_did_change(types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=self.versions[uri]),
            content_changes=[types.TextDocumentContentChangePartial(
                range=types.Range(start=types.Position(line=line, character=char),
                                  end=types.Position(line=end_line, character=end_char)), text=text)]))

    def cursor(self, uri: str, line: int, char: int) -> None:
        """codellm/cursor: the cursor rests here (as the VS Code and Neovim configs send it)."""
        self.client.protocol.notify("codellm/cursor", {"textDocument": {"uri": uri},
                                                       "position": {"line": line, "character": char}})

    async def inline(self, uri: str, line: int, char: int, automatic: bool = False, msg_id: str | None = None):
        params = types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line=line, character=char),
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic
                                                  if automatic else types.InlineCompletionTriggerKind.Invoked))
        if msg_id is None:
            return await asyncio.wait_for(self.client.text_document_inline_completion_async(params), TIMEOUT)
        return await asyncio.wait_for(self.client.protocol.send_request_async(
            types.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id=msg_id), TIMEOUT)

    async def completion(self, uri: str, line: int, char: int):
        params = types.CompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line=line, character=char),
            context=types.CompletionContext(trigger_kind=types.CompletionTriggerKind.Invoked))
        return await asyncio.wait_for(self.client.text_document_completion_async(params), TIMEOUT)

    def cancel(self, msg_id: str) -> None:
        self.client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id=msg_id))

    async def status(self) -> dict:
        return await asyncio.wait_for(self.client.protocol.send_request_async("codellm/status", None), TIMEOUT)

    async def wait_for_message(self, needle: str, timeout: float = 20) -> str:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            for m in self.messages:
                if needle in m:
                    return m
            await asyncio.sleep(0.05)
        raise AssertionError(f"no message containing {needle!r}; got {self.messages}")


def new_id() -> str:
    return str(uuid.uuid4())
