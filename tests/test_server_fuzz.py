"""10,000 malformed and random messages, edits and broken frames over raw stdio to one server process;
it must answer every request, correctly, with bounded memory."""
import json
import queue
import random
import subprocess
import sys
import threading
import time

import codellm

URI = "file:///tmp/fuzz/a.sh"
BIG_URI = "file:///tmp/fuzz/big.sh"


class RawServer:
    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "codellm.server.cli", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.responses: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.next_id = 0
        self.answered: set = set()

    def _read(self):
        out = self.proc.stdout
        while True:
            header = b""
            while not header.endswith(b"\r\n\r\n"):
                byte = out.read(1)
                if not byte:
                    return
                header += byte
            length = int([l for l in header.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
            msg = json.loads(out.read(length))
            if "id" in msg and "method" not in msg:
                self.answered.add(msg["id"])
            self.responses.put(msg)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()

    def send_bytes(self, body: bytes):
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()

    def send(self, method, params=None, request=True):
        msg = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        if request:
            self.next_id += 1
            msg["id"] = self.next_id
        self.send_bytes(json.dumps(msg).encode())
        return msg.get("id")

    def wait_for(self, msg_id, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                msg = self.responses.get(timeout=0.5)
            except queue.Empty:
                continue
            if msg.get("id") == msg_id:
                return msg
        raise AssertionError(f"no answer to request {msg_id}")

    def rss_mb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(next(l for l in f if l.startswith("VmRSS")).split()[1]) / 1024


def pos(line, char):
    return {"line": line, "character": char}


BROKEN_HEADERS = {  # a frame whose Content-Length is wrong, for each way it can be wrong
    "too short": lambda n: b"Content-Length: %d\r\n\r\n" % (n - 7),
    "too long": lambda n: b"Content-Length: %d\r\n\r\n" % (n + 40),
    "zero": lambda n: b"Content-Length: 0\r\n\r\n",
    "negative": lambda n: b"Content-Length: -%d\r\n\r\n" % n,
    "missing": lambda n: b"Content-Type: application/vscode-jsonrpc; charset=utf-8\r\n\r\n",
    "misspelt": lambda n: b"Content-Lenght: %d\r\n\r\n" % n,
    "not a number": lambda n: b"Content-Length: twelve\r\n\r\n",
    "huge": lambda n: b"Content-Length: 99999999999999999\r\n\r\n",
}


def send_broken(server: RawServer, kind: str, method: str = "codellm/status") -> int:
    """A request in a frame with a broken header; returns its id."""
    server.next_id += 1
    body = json.dumps({"jsonrpc": "2.0", "id": server.next_id, "method": method}).encode()
    server.proc.stdin.write(BROKEN_HEADERS[kind](len(body)) + body)
    server.proc.stdin.flush()
    return server.next_id


def random_message(rng: random.Random, server: RawServer, version: list):
    kind = rng.randrange(11)
    if kind == 10:
        send_broken(server, rng.choice(sorted(BROKEN_HEADERS)))
    elif kind == 0:
        server.send_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))  # not JSON, not UTF-8
    elif kind == 1:
        server.send_bytes(rng.choice([b"[]", b"42", b'"x"', b"{}", b'{"jsonrpc": "2.0"}', b"null",
                                      b'{"jsonrpc":"2.0","id":1}', b'{"method": 5}']))
    elif kind == 2:
        server.send(rng.choice(["nope/method", "textDocument/hover", "$/unknown", ""]), {"x": 1})
    elif kind == 3:
        server.send("textDocument/inlineCompletion", {
            "textDocument": {"uri": rng.choice([URI, "file:///nowhere.sh", BIG_URI])},
            "position": pos(rng.choice([-1, 0, 3, 10**6]), rng.choice([-5, 0, 2, 10**7])),
            "context": {"triggerKind": rng.choice([1, 2, 7])}})
    elif kind == 4:
        version[0] += 1
        text = rng.choice(["echo ", "\n", "if true; then\n  ls\nfi\n", "\ud800", "é", "\x00", "}}}", "'\"`$("])
        server.send("textDocument/didChange", {
            "textDocument": {"uri": URI, "version": version[0]},
            "contentChanges": [{"range": {"start": pos(rng.randrange(0, 6), rng.randrange(0, 12)),
                                          "end": pos(rng.randrange(0, 6), rng.randrange(0, 12))}, "text": text}]},
                    request=False)
    elif kind == 5:
        server.send("textDocument/completion", {"textDocument": {"uri": URI},
                                                "position": pos(rng.randrange(0, 5), rng.randrange(0, 10))})
    elif kind == 6:
        server.send("textDocument/didChange", {"textDocument": {"uri": 12}, "contentChanges": "x"}, request=False)
    elif kind == 7:
        server.send("textDocument/inlineCompletion", {"textDocument": {"uri": URI}}, request=True)
    elif kind == 8:
        server.send("$/cancelRequest", {"id": rng.randrange(1, server.next_id + 2)}, request=False)
    else:
        server.send("codellm/status", None)


def wait_until_torch_serves(server: RawServer, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = server.wait_for(server.send("codellm/status", None))["result"]
        steps = status.get("decode_steps", status.get("decodeSteps")) or ""
        if steps and "without torch" not in steps:
            return
        time.sleep(0.5)
    raise AssertionError("the model did not load")


def test_fuzz_then_correct_answers_with_bounded_memory(bundle_path):
    with RawServer("--model", str(bundle_path), "--min-confidence", "0", "--cut-confidence", "0") as server:
        init = server.send("initialize", {"processId": None, "rootUri": None, "capabilities": {
            "textDocument": {"inlineCompletion": {}, "completion": {}}}})
        assert "capabilities" in server.wait_for(init)["result"]
        server.send("initialized", {}, request=False)
        server.send("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "shellscript", "version": 1,
                                                              "text": "#!/bin/sh\necho hi\n"}}, request=False)
        big = "".join(f"echo line {i} {'x' * 40}\n" for i in range(110_000))  # about 5.5 MB
        server.send("textDocument/didOpen", {"textDocument": {"uri": BIG_URI, "languageId": "shellscript",
                                                              "version": 1, "text": big}}, request=False)
        rng = random.Random(1234)
        version = [1]
        for i in range(10_000):
            random_message(rng, server, version)
            if i == 100:  # the model loaded (torch serves), so what it takes is not counted as growth
                wait_until_torch_serves(server)
                warm_rss = server.rss_mb()
        big_answer = server.wait_for(server.send("textDocument/inlineCompletion", {
            "textDocument": {"uri": BIG_URI}, "position": pos(110_000, 0), "context": {"triggerKind": 1}}), 120)
        assert "result" in big_answer
        # still correct: a fresh document gets exactly what the engine says
        text = "#!/bin/bash\nfor f in *.txt; do\n    echo"
        server.send("textDocument/didOpen", {"textDocument": {"uri": "file:///tmp/fuzz/ok.sh",
                                                              "languageId": "shellscript", "version": 1,
                                                              "text": text}}, request=False)
        answer = server.wait_for(server.send("textDocument/inlineCompletion", {
            "textDocument": {"uri": "file:///tmp/fuzz/ok.sh"}, "position": pos(2, 8), "context": {"triggerKind": 1}}))
        engine = codellm.load(str(bundle_path), device="cpu")
        want = engine.complete(text, "", "line")
        assert [item["insertText"] for item in answer["result"]["items"]] == ([want] if want else [])
        assert server.proc.poll() is None
        unanswered = set(range(1, server.next_id + 1)) - server.answered
        assert not unanswered, f"{len(unanswered)} requests got no answer"
        end_rss = server.rss_mb()
        assert end_rss - warm_rss < 300, (warm_rss, end_rss)


