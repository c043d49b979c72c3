"""`python -m codellm.train.server_bench`: type shell scripts into a real stdio server keystroke by keystroke,
asking for an inline completion after each, as an editor does; reports end-to-end latency (p50/p95),
KV reuse and cache hits, with KV reuse on and off side by side.

Scripts come from the held-out split of a corpus (never trained on) or from a folder.

`--typing` measures instead what the suggestions are worth (codellm.server.keystrokes): held-out regions
typed character by character, a suggestion taken with one keystroke when it is what comes next; keystrokes
saved, suggestions shown per 100 keystrokes and the share taken, with the confidence thresholds off and at
their defaults, and with `--curve PNG` over a grid of thresholds.
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

from codellm.loadgen import background_count, run_bench
from codellm.server import keystrokes
from codellm.server.service import Settings
from codellm.server.spawn import start_server, stop_server

from .corpus import read_texts
from .recipe import SHELL_FILE


def heldout_scripts(corpus: Path, split: str = "val") -> list[str]:
    """The texts of a corpus's held-out split."""
    return read_texts(corpus / SHELL_FILE, split)


def folder_scripts(folder: Path) -> list[str]:
    """The texts of a folder's *.sh files: regular files only (a FIFO would never end), and only those
    with something to type."""
    texts = [p.read_text(errors="replace") for p in sorted(folder.glob("*.sh")) if p.is_file()]
    return [t for t in texts if t.strip()]


def load_scripts(corpus: Path | None, folder: Path | None, count: int) -> list[str]:
    if folder:
        return folder_scripts(folder)[:count]
    texts = [t for t in heldout_scripts(corpus) if 20 < t.count("\n") < 3000]
    random.Random(0).shuffle(texts)
    return texts[:count]


