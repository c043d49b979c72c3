"""codellm-serve against careless clients and hostile input, through real clients: broken frames,
protocol misuse, documents never opened, a second TCP connection, bad settings, logs."""
import asyncio
import json
import logging
import os
import queue
import re
import select
import socket
import subprocess
import sys
import threading
import time

import pytest
from lsprotocol import types

import codellm

from lsp_session import Session
from test_server import END, LONG_DOCUMENT, URI, wait_for_status
from test_server_fuzz import BROKEN_HEADERS, RawServer, send_broken

SCRIPT = "#!/bin/bash\nfor f in *.txt; do\n    echo"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS")).split()[1]) / 1024


class Answers:
    """Every message a RawServer received, by id."""

    def __init__(self, server: RawServer):
        self.server, self.by_id = server, {}

    def get(self, msg_id, timeout=30):
        deadline = time.monotonic() + timeout
        while msg_id not in self.by_id and time.monotonic() < deadline:
            try:
                msg = self.server.responses.get(timeout=0.2)
            except queue.Empty:
                continue
            if "method" not in msg:
                self.by_id[msg.get("id")] = msg
        if msg_id not in self.by_id:
            raise AssertionError(f"no answer to {msg_id}; got {sorted(map(str, self.by_id))}")
        return self.by_id[msg_id]


def initialize(server: RawServer, answers: Answers, options=None):
    msg_id = server.send("initialize", {"processId": None, "rootUri": None, "capabilities": {
        "textDocument": {"inlineCompletion": {}}}, "initializationOptions": options})
    assert "capabilities" in answers.get(msg_id)["result"]
    server.send("initialized", {}, request=False)


@pytest.mark.parametrize("kind", sorted(BROKEN_HEADERS))
def test_a_broken_frame_is_recovered_and_later_requests_answered(bundle_path, kind):
    with RawServer("--model", str(bundle_path)) as server:
        answers = Answers(server)
        initialize(server, answers)
        broken = send_broken(server, kind)
        after = server.send("codellm/status")
        assert "result" in answers.get(after)  # the server still hears
        assert "result" in answers.get(broken)  # and read the broken frame's request from its JSON
        assert server.proc.poll() is None


def test_protocol_errors_are_answered_and_never_end_the_server(bundle_path):
    with RawServer("--model", str(bundle_path)) as server:
        answers = Answers(server)
        early = server.send("codellm/status")
        assert answers.get(early)["error"]["code"] == -32002  # before initialize
        initialize(server, answers)
        server.send_bytes(b'{"jsonrpc": "2.0", "id": 500, "method": "codellm/status"')  # cut short
        server.send_bytes(b"\xff\xfe not json")
        assert answers.get(None)["error"]["code"] == -32700
        server.send_bytes(b'{"id": 501, "method": "codellm/status"}')  # no jsonrpc
        server.send_bytes(b'{"jsonrpc": "2.0", "id": 502}')  # no method
        assert answers.get(501)["error"]["code"] == -32600
        assert answers.get(502)["error"]["code"] == -32600
        ok = server.send("codellm/status")
        assert "result" in answers.get(ok)
        assert "result" in answers.get(server.send("shutdown"))
        late = server.send("codellm/status")
        assert answers.get(late)["error"]["code"] == -32600  # after shutdown: an error, not silence
        server.send("exit", request=False)
        assert server.proc.wait(30) == 0


def test_a_notification_sent_as_a_request_is_answered_with_an_error(bundle_path):
    """`exit` or `initialized` with an id, or a request that carries an error, would otherwise never be
    answered (pygls reads them as a notification or an answer), and `exit` with an id ended the server
    at once: each gets -32600, and the server goes on."""
    with RawServer("--model", str(bundle_path)) as server:
        answers = Answers(server)
        initialize(server, answers)
        sent = [server.send("exit"), server.send("initialized", {}), server.send("$/cancelRequest", {"id": 1})]
        server.send_bytes(b'{"jsonrpc": "2.0", "id": 900, "method": "codellm/status", "error": {"code": 1, '
                          b'"message": "x"}}')
        for msg_id in [*sent, 900]:
            assert answers.get(msg_id)["error"]["code"] == -32600
        assert "result" in answers.get(server.send("codellm/status"))
        assert server.proc.poll() is None


