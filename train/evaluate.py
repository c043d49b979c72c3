"""`codellm-train eval BUNDLE`: held-out loss, line completion, and syntax of generated scripts.

Line completion follows the CodeXGLUE protocol: held-out files are cut at line starts and at random
mid-line points; the target is the rest of the line; greedy decoding with the real suffix. EM is
whitespace-split equality, ES the Levenshtein similarity (0-100). Beside it: the repeat-previous-line
baseline and the same model without the suffix.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import msgpack
import torch

from codellm.bundle import CARD_FILE, load_bundle
from codellm.device import choose_device
from codellm.engine import Engine

from .corpus import read_records
from .recipe import ENGLISH_FILE, SHELL_FILE

SCRIPT_PROMPTS = [
    "Back up the home directory to a dated tar archive",
    "Delete log files older than seven days",
    "Check that a list of hosts answer to ping",
    "Rename every .jpeg file in a folder to .jpg",
    "Print the ten largest files under a directory",
    "Install the packages listed in requirements.txt",
    "Wait until a TCP port is open, with a timeout",
    "Rotate a log file and compress the old copy",
    "Count lines of code per file extension",
    "Create a user account if it does not exist",
    "Show disk usage and warn when above 90 percent",
    "Download a list of URLs with retries",
    "Start, stop or restart a service from its pid file",
    "Convert all WAV files to MP3",
    "Sync a folder to a remote server with rsync",
    "Parse command line options with getopts",
    "Run the test suite and report failures",
    "Find duplicate files by checksum",
    "Build a project and copy the result to a release folder",
    "Monitor memory usage every five seconds",
]


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def edit_similarity(pred: str, target: str) -> float:
    pred, target = pred.strip(), target.strip()
    if not pred and not target:
        return 100.0
    return 100.0 * (1 - levenshtein(pred, target) / max(len(pred), len(target)))


def exact_match(pred: str, target: str) -> bool:
    return pred.split() == target.split()


def bash_parses(text: str) -> bool:
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        f.write(text)
    try:
        return subprocess.run(["bash", "-n", f.name], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False
    finally:
        os.unlink(f.name)


def shellcheck_errors(text: str) -> bool | None:
    """True if shellcheck finds an error, None where shellcheck is not installed."""
    exe = shutil.which("shellcheck")
    if not exe:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        f.write(text if text.startswith("#!") else "#!/bin/bash\n" + text)
    try:
        return subprocess.run([exe, "-S", "error", f.name], capture_output=True, timeout=30).returncode != 0
    finally:
        os.unlink(f.name)


def cut_points(files: list[str], n: int, rng: random.Random) -> list[dict]:
    """n cut points, half at line starts and half mid-line, over lines with something to predict."""
    candidates = []
    for fi, text in enumerate(files):
        offset = 0
        for line in text.split("\n"):
            if line.strip() and not line.lstrip().startswith("#") and len(line) < 300:
                candidates.append((fi, offset, line))
            offset += len(line) + 1
    rng.shuffle(candidates)
    points = []
    for k, (fi, offset, line) in enumerate(candidates[:n]):
        text = files[fi]
        indent = len(line) - len(line.lstrip())
        if k % 2 == 0:  # line start: after the indentation, as a person would be
            col, kind = indent, "line_start"
        else:
            if len(line.strip()) < 4:
                continue
            col, kind = rng.randint(indent + 1, len(line) - 1), "mid_line"
        cut = offset + col
        end = offset + len(line)
        prev_lines = text[:offset].rstrip("\n").split("\n")
        previous = next((l for l in reversed(prev_lines) if l.strip()), "")
        points.append({"file": fi, "kind": kind, "prefix": text[:cut], "suffix": text[end:],
                       "target": text[cut:end], "baseline": previous[col:] if kind == "mid_line" else previous.strip()})
    return points


def line_completion(engine: Engine, files: list[str], n: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    points = cut_points(files, n, rng)
    parses = {i: bash_parses(t) for i, t in enumerate(files)}
    rows = {"fim": [], "no_suffix": [], "baseline": []}
    syntax_ok, syntax_total = 0, 0
    times = []
    for p in points:
        start = time.perf_counter()
        pred = engine.complete(p["prefix"], p["suffix"], mode="line")
        times.append(time.perf_counter() - start)
        plain = engine.complete(p["prefix"], "", mode="line")
        for name, guess in (("fim", pred), ("no_suffix", plain), ("baseline", p["baseline"])):
            rows[name].append((p["kind"], exact_match(guess, p["target"]), edit_similarity(guess, p["target"])))
        if parses[p["file"]]:
            syntax_total += 1
            syntax_ok += bash_parses(p["prefix"] + pred + p["suffix"])
    result = {}
    for name, items in rows.items():
        result[name] = {}
        for kind in ("all", "line_start", "mid_line"):
            sel = [r for r in items if kind == "all" or r[0] == kind]
            if sel:
                result[name][kind] = {"em": round(100 * sum(r[1] for r in sel) / len(sel), 1),
                                      "es": round(sum(r[2] for r in sel) / len(sel), 1), "n": len(sel)}
    result["syntax_kept_parseable"] = round(100 * syntax_ok / max(1, syntax_total), 1)
    times.sort()
    result["latency_ms"] = {"p50": round(1000 * times[len(times) // 2], 1),
                            "p95": round(1000 * times[int(len(times) * 0.95)], 1)} if times else {}
    return result


@torch.no_grad()
def heldout_loss(engine: Engine, texts: list[str], max_tokens: int = 60000) -> dict | None:
    """Loss per token, perplexity and bits per byte of plain left-to-right text."""
    if not texts:
        return None
    model, tok, ctx = engine.model, engine.tokenizer, engine.config.context_length
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    for text in texts:
        ids = [tok.eot_id] + tok.encode(text) + [tok.eot_id]
        for start in range(0, len(ids) - 1, ctx):
            chunk = torch.tensor([ids[start:start + ctx + 1]], device=engine.device)
            if chunk.shape[1] < 2:
                continue
            logits = model(chunk[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum")
            total_nats += float(loss)
            total_tokens += chunk.shape[1] - 1
        total_bytes += len(text.encode()) + 1
        if total_tokens >= max_tokens:
            break
    per_token = total_nats / total_tokens
    return {"loss": round(per_token, 4), "perplexity": round(math.exp(per_token), 2),
            "bits_per_byte": round(total_nats / math.log(2) / total_bytes, 4), "tokens": total_tokens}


def whole_scripts(engine: Engine, n: int, seed: int = 0) -> dict:
    results = []
    for i, description in enumerate((SCRIPT_PROMPTS * (1 + n // len(SCRIPT_PROMPTS)))[:n]):
        prompt = f"#!/bin/bash\n# {description}\n"
        body = engine.generate(prompt, max_new_tokens=400, temperature=0.6, top_k=40, top_p=0.95, seed=seed + i)
        finished = len(engine.tokenizer.encode(body)) < 400
        script = prompt + (body if finished else body[: body.rfind("\n") + 1])
        results.append({"parses": bash_parses(script), "shellcheck_error": shellcheck_errors(script),
                        "finished": finished, "script": script})
    checked = [r for r in results if r["shellcheck_error"] is not None]
    return {
        "n": len(results),
        "bash_n_pass": round(100 * sum(r["parses"] for r in results) / max(1, len(results)), 1),
        "shellcheck_pass": round(100 * sum(not r["shellcheck_error"] for r in checked) / len(checked), 1)
        if checked else None,
        "ended_by_model": round(100 * sum(r["finished"] for r in results) / max(1, len(results)), 1),
        "examples": [r["script"] for r in results[:3]],
    }


def evaluate(bundle_path: Path, corpus: Path, samples: int = 400, scripts: int = 20, device: str | None = None) -> dict:
    engine = Engine(load_bundle(bundle_path, device=choose_device(device)), device)
    val_shell = [r["text"] for r in read_records(corpus / SHELL_FILE) if r.get("split") == "val"] \
        if (corpus / SHELL_FILE).exists() else []
    val_english = [r["text"] for r in read_records(corpus / ENGLISH_FILE) if r.get("split") == "val"] \
        if (corpus / ENGLISH_FILE).exists() else []
    if not val_shell:
        raise ValueError(f"{corpus}: no held-out shell files (split 'val') to evaluate on")
    start = time.time()
    results = {
        "bundle": str(bundle_path),
        "heldout_files": len(val_shell),
        "shell_loss": heldout_loss(engine, val_shell),
        "english_loss": heldout_loss(engine, val_english, max_tokens=30000),
        "line_completion": line_completion(engine, val_shell, samples),
        "whole_scripts": whole_scripts(engine, scripts) if scripts else None,
    }
    results["seconds"] = round(time.time() - start, 1)
    return results


def print_table(r: dict) -> None:
    print(f"held-out shell files: {r['heldout_files']}")
    for name in ("shell_loss", "english_loss"):
        if r[name]:
            v = r[name]
            print(f"{name:14s} loss {v['loss']:.3f}  perplexity {v['perplexity']:.1f}  bits/byte {v['bits_per_byte']:.3f}"
                  f"  ({v['tokens']} tokens)")
    lc = r["line_completion"]
    print(f"{'line completion':22s} {'all EM/ES':>14s} {'line start EM/ES':>18s} {'mid-line EM/ES':>16s}")
    for name in ("fim", "no_suffix", "baseline"):
        cells = [f"{lc[name][k]['em']:5.1f} / {lc[name][k]['es']:4.1f}" if k in lc[name] else "-"
                 for k in ("all", "line_start", "mid_line")]
        label = {"fim": "model (with suffix)", "no_suffix": "model (no suffix)", "baseline": "repeat previous line"}[name]
        print(f"{label:22s} {cells[0]:>14s} {cells[1]:>18s} {cells[2]:>16s}")
    print(f"files that parse again with the predicted line in place (of those that parse): "
          f"{lc['syntax_kept_parseable']}%   "
          f"latency p50 {lc['latency_ms'].get('p50')} ms, p95 {lc['latency_ms'].get('p95')} ms")
    ws = r.get("whole_scripts")
    if ws:
        print(f"generated scripts: {ws['n']}, bash -n pass {ws['bash_n_pass']}%, shellcheck -S error pass "
              f"{ws['shellcheck_pass']}%, ended by the model {ws['ended_by_model']}%")


def write_into_card(bundle_path: Path, results: dict) -> None:
    card_path = bundle_path / CARD_FILE
    card = msgpack.unpackb(card_path.read_bytes(), raw=False)
    card["eval"] = {k: v for k, v in results.items() if k != "bundle"}
    tmp = card_path.with_suffix(".tmp")
    tmp.write_bytes(msgpack.packb(card, use_bin_type=True))
    os.replace(tmp, card_path)


def main(args) -> None:
    torch.manual_seed(0)
    results = evaluate(args.bundle, args.corpus, args.samples, args.scripts, args.device)
    print_table(results)
    out = args.out or args.bundle.with_name(args.bundle.name + "-eval.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"results written to {out}")
    if not args.no_card:
        write_into_card(args.bundle, results)