async def type_scripts(server_args: list[str], scripts: list[str], keystrokes: int, options: dict,
                       debounce_ms: float = 0, rest_ms: float = 0, warm: bool = True) -> dict:
    """Each keystroke: a didChange, `debounce_ms` later (the wait an editor leaves before it asks: VS Code
    50 ms) an inline completion request, timed until its answer. With `rest_ms`, each script is opened,
    the cursor put where typing starts and told to the server (codellm/cursor, as the VS Code and Neovim
    configs do) `rest_ms` before the first keystroke. `warm`: typing starts once the server reads prompts
    with PyTorch (its first seconds answer from the start file while torch loads: codellm.server.coldstart
    measures those)."""
    client = LanguageClient("codellm-bench", "1")
    try:
        await start_server(client, server_args, options)
    except RuntimeError as exc:  # the server's own words say why: no traceback of this client's
        raise SystemExit(f"server_bench: {exc}") from None
    if warm:
        await until_torch_serves(client)
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
        if rest_ms:
            client.protocol.notify("codellm/cursor", {"textDocument": {"uri": uri},
                                                      "position": {"line": line, "character": char}})
            await asyncio.sleep(rest_ms / 1000)
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
            if debounce_ms:
                await asyncio.sleep(debounce_ms / 1000)
            t0 = time.perf_counter()
            await asyncio.wait_for(client.text_document_inline_completion_async(types.InlineCompletionParams(
                text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line=line, character=char),
                context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic))), 60)
            latencies.append(time.perf_counter() - t0)
    status = await client.protocol.send_request_async("codellm/status", None)
    await stop_server(client)
    latencies.sort()
    return {"requests": len(latencies), "p50": 1000 * latencies[len(latencies) // 2],
            "p95": 1000 * latencies[int(len(latencies) * 0.95)], "mean": 1000 * statistics.fmean(latencies),
            "kv_reuse": status.kv_reuse_ratio, "cache_hits": status.cache_hit_rate, "model_runs": status.model_runs,
            "server_p50": status.latency_ms.p50, "deadline_hits": getattr(status, "deadline_hits", None),
            "joined_prefetch": status.joined_prefetch, "line_rests": status.line_rests,
            "lines_cut": status.lines_cut, "over_1s": sum(t > 1.0 for t in latencies)}


async def until_torch_serves(client: LanguageClient, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await client.protocol.send_request_async("codellm/status", None)
        if status.decode_steps and "without torch" not in status.decode_steps:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the server did not load torch within {timeout:g} s")


# --background rows: (name, --threads, settings besides the defaults); "whole lines": no lineMs cut
LOAD_ROWS = (("default", None, {}), ("whole lines", None, {"lineMs": 600_000}), ("1 thread", 1, {}),
             ("2 threads", 2, {}))


def load_main(args, scripts, server_args) -> None:
    """--background N: idle and loaded side by side (LOAD_ROWS: the defaults, lines not cut by lineMs,
    1 and 2 threads; KV reuse on)."""
    from codellm.loadgen import BackgroundLoad, described, label

    print(f"machine: {platform.machine()}, typing {args.keystrokes} keystrokes over {len(scripts)} "
          f"{'' if args.scripts_dir else 'held-out '}"
          f"scripts; idle vs {described(args.background)}; each request {args.debounce_ms:g} ms "
          f"after its keystroke, prefetch {'off' if args.no_prefetch else 'on'}, {rest_label(args.cursor_rest_ms)}, "
          f"{start_label(args.warm)}")
    options = {"kvReuse": True, "prefetch": "never" if args.no_prefetch else "auto"}
    for row, threads, settings in LOAD_ROWS:
        for n in (0, args.background):
            extra = ["--threads", str(threads)] if threads else []
            with BackgroundLoad(n):
                r = asyncio.run(type_scripts(server_args + extra, scripts, args.keystrokes, {**options, **settings},
                                             args.debounce_ms, args.cursor_rest_ms, args.warm))
            name = f"{row}, {label(n)}"
            print(f"  {name:24s} end-to-end p50 {r['p50']:6.1f} ms  p95 {r['p95']:6.1f} ms  mean {r['mean']:6.1f} ms"
                  f"  | deadline hits {r['deadline_hits']}  answers over 1 s {r['over_1s']}  KV reuse {r['kv_reuse']:.1%}  "
                  f"lines cut {r['lines_cut']} (rest decoded {r['line_rests']})  model runs {r['model_runs']} of {r['requests']} requests", flush=True)


def rest_label(rest_ms: float) -> str:
    return f"cursor told {rest_ms:g} ms before each script's first keystroke" if rest_ms else "no cursor rest told"


def start_label(warm: bool) -> str:
    return "typing once torch serves" if warm else "typing from the server's start"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m codellm.train.server_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="bundle (default: the shipped model)")
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus"), help="corpus with a held-out split")
    parser.add_argument("--scripts-dir", type=Path, default=None, help="a folder of .sh files instead")
    parser.add_argument("--scripts", type=int, default=8, help="held-out scripts typed (default 8)")
    parser.add_argument("--keystrokes", type=int, default=600,
                        help="keystrokes typed (with --typing: characters of regions per split)")
    parser.add_argument("--server-log", default=None,
                        help="the servers' log file: one line per completion with its source, mode and time")
    parser.add_argument("--typing", action="store_true",
                        help="the keystroke evaluation: keystrokes saved and suggestions taken, per held-out split")
    parser.add_argument("--splits", default="val,val_user", help="with --typing: the held-out splits to type")
    parser.add_argument("--curve", type=Path, default=None,
                        help="with --typing: also sweep the thresholds and draw taken-of-shown against "
                             "keystrokes saved into this PNG")
    parser.add_argument("--threads", type=int, default=None, help="the server's CPU threads")
    parser.add_argument("--background", type=background_count, default=0, metavar="N",
                        help="type with the server idle and with N busy processes running (started and ended "
                             "by the bench), side by side, for the default thread count, 1 and 2 threads")
    parser.add_argument("--file-context", action=argparse.BooleanOptionalAction, default=True,
                        help="the server shows context from other files, as by default (the scripts typed before "
                             "stay open, so each later one gets context from them); --no-file-context: none")
    parser.add_argument("--json", type=Path, default=None, help="with --typing: write every figure here")
    parser.add_argument("--debounce-ms", type=float, default=0, metavar="MS",
                        help="wait this long after each keystroke before asking, as editors do (VS Code: 50); "
                             "with it, the figures with prefetch on and off are shown side by side")
    parser.add_argument("--cursor-rest-ms", type=float, default=250, metavar="MS",
                        help="the cursor is told to the server (codellm/cursor) this long before the first keystroke "
                             "of each script, as the VS Code extension tells it 150 ms after a click (default 250: "
                             "the 0.4 s a hand takes from mouse to keys in the Keystroke-Level Model of Card, Moran "
                             "and Newell 1980, less those 150 ms); 0: never, as in Helix")
    parser.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True,
                        help="typing starts once the server reads prompts with PyTorch (default); --no-warm: from "
                             "its first second, while it answers from the start file and imports torch beside "
                             "(python -m codellm.server.coldstart measures the first suggestion)")
    parser.add_argument("--no-prefetch", action="store_true",
                        help="with --background: the server does not start suggestions before it is asked")
    args = parser.parse_args(argv)
    if args.background and args.typing:
        parser.error("--background measures latency; --typing measures keystrokes saved: give one of them")
    if args.background and args.threads:
        parser.error("--background already types with the default threads, 1 and 2: leave out --threads")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.typing:
        typing_main(args)
        return
    scripts = load_scripts(args.corpus, args.scripts_dir, args.scripts)
    if not scripts:
        sys.exit("no scripts to type: give --corpus with a held-out split or --scripts-dir")
    server_args = (["--model", args.model] if args.model else []) + \
        (["--log-file", args.server_log] if args.server_log else []) + ([] if args.file_context else ["--no-file-context"])
    if args.background:
        load_main(args, scripts, server_args)
        return
    server_args += ["--threads", str(args.threads)] if args.threads else []
    print(f"machine: {platform.machine()}, typing {args.keystrokes} keystrokes over {len(scripts)} "
          f"{'' if args.scripts_dir else 'held-out '}"
          f"scripts, one inline completion request {args.debounce_ms:g} ms after each; context from other files "
          f"{'on' if args.file_context else 'off'}; {rest_label(args.cursor_rest_ms)}; {start_label(args.warm)}")
    rows = [("KV reuse on", {"kvReuse": True}), ("KV reuse off", {"kvReuse": False})]
    if args.debounce_ms:
        rows.insert(1, ("prefetch off", {"kvReuse": True, "prefetch": "never"}))
    for label, options in rows:
        r = asyncio.run(type_scripts(server_args, scripts, args.keystrokes, options, args.debounce_ms,
                                     args.cursor_rest_ms, args.warm))
        print(f"  {label:13s} end-to-end p50 {r['p50']:6.1f} ms  p95 {r['p95']:6.1f} ms  mean {r['mean']:6.1f} ms  "
              f"| KV reuse {r['kv_reuse']:.1%}  cache hits {r['cache_hits']:.1%}  model runs {r['model_runs']}"
              f"  of {r['requests']} requests")


