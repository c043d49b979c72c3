"""LSP handlers: one module-level function per method, each reading the document and calling the service;
`create_server` registers them (the completion features at initialize, as the client's capabilities ask)."""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import re
import string
import threading
from urllib.parse import unquote

from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.workspace import TextDocument, Workspace

from codellm import __version__
from codellm.shell import is_shell_file

from .model_holder import ModelHolder
from .service import CompletionService, Settings
from .workspace_context import WorkspaceContext, uri_to_path

log = logging.getLogger("codellm.server")

WORD_CHARS = string.ascii_letters + string.digits + "_-"  # what a popup item's text edit replaces
STATUS_METHOD = "codellm/status"
CURSOR_METHOD = "codellm/cursor"
UINTEGER_MAX = 2**31 - 1  # LSP's uinteger


class CodellmProtocol(LanguageServerProtocol):
    """Answers a request whose parameters cannot be read with an error, instead of leaving the client
    waiting forever; accepts requests that omit `params` (allowed by JSON-RPC). Keeps the ids of the
    requests not answered yet (`unanswered`), which `exit` waits for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the client's requests whose answer is not written yet: id -> how many (a careless client may
        # reuse an id while its first request runs)
        self.unanswered: collections.Counter = collections.Counter()

    def _send_response(self, msg_id, result=None, error=None):
        try:
            super()._send_response(msg_id, result, error)
        finally:  # written, or lost with the connection: nothing to wait for
            self.unanswered[msg_id] -= 1
            if self.unanswered[msg_id] <= 0:
                del self.unanswered[msg_id]

    def structure_message(self, data):
        if isinstance(data, dict) and "jsonrpc" in data and "method" in data and "params" not in data:
            data = {**data, "params": None}
        try:
            return super().structure_message(data)
        except JsonRpcException as exc:
            msg_id = data.get("id") if isinstance(data, dict) else None
            if isinstance(msg_id, (int, str)) and "method" in data:
                self._send_response(msg_id, error=exc.to_response_error())
            raise


LSP_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")  # LSP ends lines at \n, \r\n and \r only


class LspLinesDocument(TextDocument):
    """A document whose lines end where the editor's do: at \n, \r\n and \r. (pygls uses
    str.splitlines, which also ends lines at \f, \v, \x1c-\x1e, \x85, U+2028 and U+2029: after a form
    feed in a script, positions and edits would land on the wrong line.) Keeps the text its last
    incremental change replaced (`replaced`), for cursor_after."""

    replaced = ""
    _lines_of: str | None = None  # the source `_lines` was split from
    _lines: tuple[str, ...] = ()

    @property
    def lines(self) -> tuple[str, ...]:
        source = self.source
        if source is not self._lines_of:  # split once per version, not once per use
            self._lines, self._lines_of = tuple(LSP_LINE.findall(source)), source
        return self._lines

    def _apply_incremental_change(self, change: types.TextDocumentContentChangePartial) -> None:
        lines = self.lines
        where = self._position_codec.range_from_client_units(lines, change.range)
        self.replaced = self.source[offset_of(lines, where.start):offset_of(lines, where.end)]
        super()._apply_incremental_change(change)


class LspLinesWorkspace(Workspace):
    """The workspace pygls makes, with documents split into lines as LSP does (LspLinesDocument)."""

    def _create_text_document(self, doc_uri, source=None, version=None, language_id=None) -> TextDocument:
        return LspLinesDocument(doc_uri, source=source, version=version, language_id=language_id,
                                sync_kind=self._sync_kind, position_codec=self._position_codec)


class CodellmServer(LanguageServer):
    def __init__(self, early=None):
        super().__init__("codellm", __version__, protocol_cls=CodellmProtocol)
        self.settings = Settings()
        self.holder = ModelHolder(self.tell_user, early)
        self.service = CompletionService(self.holder, self.settings)
        self.languages: dict[str, str] = {}  # uri -> languageId
        self.context = WorkspaceContext(self.open_text, self.workspace_folders)
        self.owner_connection = None  # the connection this server answers (server.transport)
        self.loop = None
        self.loop_thread = None
        self.tasks: set[asyncio.Task] = set()  # running prefetches and model loads, kept until done
        self.edits = 0  # edits that asked for a prefetch: only the newest one's runs
        self.configuring = asyncio.Lock()  # model settings being applied (did_change_configuration)

    def tell_user(self, message: str, is_error: bool) -> None:
        """A window/showMessage, written to the log too (a pop-up is gone once read); callable from any
        thread (the model watcher's included)."""
        loop = self.loop
        if loop is not None and loop.is_running() and threading.get_ident() != self.loop_thread:
            loop.call_soon_threadsafe(self.tell_user, message, is_error)
            return
        (log.warning if is_error else log.info)("%s", message)
        try:
            if self.protocol.writer is None:
                raise ConnectionError("no client yet")
            self.window_show_message(types.ShowMessageParams(
                type=types.MessageType.Warning if is_error else types.MessageType.Info, message=message))
        except Exception:  # no client connected yet (start-up) or the connection is gone: the log has it
            pass

    def report_server_error(self, error: Exception, source) -> None:
        """Malformed messages are logged, not shown: a pop-up per bad message helps nobody. Only the kind
        of error is logged: its text may quote the message, and so the document."""
        code = getattr(error, "code", None)
        log.warning("bad message or handler error: %s%s", type(error).__name__, f" {code}" if code else "")

    def open_document(self, uri: str):
        """The text the editor sent for `uri`, or None: a document that was not opened is never read
        from disk (pygls' get_text_document would)."""
        if not isinstance(uri, str):
            return None
        documents = self.workspace.text_documents
        return documents.get(unquote(uri)) or documents.get(uri)

    def open_text(self, uri: str) -> str | None:
        doc = self.open_document(uri)
        return doc.source if doc is not None else None

    def workspace_folders(self) -> list[str]:
        """The local folders the client declared (workspace folders, else the root), as paths."""
        try:
            workspace = self.workspace
        except RuntimeError:  # not initialized yet
            return []
        uris = [f.uri for f in workspace.folders.values()] or [workspace.root_uri or ""]
        return [p for u in uris if u and (p := uri_to_path(u))]

    def is_shell(self, uri: str, text: str) -> bool:
        return is_shell_file(uri, text, self.languages.get(uri))


def offset_of(lines: list[str], position: types.Position) -> int:
    """The index in the document's text of a position given in characters (not client units)."""
    return sum(map(len, lines[:position.line])) + position.character


def cursor_split(doc, position: types.Position) -> tuple[str, str, types.Position] | None:
    """(prefix, suffix, cursor) around a client position; None for a position outside the document. A
    position past the end of its line is the line's end (LSP says so), and `cursor` is the place the
    text was split, in the client's units: the one to give answers' ranges."""
    source = doc.source
    lines = doc.lines
    if position.line < 0 or position.character < 0:
        return None
    if position.line >= len(lines):  # the empty line after a final line break (or of an empty document)
        after_break = position.line == len(lines) and (not source or source[-1] in "\r\n")
        return (source, "", types.Position(position.line, 0)) if after_break else None
    line = lines[position.line]
    content = line.rstrip("\r\n")
    codec = doc.position_codec
    if position.character >= codec.client_num_units(content):  # (pygls would move it one back, and in place)
        col = len(content)
    else:
        try:
            col = codec.position_from_client_units(lines, types.Position(position.line, position.character)).character
        except (ValueError, IndexError):
            return None
        col = min(col, len(content))
    offset = offset_of(lines, types.Position(position.line, col))
    cursor = codec.position_to_client_units(lines, types.Position(position.line, col))
    return source[:offset], source[offset:], cursor


# ------------------------------------------------------------------ handlers (one per LSP method)

def initialize(ls: CodellmServer, params: types.InitializeParams):
    ls.loop, ls.loop_thread = asyncio.get_running_loop(), threading.get_ident()
    # pygls has just made the workspace (no document is open yet); its documents split lines as LSP does
    ls.workspace.__class__ = LspLinesWorkspace
    ls.settings.update(params.initialization_options or {})
    for problem in ls.settings.problems:
        ls.tell_user(problem, True)
    offer_completions(ls, params.capabilities.text_document)
    ls.holder.configure(ls.settings.model_path, ls.settings.device, ls.settings.threads, quiet=True)


def offer_completions(ls: CodellmServer, caps: types.TextDocumentClientCapabilities | None) -> None:
    """Register inline completion for a client that has it, popup items for one that has not (the
    completionItems setting can ask for both or for inline only). Done in the initialize handler: pygls
    computes the capabilities it advertises from the features registered once that handler returns (and
    the transport refuses a second initialize)."""
    has_inline = caps is not None and caps.inline_completion is not None
    ls.service.ghost_text = has_inline  # lines cut by lineMs, prefetches on by default
    items = ls.settings.completion_items
    if has_inline or items == "never":
        ls.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())(inline_completion)
    if items == "always" or (items == "auto" and not has_inline):
        options = types.CompletionOptions(trigger_characters=[" ", "\n"], resolve_provider=False)
        ls.feature(types.TEXT_DOCUMENT_COMPLETION, options)(completion)


