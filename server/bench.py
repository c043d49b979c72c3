"""`python -m codellm.server.bench`: type shell scripts into a real stdio server keystroke by keystroke,
asking for an inline completion after each, as an editor does; reports end-to-end latency (p50/p95),
KV reuse and cache hits, with KV reuse on and off side by side.

Scripts come from the held-out split of a corpus (never trained on) or from a folder.
"""
from __future__ import annotations

import argparse
import asyncio
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from lsprotocol import types
from pygls.lsp.client import LanguageClient


def load_scripts(corpus: Path | None, folder: Path | None, count: int) -> list[str]:
    if folder:
        return [p.read_text(errors="replace") for p in sorted(folder.glob("*.sh"))][:count]
    from codellm.train.corpus import read_records
    from codellm.train.recipe import SHELL_FILE
    texts = [r["text"] for r in read_records(corpus / SHELL_FILE) if r.get("split") == "val"]
    texts = [t for t in texts if 20 < t.count("\n") < 3000]
    random.Random(0).shuffle(texts)
    return texts[:count]


async def type_scripts(server_args: list[str], scripts: list[str], keystrokes: int, options: dict) -> dict:
    client = LanguageClient("codellm-bench", "1")
    await client.start_io(sys.executable, "-m", "codellm.server.cli", *server_args)
    caps = types.ClientCapabilities(text_document=types.TextDocumentClientCapabilities(
        inline_completion=types.InlineCompletionClientCapabilities()))
    await client.initialize_async(types.InitializeParams(capabilities=caps, initialization_options=options))
    client.initialized(types.InitializedParams())
    latencies = []
    per_script = max(1, keystrokes // len(scripts))
    for n, script in enumerate(scripts):
        lines = script.split("\n")
        start = len(lines) // 2
        typed_lines = "\n".join(lines[start:start + 6])[:per_script]
        before = "\n".join(lines[:start]) + "\n"
        after = "\n" + "\n".join(lines[start + 6:]) if len(lines) > start + 6 else "\n"
        uri = f"file:///bench/script{n}.sh"
        client.text_document_did_open(types.DidOpenTextDocumentParams(text_document=types.TextDocumentItem(
            uri=uri, language_id="shellscript", version=0, text=before + after)))
        line, char = start, 0
        for version, ch in enumerate(typed_lines, 1):
            client.text_document_did_change(types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
                content_changes=[types.TextDocumentContentChangePartial(
                    range=types.Range(start=types.Position(line=line, character=char),
                                      end=types.Position(line=line, character=char)), text=ch)]))
            if ch == "\n":
                line, char = line + 1, 0
            else:
                char += len(ch.encode("utf-16-le")) // 2
            t0 = time.perf_counter()
            await asyncio.wait_for(client.text_document_inline_completion_async(types.InlineCompletionParams(
                text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line=line, character=char),
                context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic))), 60)
            latencies.append(time.perf_counter() - t0)
    status = await client.protocol.send_request_async("codellm/status", None)
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
    latencies.sort()
    return {"requests": len(latencies), "p50": 1000 * latencies[len(latencies) // 2],
            "p95": 1000 * latencies[int(len(latencies) * 0.95)], "mean": 1000 * statistics.fmean(latencies),
            "kv_reuse": status.kv_reuse_ratio, "cache_hits": status.cache_hit_rate, "model_runs": status.model_runs,
            "server_p50": status.latency_ms.p50}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m codellm.server.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="bundle (default: the shipped model)")
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus"), help="corpus with a held-out split")
    parser.add_argument("--scripts-dir", type=Path, default=None, help="a folder of .sh files instead")
    parser.add_argument("--scripts", type=int, default=8)
    parser.add_argument("--keystrokes", type=int, default=600)
    parser.add_argument("--server-log", default=None,
                        help="the servers' log file: one line per completion with its source, mode and time")
    args = parser.parse_args(argv)
    scripts = load_scripts(args.corpus, args.scripts_dir, args.scripts)
    if not scripts:
        sys.exit("no scripts to type: give --corpus with a held-out split or --scripts-dir")
    server_args = (["--model", args.model] if args.model else []) + \
        (["--log-file", args.server_log] if args.server_log else [])
    print(f"machine: {platform.machine()}, typing {args.keystrokes} keystrokes over {len(scripts)} held-out "
          f"scripts, one inline completion request after each")
    for label, options in (("KV reuse on", {"kvReuse": True}), ("KV reuse off", {"kvReuse": False})):
        r = asyncio.run(type_scripts(server_args, scripts, args.keystrokes, options))
        print(f"  {label:13s} end-to-end p50 {r['p50']:6.1f} ms  p95 {r['p95']:6.1f} ms  mean {r['mean']:6.1f} ms  "
              f"| KV reuse {r['kv_reuse']:.1%}  cache hits {r['cache_hits']:.1%}  model runs {r['model_runs']}"
              f"  of {r['requests']} requests")


if __name__ == "__main__":
    main()