def test_a_body_naming_http_headers_is_read_in_one_pass(monkeypatch):
    """A script with `curl -H "Content-Type: ..."` lines, sent in chunks as a pipe delivers it, looks
    like header starts all through its body: the framer must not read the body again for each chunk
    (quadratic in its size: minutes for tens of MB) but take it whole once it has come."""
    from codellm.server import transport
    calls = []
    json_end = transport.json_end
    monkeypatch.setattr(transport, "json_end", lambda buf, h: calls.append(h) or json_end(buf, h))
    text = 'curl -H "Content-Type: application/json" -d @body.json "$URL"\n' * 20_000  # 1.3 MB
    body = json.dumps({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {
        "uri": "file:///a.sh", "languageId": "shellscript", "version": 1, "text": text}}}).encode()
    stream = b"Content-Length: %d\r\n\r\n" % len(body) + body
    framer, got = transport.Framer(), []
    for at in range(0, len(stream), 1 << 16):
        got += framer.feed(stream[at:at + (1 << 16)])
    assert len(got) == 1 and got[0]["params"]["textDocument"]["text"] == text
    assert len(calls) <= 1
    # a length too long still finds the next frame, whose header follows the body
    short = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "codellm/status"}).encode()
    stream = b"Content-Length: %d\r\n\r\n" % (len(body) + 500) + body + b"Content-Length: %d\r\n\r\n" % len(short) + short
    framer, got = transport.Framer(), []
    for at in range(0, len(stream), 1 << 16):
        got += framer.feed(stream[at:at + (1 << 16)])
    assert [m.get("id") for m in got] == [None, 7]