def initialized(ls: CodellmServer, params):
    ls.holder.quiet = False
    log.info("editor initialized")
    if ls.holder.engine is None and ls.holder.load_error:
        ls.tell_user(f"codellm: {ls.holder.load_error}", True)


def did_change_configuration(ls: CodellmServer, params: types.DidChangeConfigurationParams):
    """Settings apply at once, before the messages that follow are handled (a coroutine handler would
    run after them); a model to load is loaded in a task (configure_model)."""
    changed = ls.settings.update(params.settings)
    for problem in ls.settings.problems:
        ls.tell_user(problem, True)
    if changed:
        log.info("settings changed: %s", ", ".join(sorted(changed)))
        ls.service.clear()
        ls.context.refused = {}
    if {"model_path", "device", "threads"} & set(changed):
        wanted = (ls.settings.model_path, ls.settings.device, ls.settings.threads)
        in_background(ls, configure_model(ls, wanted))


async def configure_model(ls: CodellmServer, wanted: tuple) -> None:
    """The load takes up to seconds: off the event loop, so status and the other messages are answered
    meanwhile (completions wait on the model thread); one change at a time, in the order they came."""
    async with ls.configuring:
        await asyncio.to_thread(ls.holder.configure, *wanted)


def did_open(ls: CodellmServer, params: types.DidOpenTextDocumentParams):
    ls.languages[params.text_document.uri] = params.text_document.language_id
    remember_open(ls, params.text_document.uri)


