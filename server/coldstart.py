"""`python -m codellm.server.coldstart`: how long an editor waits, from starting `codellm-serve` over stdio,
for its first suggestion. A real LSP client starts the server, initialises, opens a script and asks for
an inline completion at once; reported per run: the `initialize` answer and the first suggestion, in
seconds since the server process was started, whether the bundle's start file was there (the first start
of a bundle writes it, codellm.kernel_engine) and which engine gave it; then the medians of first and
later starts."""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from lsprotocol import types

from codellm.bundle_files import bundle_digest
from codellm.defaults import bundle_arg, default_bundle_path
from codellm.kernel_engine import start_file
from codellm.loadgen import BackgroundLoad, background_count, run_bench
from pygls.lsp.client import LanguageClient

from .spawn import start_server, stop_server

SCRIPT = "#!/bin/bash\n# archive the reports of the day\nset -euo pipefail\n\nSRC=/srv/reports\nDEST=/backup\n\n"
TYPED = "tar -czf \"$DEST/reports-$(date +%F).tar.gz\" "


async def first_suggestion(server_args: list[str]) -> dict:
    client = LanguageClient("codellm-coldstart", "1")
    client.feature(types.WINDOW_SHOW_MESSAGE)(lambda params: None)  # a missing model: codellm/status says it
    start = time.perf_counter()
    try:
        await start_server(client, server_args)
    except RuntimeError as exc:  # the server's own words say why: no traceback of this client's
        raise SystemExit(f"coldstart: {exc}") from None
    initialized = time.perf_counter() - start
    uri = "file:///coldstart/archive.sh"
    text = SCRIPT + TYPED
    client.text_document_did_open(types.DidOpenTextDocumentParams(text_document=types.TextDocumentItem(
        uri=uri, language_id="shellscript", version=1, text=text)))
    lines = text.split("\n")
    result = await asyncio.wait_for(client.text_document_inline_completion_async(types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=types.Position(line=len(lines) - 1, character=len(lines[-1])),
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked))), 120)
    answered = time.perf_counter() - start
    items = result.items if result and not isinstance(result, list) else (result or [])
    # which engine gave it: torch takes over a second or more after a start without it
    status = await asyncio.wait_for(client.protocol.send_request_async("codellm/status", None), 30)
    await stop_server(client)
    if status.model_error:  # no model: the time measured would be that of an empty answer
        raise SystemExit(f"coldstart: the server loaded no model: {status.model_error}")
    return {"initialize": initialized, "first": answered, "text": items[0].insert_text if items else "",
            "without_torch": "without torch" in (status.decode_steps or "")}


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of 1 or more, not {value!r}")
    return int(value)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m codellm.server.coldstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="bundle (default: the shipped model)")
    parser.add_argument("--runs", type=positive_int, default=5, help="server starts measured (default 5)")
    parser.add_argument("--background", type=background_count, default=0, metavar="N",
                        help="with N busy processes running (codellm.loadgen)")
    args = parser.parse_args(argv)

    server_args = (["--model", args.model] if args.model else []) + ["--min-confidence", "0", "--cut-confidence", "0"]
    start = start_file(bundle_digest(bundle_arg(args.model) if args.model else default_bundle_path()) or "")
    runs = []
    with BackgroundLoad(args.background):
        for _ in range(args.runs):
            first_start = not start.is_file()
            r = {**asyncio.run(first_suggestion(server_args)), "first_start": first_start}
            runs.append(r)
            print(f"  initialize answered {r['initialize']:5.2f} s, first suggestion {r['first']:5.2f} s "
                  f"({'no start file yet' if first_start else 'start file there'}; "
                  f"{'C step without torch' if r['without_torch'] else 'torch engine'}; {r['text'][:40]!r})",
                  flush=True)
    for first_start, how in ((True, "with no start file yet"), (False, "with the start file there")):
        kind = [r for r in runs if r["first_start"] == first_start]
        if kind:
            print(f"median of {len(kind)} {how}: initialize {statistics.median(r['initialize'] for r in kind):.2f} s, "
                  f"first suggestion {statistics.median(r['first'] for r in kind):.2f} s after the server was started")


if __name__ == "__main__":
    run_bench(main)