def typing_main(args) -> None:
    import json
    server_args = (["--model", args.model] if args.model else []) + \
        (["--threads", str(args.threads)] if args.threads else []) + \
        (["--log-file", args.server_log] if args.server_log else [])
    defaults = keystrokes.thresholds(Settings().cut_confidence, Settings().min_confidence)
    off = keystrokes.thresholds(0.0, 0.0)
    results, curves = {}, {}
    for split in args.splits.split(","):
        if args.scripts_dir:
            texts = folder_scripts(args.scripts_dir)
        else:
            texts = heldout_scripts(args.corpus, split)
        regions = keystrokes.pick_regions(texts, args.keystrokes)
        if not regions:
            sys.exit(f"no regions to type in split {split}: give --corpus with held-out splits or --scripts-dir")
        print(f"== {split}: {len(regions)} regions, {sum(len(r.text) for r in regions)} characters")
        rows = keystrokes.run_measure(server_args, regions, [off, defaults])
        for row in rows:
            label = "thresholds off" if row["settings"] == off else f"defaults {defaults}"
            print(keystrokes.format_row(label, row))
        results[split] = rows
        if args.curve:
            curves[split] = keystrokes.run_measure(server_args, regions, keystrokes.curve_settings(), ("whole",))
            for row in curves[split]:
                print(keystrokes.format_row(str(row["settings"]), row))
        if args.scripts_dir:
            break
    if args.curve:
        keystrokes.plot_curve(curves, args.curve, defaults)
        print(f"curve written to {args.curve}")
    if args.json:
        args.json.write_text(json.dumps({"typed": results, "curve": curves}, indent=2))


if __name__ == "__main__":
    run_bench(main)