def test_exit_without_shutdown_ends_the_server_with_status_one(bundle_path):
    """The protocol's rule: `exit` after `shutdown` ends with 0, a bare `exit` with 1."""
    with RawServer("--model", str(bundle_path)) as server:
        initialize(server, Answers(server))
        server.send("exit", request=False)
        assert server.proc.wait(30) == 1


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_a_server_killed_on_a_terminal_leaves_the_terminal_blocking(bundle_path):
    """Run by hand in a shell, stdin is the shell's terminal, whose non-blocking flag the shell shares: the
    server reads it as it is, so a SIGTERM cannot leave the shell's stdin non-blocking."""
    main, tty = os.openpty()
    termios_mode = pytest.importorskip("tty")
    termios_mode.setraw(tty)  # bytes as they come, not lines, and no echo
    proc = subprocess.Popen([sys.executable, "-m", "codellm.server.cli", "--model", str(bundle_path)], stdin=tty,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}}})
        os.write(main, b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode()))
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and b"capabilities" in proc.stdout.read1(1 << 16)  # it reads the terminal
        assert os.get_blocking(tty)
        proc.terminate()
        proc.wait(30)
        assert os.get_blocking(tty)
    finally:
        proc.kill()
        proc.wait()
        os.close(main)
        os.close(tty)


def test_documents_never_opened_are_never_read(bundle_path, tmp_path):
    on_disk = tmp_path / "secret.sh"
    on_disk.write_text("#!/bin/sh\nPASSWORD=hunter2\necho $PASS")
    fifo = tmp_path / "x.sh"
    os.mkfifo(fifo)

    async def main():
        async with Session("--model", str(bundle_path), init_options={"completionItems": "always"}) as s:
            before = rss_mb(s.pid)
            for uri in ("file:///dev/zero", fifo.as_uri(), on_disk.as_uri()):
                result = await s.inline(uri, 2, 11)
                assert list(result.items) == []
                result = await s.completion(uri, 0, 0)
                assert list(result.items) == []
            assert rss_mb(s.pid) - before < 200  # /dev/zero was not read
            s.open("file:///tmp/work/open.sh", SCRIPT)  # an opened one is still served
            got = await s.inline("file:///tmp/work/open.sh", 2, 8)
            want = codellm.load(str(bundle_path), device="cpu").complete(SCRIPT, "", "line")
            assert [i.insert_text for i in got.items] == ([want] if want else [])
    run(main())


