"""How messages reach the server: LSP frames cut from a byte stream that may be broken, and the stdio
and TCP front doors.

pygls' own reader trusts every `Content-Length`: one wrong value and it reads the next messages as the
body of this one (or waits for bytes that never come), and a huge one asks for that much memory. Here
a frame whose length is wrong, missing, misspelt or absurd is recovered from the JSON itself and the
next header; bodies that cannot be read are answered -32700, requests without `jsonrpc` or `method`
-32600, requests before `initialize` -32002, requests after `shutdown` -32600, and a notification sent
with an id (which pygls would never answer) -32600. No frame ends the server. `exit` ends it once the requests still in flight (which `shutdown` cancels) have been answered;
what comes after `exit` is not read.

Over TCP only one connection is served: the first that sends `initialize` with the server's token in
`initializationOptions.token`. Any other connection gets errors and never sees a byte meant for the
editor, and its disconnect ends nothing.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import logging
import os
import re
import secrets
import sys
import threading

from pygls.exceptions import JsonRpcException

log = logging.getLogger("codellm.server")

MAX_BODY = 64 << 20  # a longer declared body is treated as a broken header
MAX_HEADER = 8192
MAX_CANDIDATES = 64  # places where a body may end, tried after a broken frame
TOKEN_ENV = "CODELLM_TOKEN"

# where a header block may start: a header line at the start of a line, or `Content-...:` anywhere
# (after a body whose length was wrong, the next header follows its last brace directly)
HEADER_START = re.compile(rb"(?im)^[A-Za-z][A-Za-z0-9-]{0,63}[ \t]*:|content-[a-z]{1,32}[ \t]*:")
HEADER_END = re.compile(rb"\r?\n\r?\n")
CONTENT_LENGTH = re.compile(rb"(?im)^content-length[ \t]*:[ \t]*(\d{1,12})[ \t]*\r?$")

EXIT_GRACE_S = 2.0  # the longest `exit` waits for answers still being written
STDIN_CHUNKS = 16  # chunks of up to 64 KiB read ahead of the event loop; a client writing faster waits

PARSE_ERROR, INVALID_REQUEST, NOT_INITIALIZED, REQUEST_FAILED = -32700, -32600, -32002, -32803


class BadFrame:
    """A frame whose body is not JSON (or not UTF-8)."""


WAIT = object()  # the framer needs more bytes (a body may be JSON null, so None is a message)


class Framer:
    """Cuts a byte stream into parsed JSON bodies, and finds its way back after a broken frame."""

    def __init__(self):
        self.buf = bytearray()
        self.scan_from = 0  # where to look for further header starts in the current broken frame

    def feed(self, data: bytes) -> list:
        self.buf += data
        out = []
        while True:
            item = self._next()
            if item is WAIT:
                return out
            out.append(item)

    def _consume(self, n: int) -> None:
        del self.buf[:n]
        self.scan_from = 0

    def _next(self):
        buf = self.buf
        start = HEADER_START.search(buf)
        if start is None:  # nothing but junk: keep only a last line, which may be a header's beginning
            cut = buf.rfind(b"\n") + 1
            if len(buf) - cut > MAX_HEADER:
                cut = len(buf)
            if cut:
                log.warning("dropped %d bytes that were not part of a message", cut)
                self._consume(cut)
            return WAIT
        if start.start():
            log.warning("dropped %d bytes that were not part of a message", start.start())
            self._consume(start.start())
            return self._next()
        end = HEADER_END.search(buf, 0, MAX_HEADER + 4)
        if end is None:
            if len(buf) > MAX_HEADER:  # a header block without end: drop its first line and resync
                self._consume(max(1, buf.find(b"\n") + 1))
                return self._next()
            return WAIT
        h = end.end()
        lengths = CONTENT_LENGTH.findall(buf, 0, end.start() + 2)
        n = int(lengths[0]) if len(lengths) == 1 and 0 < int(lengths[0]) <= MAX_BODY else None
        if n is not None and len(buf) - h >= n:
            message = parse(bytes(buf[h:h + n]))
            if message is not BadFrame:
                self._consume(h + n)
                return message
        return self._recover(h, n)

    def _recover(self, h: int, n: int | None):
        """The declared length is wrong (or not there): the body is the JSON value that starts after the
        header; failing that, the frame is answered as unparseable and reading goes on at the next header."""
        buf = self.buf
        complete = n is not None and len(buf) - h >= n
        if n is not None and not complete:
            # still arriving, or the length is too long: then the next header follows the JSON value
            end = json_end(buf, h) if self._header_block_after(h) else None
            if end is None:
                return WAIT
            message = parse(bytes(buf[h:end]))
            self._consume(end)
            return message
        starts = [m.start() for m in HEADER_START.finditer(buf, max(h, self.scan_from))]
        end = json_end(buf, h)
        if end is not None:
            message = parse(bytes(buf[h:end]))
            self._consume(end)
            return message
        if starts:
            self._consume(starts[0] if n is None else min(starts[0], h + n))
            return BadFrame
        text = bytes(buf[h:h + 64]).lstrip()
        if (not text or text[:1] in b"{[") and len(buf) - h <= MAX_BODY:  # may be a JSON value still arriving
            self.scan_from = max(h, len(buf) - 64)
            return WAIT
        self._consume(h + n if complete else len(buf))
        return BadFrame

    def _header_block_after(self, h: int) -> bool:
        """Whether a whole header block (a header line, then a blank line) has come in after buf[h] since
        the last look. A JSON body holds no blank line in its strings (a raw line break there is not
        JSON), so `Content-Type:` in a script's text does not make every chunk read the body again."""
        buf = self.buf
        found = any(HEADER_START.search(buf, max(h, end.start() - MAX_HEADER), end.start() + 1)
                    for end in HEADER_END.finditer(buf, max(h, self.scan_from)))
        self.scan_from = max(h, len(buf) - 3)  # a blank line may be cut between two chunks
        return found