def did_change(ls: CodellmServer, params: types.DidChangeTextDocumentParams):
    uri = params.text_document.uri
    remember_open(ls, uri)
    doc = ls.open_document(uri)
    if doc is not None and prefetch_wanted(ls):
        cursor = cursor_after(doc, params.content_changes)
        if cursor is not None:
            start_prefetch(ls, uri, doc, cursor)


def cursor_rests(ls: CodellmServer, params):
    """codellm/cursor (sent by the editor configs here when the cursor stops at a place without an edit:
    a click, a jump, a newly opened file): the prompt there is read before the first keystroke, so that
    the first suggestion at a new place costs no more than the next ones (the whole window is read once,
    each keystroke after it reads its few new tokens). Params as textDocument/hover's."""
    try:  # pygls gives the params of a method it does not know as nested named tuples
        uri, line, character = params.textDocument.uri, params.position.line, params.position.character
        if not isinstance(uri, str) or not all(type(n) is int and 0 <= n <= UINTEGER_MAX for n in (line, character)):
            raise TypeError
    except (AttributeError, TypeError):  # a notification has no answer to carry an error: logged, dropped
        log.warning("codellm/cursor: params are not {textDocument: {uri}, position: {line, character}}")
        return
    doc = ls.open_document(uri)
    if doc is not None and prefetch_wanted(ls) and ls.is_shell(uri, doc.source[:200]):
        log.info("cursor rests at line %d, column %d", line + 1, character + 1)
        start_prefetch(ls, uri, doc, types.Position(line=line, character=character))


def prefetch_wanted(ls: CodellmServer) -> bool:
    prefetch = ls.settings.prefetch
    return ls.loop is not None and (prefetch == "always" or (prefetch == "auto" and ls.service.ghost_text))