class TcpClient:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.received: list[dict] = []
        self.raw = bytearray()
        self.closed = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.raw += data
                buf += data
                while b"\r\n\r\n" in buf:
                    head, rest = buf.split(b"\r\n\r\n", 1)
                    n = int(re.search(rb"Content-Length: (\d+)", head).group(1))
                    if len(rest) < n:
                        break
                    self.received.append(json.loads(rest[:n]))
                    buf = rest[n:]
        except OSError:
            pass
        self.closed.set()

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)  # (a bare close would not end the recv of the reader thread)
        self.sock.close()

    def send(self, msg: dict):
        body = json.dumps(msg).encode()
        self.sock.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def answer(self, msg_id, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.received:
                if m.get("id") == msg_id and "method" not in m:
                    return m
            time.sleep(0.02)
        raise AssertionError(f"no answer to {msg_id}")

    def initialize(self, msg_id, token):
        self.send({"jsonrpc": "2.0", "id": msg_id, "method": "initialize", "params": {
            "processId": None, "rootUri": None, "capabilities": {"textDocument": {"inlineCompletion": {}}},
            "initializationOptions": {"token": token} if token else None}})
        return self.answer(msg_id)


def test_tcp_serves_one_client_with_the_token_and_survives_others(bundle_path):
    secret = "SECRET_DOCUMENT_TEXT_4711"
    text = f"#!/bin/bash\n# {secret}\nfor f in *.txt; do\n    echo"
    proc = subprocess.Popen([sys.executable, "-m", "codellm.server.cli", "--model", str(bundle_path), "--tcp", "0",
                             "--min-confidence", "0", "--cut-confidence", "0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        port, token = re.search(r"listening on 127\.0\.0\.1:(\d+); token (\S+)", line).groups()
        port = int(port)
        intruder = TcpClient(port)
        assert intruder.initialize(1, None)["error"]["code"] == -32803  # no token
        assert intruder.initialize(2, "guess")["error"]["code"] == -32803  # wrong token
        intruder.send({"jsonrpc": "2.0", "id": 3, "method": "codellm/status"})
        assert intruder.answer(3)["error"]["code"] == -32002

        editor = TcpClient(port)
        assert "capabilities" in editor.initialize(1, token)["result"]
        editor.send({"jsonrpc": "2.0", "method": "initialized", "params": {}})
        editor.send({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {
            "uri": "file:///tmp/w/a.sh", "languageId": "shellscript", "version": 1, "text": text}}})
        second = TcpClient(port)  # even with the token, a second editor is refused while one is served
        assert "already connected" in second.initialize(1, token)["error"]["message"]
        inline = {"textDocument": {"uri": "file:///tmp/w/a.sh"}, "position": {"line": 3, "character": 8},
                  "context": {"triggerKind": 1}}
        editor.send({"jsonrpc": "2.0", "id": 2, "method": "textDocument/inlineCompletion", "params": inline})
        want = codellm.load(str(bundle_path), device="cpu").complete(text, "", "line")
        got = editor.answer(2)["result"]["items"]
        assert [i["insertText"] for i in got] == ([want] if want else [])

        for other in (intruder, second):  # nothing meant for the editor reached the others
            assert secret.encode() not in other.raw
            assert all("error" in m for m in other.received)
            other.close()
        time.sleep(0.3)
        editor.send({"jsonrpc": "2.0", "id": 3, "method": "codellm/status"})
        assert editor.answer(3)["result"]["requests"] == 1  # the others' disconnects ended nothing
        assert proc.poll() is None
        editor.close()
        assert proc.wait(30) == 0  # the editor's own disconnect ends the server, as over stdio
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("shut_down", [True, False])
def test_tcp_exit_ends_the_server_with_the_protocols_status_and_a_clean_log(bundle_path, shut_down):
    """Over TCP as over stdio: `exit` after `shutdown` ends with 0, a bare `exit` with 1; a completion in
    flight is answered first, and the log holds no traceback or asyncio error."""
    proc = subprocess.Popen([sys.executable, "-m", "codellm.server.cli", "--model", str(bundle_path), "--tcp", "0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        port, token = re.search(r"listening on 127\.0\.0\.1:(\d+); token (\S+)", line).groups()
        intruder = TcpClient(int(port))  # another connection, still open when the server ends
        editor = TcpClient(int(port))
        assert "result" in editor.initialize(1, token)
        editor.send({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {
            "uri": URI, "languageId": "shellscript", "version": 1, "text": SCRIPT}}})
        intruder.send({"jsonrpc": "2.0", "method": "exit"})  # not the editor's: ends nothing
        editor.send({"jsonrpc": "2.0", "id": 2, "method": "textDocument/inlineCompletion", "params": {
            "textDocument": {"uri": URI}, "position": {"line": 2, "character": 8}, "context": {"triggerKind": 1}}})
        if shut_down:
            editor.send({"jsonrpc": "2.0", "id": 3, "method": "shutdown"})
        editor.send({"jsonrpc": "2.0", "method": "exit"})
        assert proc.wait(60) == (0 if shut_down else 1)
        assert editor.answer(2, timeout=5)
        assert intruder.closed.wait(5)
        log = proc.stderr.read()
        assert "Traceback" not in log and "ERROR" not in log, log
    finally:
        proc.kill()
        proc.wait()


def test_tcp_token_from_the_environment(bundle_path):
    env = dict(os.environ, CODELLM_TOKEN="from-env-123")
    proc = subprocess.Popen([sys.executable, "-m", "codellm.server.cli", "--model", str(bundle_path), "--tcp", "0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        line = proc.stderr.readline()
        assert "from-env-123" not in line
        port = int(re.search(r":(\d+);", line).group(1))
        assert "result" in TcpClient(port).initialize(1, "from-env-123")
    finally:
        proc.kill()
        proc.wait()


def test_settings_are_converted_or_rejected_by_name(bundle_path):
    options = {"maxTokens": "64", "timeoutMs": "500", "multilineMs": None, "threads": "2"}

    async def main():
        async with Session("--model", str(bundle_path), init_options=options) as s:
            status = await s.status()
            assert (status.settings.max_tokens, status.settings.timeout_ms, status.settings.threads) == (64, 500, 2)
            assert status.settings.multiline_ms == 40  # null: the default
            assert not any("multilineMs" in m for m in s.messages)
            s.client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
                settings={"codellm": {"timeoutMs": -5, "modelPath": 42, "multiline": "sometimes"}}))
            for name in ("timeoutMs", "modelPath", "multiline"):
                await s.wait_for_message(f"setting {name}")
            status = await s.status()
            assert status.settings.timeout_ms == 500 and status.settings.multiline == "auto"
            assert status.model_error is None
            s.client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
                settings={"codellm": {"timeoutMs": "60000", "maxTokens": None}}))
            s.open("file:///tmp/work/a.sh", SCRIPT)
            got = await s.inline("file:///tmp/work/a.sh", 2, 8)  # completions still work
            want = codellm.load(str(bundle_path), device="cpu").complete(SCRIPT, "", "line")
            assert [i.insert_text for i in got.items] == ([want] if want else [])
    run(main())


def test_no_document_text_in_the_log(bundle_path, tmp_path):
    secret = "SECRET_4711_DO_NOT_LOG"
    log = tmp_path / "server.log"
    with RawServer("--model", str(bundle_path), "--log-file", str(log), "-v") as server:
        answers = Answers(server)
        initialize(server, answers)
        doc = f"#!/bin/sh\necho {secret}\n"
        # invalid notifications and requests that carry document text
        server.send("textDocument/didChange", {"textDocument": {"uri": "file:///never.sh", "version": 2},
                                               "contentChanges": [{"text": doc}]}, request=False)
        server.send("textDocument/didOpen", {"textDocument": {"uri": 5, "text": doc}}, request=False)
        server.send("textDocument/didOpen", {"textDocument": {"uri": "file:///a.sh", "languageId": "sh",
                                                              "version": "x", "text": doc}}, request=False)
        bad = server.send("textDocument/inlineCompletion", {"textDocument": {"uri": doc}, "position": doc})
        assert "error" in answers.get(bad)
        server.send_bytes(f'{{"jsonrpc": "2.0", "method": "x", "params": "{secret}"'.encode())
        for method in ("workspace/noSuchNotification", "$/noSuchNotice", "my-ext2/doThing"):
            server.send(method, {"text": doc}, request=False)
        server.send("textDocument/didOpen", {"textDocument": {"uri": "file:///b.sh", "languageId": "shellscript",
                                                              "version": 1, "text": doc}}, request=False)
        ok = server.send("textDocument/inlineCompletion", {"textDocument": {"uri": "file:///b.sh"},
                                                           "position": {"line": 2, "character": 0},
                                                           "context": {"triggerKind": 1}})
        assert "result" in answers.get(ok)
        assert "result" in answers.get(server.send("codellm/status"))
    text = log.read_text()
    assert "completion" in text  # the log is written
    assert secret not in text
    for method in ("workspace/noSuchNotification", "$/noSuchNotice", "my-ext2/doThing"):
        assert method in text  # a method name the server ignored is named


def test_a_library_logging_a_value_shows_its_type_only():
    from codellm.server.cli import NoDocumentText
    secret = "SECRET_4711_DO_NOT_LOG"
    shown = []
    for msg in (ValueError(f"echo {secret}"), {"text": secret}, "Failed on %s\n%s"):
        record = logging.LogRecord("somelib", logging.ERROR, __file__, 1, msg, (), None)
        assert NoDocumentText().filter(record)
        shown.append(record.getMessage())
    assert shown == ["ValueError", "dict", "Failed on %s"]


def test_a_setting_the_editor_clears_goes_back_to_the_command_lines(bundle_path):
    async def main():
        async with Session("--model", str(bundle_path), "--min-confidence", "0.1", confidence_defaults=True,
                           init_options={"minConfidence": 0.9, "cutConfidence": 0.7, "maxTokens": 5,
                                         "timeoutMs": 900, "multiline": "never"}) as s:
            status = await s.status()
            assert (status.settings.min_confidence, status.settings.cut_confidence) == (0.9, 0.7)
            s.client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
                settings={"codellm": {"minConfidence": None, "cutConfidence": None, "maxTokens": None,
                                      "timeoutMs": None, "multiline": None}}))
            status = await wait_for_status(s, lambda st: st.settings.min_confidence == 0.1)  # the command line's
            assert status.settings.cut_confidence == 0.5 and status.settings.max_tokens is None  # the defaults
            assert status.settings.timeout_ms == 2000 and status.settings.multiline == "auto"
            assert status.model == str(bundle_path)

    asyncio.run(main())