DECODER = json.JSONDecoder()


def json_end(buf: bytearray, h: int) -> int | None:
    """Where the JSON value starting at buf[h] (after blanks) ends, or None if there is none (yet).
    Read as latin-1, one character per byte, so the offset is in bytes."""
    text = bytes(buf[h:]).decode("latin-1")
    start = len(text) - len(text.lstrip())
    if start == len(text) or text[start] not in "{[":
        return None
    try:
        _, end = DECODER.raw_decode(text, start)
    except (ValueError, RecursionError):
        return None
    return h + end


def parse(body: bytes):
    text = body.strip()
    if not text:
        return BadFrame
    try:
        return json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError):
        return BadFrame


def frame(message: dict) -> bytes:
    body = json.dumps(message).encode("utf-8")
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def valid_id(msg_id) -> bool:
    return isinstance(msg_id, (int, str)) and not isinstance(msg_id, bool)


class Connection:
    """One client connection: its framing state and what it may do. `owner` connections talk to the
    language server; over TCP a connection becomes the owner with the right token."""

    def __init__(self, ls, write, protocol_writer, token: str | None = None, on_exit=None):
        self.ls = ls
        self.write = write  # bytes -> None
        self.protocol_writer = protocol_writer  # what pygls writes the editor's answers to
        self.token = token
        self.on_exit = on_exit  # called once `exit` has been carried out (the transport then ends)
        self.framer = Framer()
        self.initialized = False
        self.shut_down = False
        self.exit_received = False  # nothing is read after `exit`
        self.exiting: asyncio.Task | None = None  # an `exit` waiting for the answers still being written
        self.exit_status: int | None = None  # set once `exit` has been carried out: 0 after `shutdown`, else 1

    @property
    def owner(self) -> bool:
        return getattr(self.ls, "owner_connection", None) is self

    def error(self, msg_id, code: int, message: str) -> None:
        self.write(frame({"jsonrpc": "2.0", "id": msg_id if valid_id(msg_id) else None,
                          "error": {"code": code, "message": message}}))

    def feed(self, data: bytes) -> None:
        try:
            messages = self.framer.feed(data)
        except Exception as exc:  # noqa: BLE001 - a framing fault loses this buffer, never the server
            log.warning("dropped unreadable input: %s", type(exc).__name__)
            self.framer = Framer()
            return
        for message in messages:
            try:
                self.handle(message)
            except (SystemExit, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - no message may stop the server
                log.warning("message not handled: %s", type(exc).__name__)

    def handle(self, message) -> None:
        if self.exit_received:
            return  # `exit` has come: nothing more is read
        if message is BadFrame:
            self.error(None, PARSE_ERROR, "Parse error: the body is not JSON")
            return
        if not isinstance(message, dict):
            self.error(None, INVALID_REQUEST, "Invalid request: not a JSON object")
            return
        msg_id, method = message.get("id"), message.get("method")
        is_request = "id" in message
        if "method" not in message:
            if is_request and ("result" in message or "error" in message) and self.owner:
                self.dispatch(message)  # a client's answer to a server request
            elif is_request:
                self.error(msg_id, INVALID_REQUEST, "Invalid request: no method")
            return
        if message.get("jsonrpc") != "2.0" or not isinstance(method, str) or (is_request and not valid_id(msg_id)):
            if is_request:
                self.error(msg_id, INVALID_REQUEST, "Invalid request: needs jsonrpc '2.0', a method name and an id "
                                                    "that is a number or a string")
            return
        if method == "exit":
            if is_request:  # `exit` is a notification: one with an id ends nothing and waits for nothing
                self.error(msg_id, INVALID_REQUEST, "Invalid request: exit is a notification (send it without id)")
            elif self.owner or (self.token is None and not self.initialized):
                self.exit_received = True
                self.exit_when_answered(message)
            return
        if not self.initialized:
            if method != "initialize":
                if is_request:
                    self.error(msg_id, NOT_INITIALIZED, "Server not initialized: send initialize first")
                return
            if not is_request:
                return
            if not self.admit(message):
                return
            self.initialized = True
            self.dispatch(message)
            return
        if not self.owner:
            return
        if self.shut_down:
            if is_request:
                self.error(msg_id, INVALID_REQUEST, "Invalid request: the server is shutting down")
            return
        if method == "initialize":
            if is_request:
                self.error(msg_id, INVALID_REQUEST, "Invalid request: already initialized")
            return
        if method == "shutdown" and is_request:
            self.shut_down = True
        self.dispatch(message)

    def exit_when_answered(self, message: dict) -> None:
        """Carry out `exit` once every request dispatched has written its answer (or EXIT_GRACE_S have
        passed), now or from the task in `exiting`. An editor that closes sends `shutdown` and `exit`
        together: `shutdown` cancels the requests in flight, and their cancellation errors must reach the
        editor before the process ends."""
        unanswered = self.ls.protocol.unanswered
        if not unanswered:
            self.carry_out_exit(message)
            return
        loop = asyncio.get_running_loop()

        async def when_answered():
            deadline = loop.time() + EXIT_GRACE_S
            while unanswered and loop.time() < deadline:
                await asyncio.sleep(0.005)
            self.carry_out_exit(message)

        self.exiting = loop.create_task(when_answered())

    def carry_out_exit(self, message: dict) -> None:
        """pygls closes the writer and raises SystemExit with the status; the status is kept here and the
        transport told, so that the process ends through its own loop and not through an exception raised
        in a task."""
        try:
            self.dispatch(message)
            status = 0
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else 0
        self.exit_status = status
        if self.on_exit:
            self.on_exit()

    def admit(self, message: dict) -> bool:
        """Whether this connection may become the server's client (always, over stdio)."""
        msg_id = message["id"]
        if self.token is not None:
            params = message.get("params")
            options = params.get("initializationOptions") if isinstance(params, dict) else None
            given = options.get("token") if isinstance(options, dict) else None
            if not (isinstance(given, str) and hmac.compare_digest(given.encode(), self.token.encode())):
                self.error(msg_id, REQUEST_FAILED, "codellm-serve: wrong or missing token (pass the token the "
                                                   "server printed, or $CODELLM_TOKEN, as initializationOptions.token)")
                return False
            if getattr(self.ls, "owner_connection", None) is not None:
                self.error(msg_id, REQUEST_FAILED, "codellm-serve: another editor is already connected")
                return False
        self.ls.owner_connection = self
        self.ls.protocol.set_writer(self.protocol_writer)
        return True

    def dispatch(self, message: dict) -> None:
        protocol = self.ls.protocol
        try:
            structured = protocol.structure_message(message)
        except JsonRpcException:
            return  # CodellmProtocol has answered the request
        if getattr(structured, "method", None) is not None and valid_id(getattr(structured, "id", None)):
            protocol.unanswered[structured.id] += 1  # a request: it will be answered, and `exit` waits for that
        elif "method" in message and "id" in message:
            # pygls reads a notification's method sent with an id as a notification, and a request with
            # an error as an answer: neither would be answered, and the client would wait for ever
            self.error(message["id"], INVALID_REQUEST, f"Invalid request: {message['method']} is a notification, "
                                                       "or the request carries a result or an error")
            return
        protocol.handle_message(structured)


class StdoutBytes:
    """The editor's end of stdout. Once a write fails (the editor has closed it), later writes are
    dropped and `on_lost` is called once, from the thread that wrote."""

    def __init__(self, stream, on_lost=None):
        self.stream = stream
        self.lock = threading.Lock()
        self.lost = False
        self.on_lost = on_lost

    def write(self, data: bytes) -> None:
        with self.lock:
            if self.lost:
                return
            try:
                self.stream.write(data)
                self.stream.flush()
            except (OSError, ValueError):  # a broken pipe, or a closed stream
                self.lost = True
        if self.lost:
            log.warning("the connection to the editor is lost; shutting down")
            if self.on_lost:
                self.on_lost()

    def close(self) -> None:
        with self.lock:
            self.lost = True  # closed by `exit`: a late answer is dropped without a word
        self.stream.close()


def serve_stdio(ls) -> int:
    """Serve one editor over stdin/stdout until stdin closes or `exit` arrives. Returns the exit status:
    1 after an `exit` that no `shutdown` came before (as the protocol asks), else 0."""
    ls._stop_event = threading.Event()
    writer = StdoutBytes(sys.stdout.buffer)
    conn = Connection(ls, writer.write, writer)

    async def loop():
        running = asyncio.get_running_loop()
        chunks: asyncio.Queue[bytes] = asyncio.Queue(STDIN_CHUNKS)

        def wake() -> None:  # end the loop without waiting for stdin
            if not chunks.full():  # (a full queue: the loop is not waiting, and checks the stop event next)
                chunks.put_nowait(b"")

        def end() -> None:  # the editor is gone, or `exit` has been carried out; from any thread
            ls._stop_event.set()
            try:
                running.call_soon_threadsafe(wake)
            except RuntimeError:
                pass  # the loop has ended already

        writer.on_lost = conn.on_exit = end
        # a daemon thread: a process ending while the editor keeps stdin open must not wait for its read
        threading.Thread(target=read_stdin, args=(running, chunks), name="codellm-stdin", daemon=True).start()
        while not ls._stop_event.is_set():
            data = await chunks.get()
            if not data:
                break
            conn.feed(data)
        if conn.exiting:
            await conn.exiting  # stdin ended after `exit`: finish that exit

    try:
        asyncio.run(loop())
    except KeyboardInterrupt:
        pass
    finally:
        ls.shutdown()
    return conn.exit_status or 0


def read_stdin(loop: asyncio.AbstractEventLoop, chunks: asyncio.Queue) -> None:
    """Hand what stdin brings to the event loop as it comes; b"" at its end (or when it cannot be read:
    no stdin at all, when the process started with fd 0 closed). Waits while `chunks` is full, so that a
    client that writes faster than the server reads is held back by the pipe, not buffered here."""
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    data = b"x"
    while data:
        try:
            data = os.read(fd, 1 << 16) if fd is not None else b""
        except OSError:
            data = b""
        try:
            asyncio.run_coroutine_threadsafe(chunks.put(data), loop).result()
        except (RuntimeError, concurrent.futures.CancelledError):
            return  # the loop has closed: the server is ending


def server_token() -> str:
    return os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)