def start_prefetch(ls: CodellmServer, uri: str, doc, position: types.Position) -> None:
    """Work out the suggestion at `position` in a task of its own (prefetch_at), on the text as it is
    now (later edits may be read before the task runs). The task holds the document's text, not a copy
    of it: a burst of notifications costs no memory per notification."""
    ls.edits += 1
    now = DocumentText(doc.source, doc.lines, doc.position_codec)
    in_background(ls, prefetch_at(ls, uri, now, position, ls.edits))


def in_background(ls: CodellmServer, work) -> None:
    """Run the coroutine `work` as a task of the event loop, kept in `ls.tasks` until done (the loop keeps
    only a weak reference to a task)."""
    task = asyncio.get_running_loop().create_task(work)
    ls.tasks.add(task)
    task.add_done_callback(ls.tasks.discard)


@dataclasses.dataclass(frozen=True)
class DocumentText:
    """A document's text at one version, as cursor_split reads it."""
    source: str
    lines: tuple[str, ...]
    position_codec: object


def cursor_after(doc, changes: list) -> types.Position | None:
    """Where the cursor is after an edit of one range (typing, deleting, pasting): the end of the text
    put in, less the end it shares with the text it replaced (Neovim sends whole lines: `o` below `}`
    replaces "\n" with "\n\n", Enter before `y` replaces "y" with "\ny"). None for several changes or a
    whole new text, which say nothing of the cursor."""
    if len(changes) != 1 or not isinstance(changes[0], types.TextDocumentContentChangePartial):
        return None
    start = changes[0].range.start
    text = changes[0].text
    kept = len(os.path.commonprefix([text[::-1], getattr(doc, "replaced", "")[::-1]]))
    lines = LSP_LINE.findall(text[:len(text) - kept] + ".")  # line breaks as the document's lines count them
    units = doc.position_codec.client_num_units(lines[-1][:-1])  # the last line, without the "."
    if len(lines) == 1:
        return types.Position(line=start.line, character=start.character + units)
    return types.Position(line=start.line + len(lines) - 1, character=units)


async def prefetch_at(ls: CodellmServer, uri: str, doc: DocumentText, position: types.Position, edit: int) -> None:
    """Work out the suggestion at `position` of `doc` before the editor asks (CompletionService.prefetch);
    nothing when a newer edit or cursor rest (of any document) has come since, or the document was closed."""
    try:
        if edit != ls.edits or ls.open_document(uri) is None or ls.holder.engine is None:
            return
        split = cursor_split(doc, position)
        if split is None or not ls.is_shell(uri, doc.source[:200]):
            return
        prefix, suffix = split[:2]
        context = ls.context.chunks_for(uri, prefix, suffix) if ls.settings.file_context else None
        await ls.service.prefetch(uri, prefix, suffix, context)
    except Exception as exc:  # noqa: BLE001 - a failed prefetch costs nothing: the request runs anew
        if not ls.holder.stopped:  # (after `shutdown` the model thread takes no more work: not a fault)
            log.warning("prefetch failed: %s", type(exc).__name__)


def remember_open(ls: CodellmServer, uri: str) -> None:
    """Keep a shell document's text in the ring of open documents (context for the others)."""
    text = ls.open_text(uri)
    if text is not None and ls.is_shell(uri, text):
        ls.context.ring.update(uri, text)


def did_close(ls: CodellmServer, params: types.DidCloseTextDocumentParams):
    ls.languages.pop(params.text_document.uri, None)
    ls.context.ring.remove(params.text_document.uri)
    ls.service.forget(params.text_document.uri)


async def suggestion_at(ls: CodellmServer, uri: str, position: types.Position, automatic: bool, popup: bool):
    """(prefix, Suggestion, cursor) at a position of an open shell document (cursor_split), for a popup
    item or ghost text; None for any other document or a position outside it."""
    doc = ls.open_document(uri)
    if doc is None:
        return None
    split = cursor_split(doc, position)
    if split is None or not ls.is_shell(uri, doc.source):
        return None
    prefix, suffix, cursor = split
    context = ls.context.chunks_for(uri, prefix, suffix) if ls.settings.file_context else None
    return prefix, await ls.service.suggest(uri, prefix, suffix, automatic, context, popup), cursor