def test_a_model_setting_that_fails_leaves_the_serving_model_named_and_watched(bundle_path, tmp_path):
    missing = tmp_path / "no-such-model"

    async def main():
        async with Session("--model", str(bundle_path)) as s:
            s.client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
                settings={"codellm": {"modelPath": str(missing)}}))
            message = await s.wait_for_message("still serving")
            assert "train one" not in message.lower()  # a bundle is serving: no advice to train one
            status = await s.status()
            assert status.model == str(bundle_path) and status.model_error and status.parameters
            s.open(URI, LONG_DOCUMENT)
            assert await s.inline(URI, END, 0, automatic=False) is not None  # the old model answers
            s.client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
                settings={"codellm": {"modelPath": str(bundle_path)}}))  # back to the model serving
            status = await wait_for_status(s, lambda st: st.model_error is None, timeout=60)
            assert status.model == str(bundle_path)  # the failed setting's error is no longer shown

    asyncio.run(main())


def test_a_model_change_loads_off_the_event_loop_and_the_serving_model_answers_meanwhile(bundle_path, tokenizer,
                                                                                       tmp_path):
    from codellm.bundle import save_bundle
    from conftest import make_model
    big = tmp_path / "big"  # ~40M weights: its load takes far longer than a status request
    save_bundle(big, make_model(tokenizer, n_layer=6, d_model=768, n_head=12), tokenizer)

    async def main():
        async with Session("--model", str(bundle_path)) as s:
            s.open(URI, SCRIPT)
            s.client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
                settings={"codellm": {"modelPath": str(big)}}))
            status = await s.status()
            assert status.model == str(bundle_path)  # answered while the load goes on, by the model serving
            assert await s.inline(URI, 2, 8, automatic=False) is not None  # which answers requests too
            status = await wait_for_status(s, lambda st: st.model == str(big), timeout=120)
            assert status.model_error is None and status.parameters > 30_000_000

    asyncio.run(main())