def serve_tcp(ls, host: str, port: int, token: str, announce=None) -> int:
    """Listen on host:port; serve the first connection that initializes with `token`. The server ends
    when that connection closes, as it does when an editor closes stdio. Returns the exit status, as
    serve_stdio does. Raises OSError when host:port cannot be bound."""
    ls._stop_event = threading.Event()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        def write(data: bytes) -> None:
            if not writer.is_closing():
                writer.write(data)

        nonlocal status
        others[asyncio.current_task()] = writer
        # `exit` closes the connection (pygls closes its writer), so reading ends, as when the editor closes
        conn = Connection(ls, write, writer, token)
        try:
            while not ls._stop_event.is_set():
                data = await reader.read(1 << 16)
                if not data:
                    break
                conn.feed(data)
            if conn.exiting:
                await conn.exiting  # the editor closed its end after `exit`: finish that exit
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            others.pop(asyncio.current_task(), None)
            if conn.owner:
                if conn.exit_status is None:
                    log.info("the editor disconnected; shutting down")
                status = conn.exit_status or 0
                ls.shutdown()
                finished.set()

    finished, status = None, 0
    others: dict[asyncio.Task, asyncio.StreamWriter] = {}  # the connections being served

    async def main():
        nonlocal finished
        finished = asyncio.Event()
        server = await asyncio.start_server(on_connect, host, port)
        ls._server = server
        bound = server.sockets[0].getsockname()
        if announce:
            announce(bound[0], bound[1])
        async with server:
            await finished.wait()
            for writer in others.values():  # end the other connections' reading, so that none is cut off
                writer.close()
            if others:
                await asyncio.wait(list(others), timeout=1.0)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return status