async def inline_completion(ls: CodellmServer, params: types.InlineCompletionParams):
    automatic = params.context.trigger_kind == types.InlineCompletionTriggerKind.Automatic
    found = await suggestion_at(ls, params.text_document.uri, params.position, automatic, popup=False)
    if not found or not found[1].text:
        return types.InlineCompletionList(items=[])
    _, suggestion, cursor = found
    return types.InlineCompletionList(items=[types.InlineCompletionItem(
        insert_text=suggestion.text, range=types.Range(start=cursor, end=cursor))])


async def completion(ls: CodellmServer, params: types.CompletionParams):
    automatic = params.context is None or params.context.trigger_kind != types.CompletionTriggerKind.Invoked
    found = await suggestion_at(ls, params.text_document.uri, params.position, automatic, popup=True)
    if not found or not found[1].text:
        return types.CompletionList(is_incomplete=True, items=[])
    prefix, suggestion, cursor = found
    return types.CompletionList(is_incomplete=True, items=[completion_item(ls, prefix, suggestion.text, cursor)])


def status(ls: CodellmServer, params=None):
    refused = list(ls.context.refused.values())[:8] if ls.settings.file_context else []
    return {**ls.service.status(), "context_refused": refused}


def shutdown(ls: CodellmServer, params=None):
    ls.holder.stop()


HANDLERS = {types.INITIALIZE: initialize, types.INITIALIZED: initialized,
            types.WORKSPACE_DID_CHANGE_CONFIGURATION: did_change_configuration,
            types.TEXT_DOCUMENT_DID_OPEN: did_open, types.TEXT_DOCUMENT_DID_CHANGE: did_change,
            types.TEXT_DOCUMENT_DID_CLOSE: did_close,
            STATUS_METHOD: status, CURSOR_METHOD: cursor_rests, types.SHUTDOWN: shutdown}  # the completion features: offer_completions


def create_server(early=None) -> CodellmServer:
    """A server with its handlers registered (the completion features follow at initialize). early: a
    codellm.server.model_holder.EarlyLoad the model holder takes its model thread and model from."""
    ls = CodellmServer(early)
    for method, handler in HANDLERS.items():
        ls.feature(method)(handler)
    return ls


def snippet_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("$", "\\$").replace("}", "\\}")


def word_before_cursor(prefix: str) -> str:
    """The letters, digits, `_` and `-` just before the cursor (stripped off, not searched for with a
    regex: a search would be quadratic in a long word)."""
    line = prefix.rsplit("\n", 1)[-1]
    return line[len(line.rstrip(WORD_CHARS)):]


def completion_item(ls: CodellmServer, prefix: str, text: str, position: types.Position) -> types.CompletionItem:
    """A popup item for an AI suggestion at the cursor `position` (client units): label = word prefix +
    first line, a text edit over the word prefix, the whole suggestion in the documentation. Snippet
    format where the client supports it (Neovim 0.11 inserts only the first word of a plain multi-word
    item)."""
    word = word_before_cursor(prefix)
    first_line = text.split("\n", 1)[0].rstrip("\r")  # (a CRLF document's answer has CRLF line ends)
    full = word + text
    shown = full.replace("\r\n", "\n")
    caps = ls.client_capabilities.text_document
    snippets = bool(caps and caps.completion and caps.completion.completion_item
                    and caps.completion.completion_item.snippet_support)
    # the word's length in the client's units (UTF-16 by default; the encoding negotiated at initialize)
    start = types.Position(line=position.line,
                           character=position.character - ls.workspace.position_codec.client_num_units(word))
    label = (word + first_line).strip() or "(codellm)"
    return types.CompletionItem(
        label=label[:80] + ("…" if "\n" in text or len(label) > 80 else ""),
        kind=types.CompletionItemKind.Text,
        detail="codellm",
        filter_text=word + first_line,
        sort_text="0",
        text_edit=types.TextEdit(range=types.Range(start=start, end=position),
                                 new_text=snippet_escape(full) if snippets else full),
        insert_text_format=types.InsertTextFormat.Snippet if snippets else types.InsertTextFormat.PlainText,
        documentation=types.MarkupContent(kind=types.MarkupKind.Markdown, value=f"```sh\n{shown}\n```"),
    )