def test_requests_in_flight_at_shutdown_are_answered_before_the_server_exits(bundle_path):
    """An editor that closes right after typing sends edits, completions, `shutdown` and `exit` at once:
    every request gets its answer (a result, or the error of a request cancelled, by `shutdown` or by
    `$/cancelRequest`) before the process ends, even while the editor keeps its end of stdin open. A
    second `exit` changes nothing, and a request after `exit` is not read."""
    with RawServer("--model", str(bundle_path), "--min-confidence", "0", "--cut-confidence", "0") as server:
        answers = Answers(server)
        initialize(server, answers)
        server.send("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "shellscript",
                                                              "version": 1, "text": SCRIPT}}, request=False)
        line, text, pending = SCRIPT.count("\n"), SCRIPT.split("\n")[-1], []
        for version in range(2, 102):  # typing " x x x ...", a completion asked every fifth key
            server.send("textDocument/didChange", {
                "textDocument": {"uri": URI, "version": version},
                "contentChanges": [{"range": {"start": {"line": line, "character": len(text)},
                                              "end": {"line": line, "character": len(text)}},
                                    "text": " x"[version % 2]}]}, request=False)
            text += " x"[version % 2]
            if version % 5 == 0:
                pending.append(server.send("textDocument/inlineCompletion", {
                    "textDocument": {"uri": URI}, "position": {"line": line, "character": len(text)},
                    "context": {"triggerKind": 2}}))
        server.send("$/cancelRequest", {"id": pending[-1]}, request=False)
        pending.append(server.send("codellm/status"))
        bye = server.send("shutdown")
        server.send("exit", request=False)
        server.send("exit", request=False)
        after = server.send("codellm/status")
        assert server.proc.wait(60) == 0
        time.sleep(0.5)  # the reader thread takes the last bytes of stdout
        while not server.responses.empty():
            msg = server.responses.get()
            if "method" not in msg:
                answers.by_id[msg["id"]] = msg
        assert set(pending) <= set(answers.by_id), f"unanswered: {set(pending) - set(answers.by_id)}"
        assert "result" in answers.by_id[bye]
        assert all("result" in answers.by_id[msg_id] or answers.by_id[msg_id]["error"]["code"] == -32800
                   for msg_id in pending)
        assert after not in answers.by_id


def test_a_shutdown_after_exit_does_not_change_its_status(bundle_path):
    """`exit` with no `shutdown` before it ends with 1, even while it waits for answers and a `shutdown`
    comes after it."""
    with RawServer("--model", str(bundle_path), "--min-confidence", "0", "--cut-confidence", "0") as server:
        answers = Answers(server)
        initialize(server, answers)
        server.send("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "shellscript",
                                                              "version": 1, "text": SCRIPT}}, request=False)
        asked = server.send("textDocument/inlineCompletion", {
            "textDocument": {"uri": URI}, "position": {"line": SCRIPT.count("\n"), "character": 8},
            "context": {"triggerKind": 1}})
        server.send("exit", request=False)
        server.send("shutdown")
        assert server.proc.wait(60) == 1
        assert answers.get(asked, timeout=5)


def test_a_server_started_without_stdin_ends_at_once(bundle_path):
    """With file descriptor 0 closed there is no editor: the server ends with status 0 and no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "codellm.server.cli", "--model", str(bundle_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda: os.close(0))
    try:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0
        assert b"Traceback" not in err, err.decode(errors="replace")
    finally:
        proc.kill()
        proc.wait()
