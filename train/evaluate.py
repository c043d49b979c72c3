"""`codellm-train eval BUNDLE`: held-out loss, line completion, and syntax of generated scripts.

Line completion follows the CodeXGLUE protocol: held-out files are cut at line starts and at random
mid-line points (drawn per line from a hash of its file and place, so that corpora built on different days
share the points of the files they share); the target is the rest of the line; greedy decoding with the
real suffix. EM is
whitespace-split equality, ES the Levenshtein similarity (0-100). Beside it: the repeat-previous-line
baseline and the same model without the suffix.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import msgpack
import torch

from codellm import crossfile, shell
from codellm.bundle import CARD_FILE, load_bundle
from codellm.device import choose_device
from codellm.engine import Engine
from codellm.shell import bash_parses

from .atomic_write import write_bytes
from .corpus import USER_HELDOUT, read_records, read_texts
from .pairs import command_name
from .recipe import ENGLISH_FILE, PAIRS_FILE, SHELL_FILE

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


def cut_points(files: list[str], n: int, seed: int = 0) -> list[dict]:
    """Up to n cut points, about half at line starts and half mid-line, over lines with something to predict.

    Each line's rank, kind and column come from a hash of (seed, its file's text, its offset), not from
    one shuffle of all lines: a file added to or dropped from the split changes only its own points, so
    figures of corpora built on different days are measured on the same lines where the files agree."""
    ranked = []
    for fi, text in enumerate(files):
        digest = hashlib.sha256(text.encode()).hexdigest()
        offset = 0
        for line in text.split("\n"):
            if line.strip() and not line.lstrip().startswith("#") and len(line) < 300:
                key = hashlib.sha256(f"{seed}:{digest}:{offset}".encode()).digest()
                ranked.append((key, fi, offset, line))
            offset += len(line) + 1
    ranked.sort()
    points = []
    for key, fi, offset, line in ranked:
        if len(points) == n:
            break
        indent = len(line) - len(line.lstrip())
        if key[-1] % 2 == 0:  # line start: after the indentation, as a person would be
            col, kind = indent, "line_start"
        elif len(line.strip()) >= 4:
            col, kind = indent + 1 + int.from_bytes(key[-9:-1], "big") % (len(line) - 1 - indent), "mid_line"
        else:
            continue
        points.append(cut_point(files[fi], fi, offset, line, col, kind))
    return points


def cut_point(text: str, fi: int, offset: int, line: str, col: int, kind: str) -> dict:
    """The completion task of cutting `line` (at `offset` of file `fi`, text `text`) at column `col`, with
    the repeat-previous-line baseline's guess."""
    cut, end = offset + col, offset + len(line)
    prev_lines = text[:offset].rstrip("\n").split("\n")
    previous = next((l for l in reversed(prev_lines) if l.strip()), "")
    return {"file": fi, "kind": kind, "prefix": text[:cut], "suffix": text[end:], "target": text[cut:end],
            "baseline": previous[col:] if kind == "mid_line" else previous.strip()}


def line_completion(engine: Engine, files: list[str], n: int, seed: int = 0) -> dict:
    points = cut_points(files, n, seed)
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
    # per cut point, for comparing two bundles point by point (the points depend only on the files)
    result["es_per_point"] = [round(r[2], 1) for r in rows["fim"]]
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
        # script by script (1 pass, 0 fail), for comparing two bundles on the same prompts and seeds
        "per_script": {"bash_n_pass": [100 * r["parses"] for r in results],
                       "shellcheck_pass": [100 * (not r["shellcheck_error"]) for r in results]
                       if len(checked) == len(results) else None},
    }


HELDOUT_SPLITS = {"val": "Debian packages", "val_user": "npm/PyPI packages"}
WHOLE_SCRIPT_SHARES = {"bash_n_pass": "whole scripts bash -n %", "shellcheck_pass": "whole scripts shellcheck-clean %"}


def comment_to_command(engine: Engine, pairs: list[str], n: int = 300, seed: int = 0) -> dict | None:
    """After `#!/bin/bash\n# <description>\n`, the greedy first line as served (engine.complete, which
    starts code after a comment: code_expected): the share that is a command (not a comment, not empty) and
    the share whose command name (pairs.command_name) is the held-out one's. `model_command_share` is the
    model's own choice, without that rule: the share of plain greedy continuations whose first line with
    text is not a comment."""
    if not pairs or n <= 0:
        return None
    picked = random.Random(seed).sample(pairs, min(n, len(pairs)))
    command, right_name, own = 0, 0, 0
    for doc in picked:
        prompt, target = doc.rstrip("\n").rsplit("\n", 1)
        guess = engine.complete(prompt + "\n", "", mode="line").split("\n", 1)[0]
        is_command = bool(guess.strip()) and not guess.lstrip().startswith("#")
        command += is_command
        right_name += is_command and command_name(guess) == command_name(target)
        plain = engine.generate(prompt + "\n", max_new_tokens=24, temperature=0)
        first = next((line for line in plain.split("\n") if line.strip()), "")
        own += bool(first) and not first.lstrip().startswith("#")
    return {"n": len(picked), "command_share": round(100 * command / len(picked), 1),
            "right_command_share": round(100 * right_name / len(picked), 1),
            "model_command_share": round(100 * own / len(picked), 1)}


def block_openers(files: list[str], n: int, rng: random.Random) -> list[str]:
    """Prefixes of held-out files that end right after a line opening a block (`for ...; do`, `if ...;
    then`, `name() {`) which is the only block open there, so the completion alone must close it."""
    found = []
    for text in files:
        lines = text.split("\n")
        for k, line in enumerate(lines[:-1]):
            if shell.opens_block(line) and len(line.strip()) > 2:
                prefix = "\n".join(lines[:k + 1]) + "\n"
                if len(shell.open_blocks(prefix)) == 1 and not shell.open_blocks(prefix[:-len(line) - 1]):
                    found.append(prefix)
    return rng.sample(found, min(n, len(found)))


def block_completion(engine: Engine, files: list[str], n: int = 100, seed: int = 0) -> dict | None:
    """Block-mode completions typed at the end of a held-out file cut right after a block opener: the share
    with a body (a command line before the block's closer) and the share where prefix + completion passes
    `bash -n` (the block is closed and what is inside parses)."""
    prefixes = block_openers(files, n, random.Random(seed))
    if not prefixes:
        return None
    body, parses = 0, 0
    for prefix in prefixes:
        guess = engine.complete(prefix, "", mode="block")
        lines = [ln.strip() for ln in guess.split("\n") if ln.strip() and not ln.strip().startswith("#")]
        body += bool(lines) and not re.match(r"(fi|done|esac|\}|;;)\b", lines[0])
        parses += bash_parses(prefix + guess + "\n")
    return {"n": len(prefixes), "with_body": round(100 * body / len(prefixes), 1),
            "bash_n_pass": round(100 * parses / len(prefixes), 1)}
# ------------------------------------------------------------------ context from other files

def package_files(records: list[dict]) -> dict[str, dict[str, str]]:
    """Held-out records grouped by package: source -> {absolute path in the package: text}."""
    packages: dict[str, dict[str, str]] = {}
    for r in records:
        packages.setdefault(r.get("source", ""), {})["/" + r.get("path", "").lstrip("/")] = r["text"]
    return packages


def call_points(text: str, names: set[str]) -> list[dict]:
    """Cut points at the first call of each of `names` (a line whose first word is the name, which the
    text above it never mentions, so only another file can tell it): at the start of the name
    ("call_start") and after its first three characters ("call_mid", as when a person has begun typing
    it); the target is the rest of the line."""
    points, offset, mentioned = [], 0, set()
    for line in text.split("\n"):
        stripped = line.lstrip()
        word = re.match(r"[A-Za-z_][\w:.-]*", stripped)
        name = word.group(0) if word else ""
        if name in names and name not in mentioned and len(line) < 300 \
                and not re.match(r"(function\s)?[\w:.-]+\s*\(\s*\)", stripped):
            start = offset + len(line) - len(stripped)
            for kind, typed in (("call_start", 0), ("call_mid", min(3, len(name) - 1))):
                points.append({"kind": kind, "prefix": text[:start + typed], "suffix": text[offset + len(line):],
                               "target": stripped[typed:]})
        mentioned.update(re.findall(r"[A-Za-z_][\w:.-]*", line))
        offset += len(line) + 1
    return points


def round_robin(groups: list[list[dict]], n: int) -> list[dict]:
    """Up to `n` items taken from each group in turn, so that no package's many scripts fill the sample."""
    picked, queues = [], [list(g) for g in groups if g]
    while queues and len(picked) < n:
        picked.extend(q.pop(0) for q in queues)
        queues = [q for q in queues if q]
    return picked[:n]


SIBLINGS_OPEN = 3  # other scripts of the package open in the editor beside the one typed in


def with_siblings_open(records: list[dict], n: int, seed: int = 0) -> list[dict]:
    """Up to `n` cut points (cut_points) in held-out scripts of packages of two or more files, each with
    SIBLINGS_OPEN other scripts of its package as open documents and what it sources: the context the
    server gives a person editing one script of a project beside others. The same records and seed give
    the same points, so two bundles are measured on the same cuts."""
    rng = random.Random(seed)
    points = []
    for package, files in sorted(package_files(records).items()):
        paths = sorted(files)
        for doc_path in rng.sample(paths, min(4, len(paths))) if len(paths) > 1 else []:
            others = [p for p in paths if p != doc_path]
            open_docs = [(p, files[p]) for p in rng.sample(others, min(SIBLINGS_OPEN, len(others)))]
            sourced = crossfile.read_sourced(files[doc_path], doc_path, files.get, ["/"])
            points += [{**p, "doc_path": doc_path, "sourced": sourced, "open_docs": open_docs}
                       for p in cut_points([files[doc_path]], 3, seed)]
    rng.shuffle(points)
    return points[:n]


def cross_file_points(records: list[dict], n: int = 200, others: int = 200,
                      seed: int = 0) -> tuple[dict, dict] | None:
    """The cut points of cross_file by kind ("call_start", "call_mid", "other_cuts", "open_docs"), and
    {"scripts", "packages"}: how many scripts and packages have calls; None where no held-out script
    sources a file of its package. The same records and seed give the same points, so two bundles are
    measured on the same cuts."""
    rng = random.Random(seed)
    calls: dict[str, list[dict]] = {}
    plain = []
    for package, files in sorted(package_files(records).items()):
        for doc_path, text in sorted(files.items()):
            sourced = crossfile.read_sourced(text, doc_path, files.get, ["/"])
            if not sourced:
                continue
            own = {crossfile.function_name(c.text) for c in crossfile.definitions(text, doc_path)}
            names = {crossfile.function_name(c.text) for _, t in sourced for c in crossfile.definitions(t, "")} - own
            for p in call_points(text, names):
                calls.setdefault(package, []).append({**p, "doc_path": doc_path, "sourced": sourced})
            for p in cut_points([text], max(4, others // 10), seed):
                plain.append({**p, "doc_path": doc_path, "sourced": sourced})
    if not calls:
        return None
    for points in calls.values():
        rng.shuffle(points)
    rng.shuffle(plain)
    picked = {kind: round_robin([[p for p in points if p["kind"] == kind] for points in calls.values()], n // 2)
              for kind in ("call_start", "call_mid")}
    picked["other_cuts"] = plain[:others]
    picked["open_docs"] = with_siblings_open(records, others, seed)
    return picked, {"scripts": sum(len({p["doc_path"] for p in points}) for points in calls.values()),
                    "packages": len(calls)}


def cross_file(engine: Engine, records: list[dict], n: int = 200, others: int = 200, seed: int = 0) -> dict | None:
    """Line completion where the answer needs another file: held-out scripts that source a file of their
    own package, cut at the first call of each function that file defines (and the script does not), with
    and without the sourced file's definitions as context (codellm.crossfile), same model; the sample takes
    each package in turn. Beside it, ordinary cut
    points (cut_points) in the same scripts, with and without the context, to show nothing is lost, and
    cut points in scripts with sibling scripts open (with_siblings_open); the points come from
    cross_file_points.
    EM as in line_completion; "name" is the share whose first word is the called function."""
    sample = cross_file_points(records, n, others, seed)
    if sample is None:
        return None
    picked, counts = sample
    result = {}
    for kind, points in picked.items():
        rows = {"with_context": [], "without": []}
        for p in points:
            chunks = crossfile.choose_context(p["prefix"], p["suffix"], p["sourced"], p.get("open_docs", []),
                                              p["doc_path"])
            for label, context in (("with_context", chunks), ("without", None)):
                guess = engine.complete(p["prefix"], p["suffix"], mode="line", context=context)
                rows[label].append((exact_match(guess, p["target"]), guess.split()[:1] == p["target"].split()[:1]))
        result[kind] = {label: {"em": round(100 * sum(r[0] for r in items) / max(1, len(items)), 1),
                                "first_word": round(100 * sum(r[1] for r in items) / max(1, len(items)), 1),
                                "n": len(items)} for label, items in rows.items()}
    return {**result, **counts}


# ------------------------------------------------------------------ keystroke evaluation (a real server typing)

def keystroke_figures(bundle_path: Path, texts: list[str], characters: int, device: str | None = None) -> dict:
    """Held-out regions typed into a real `codellm-serve` (codellm.server.keystrokes), with the confidence
    thresholds off and at the server's defaults, taking whole suggestions or also next words."""
    from codellm.server import keystrokes
    from codellm.server.service import Settings

    regions = keystrokes.pick_regions(texts, characters)
    defaults = keystrokes.thresholds(Settings().cut_confidence, Settings().min_confidence)
    rows = keystrokes.run_measure(keystroke_server_args(bundle_path, device), regions,
                                  [keystrokes.thresholds(0.0, 0.0), defaults])
    return {"regions": len(regions), "defaults": defaults,
            **{f"{'off' if r['settings'] != defaults else 'defaults'}_{r['policy']}": r for r in rows}}


def keystroke_server_args(bundle_path: Path, device: str | None) -> list[str]:
    return ["--model", str(bundle_path), "--threads", "1"] + (["--device", device] if device else [])


def keystroke_curve(bundle_path: Path, splits: dict[str, list[str]], characters: int, path: Path,
                    device: str | None = None) -> dict:
    """Keystrokes saved and suggestions taken over a grid of thresholds, per split, drawn into `path`."""
    from codellm.server import keystrokes
    from codellm.server.service import Settings

    curves = {split: keystrokes.run_measure(keystroke_server_args(bundle_path, device),
                                            keystrokes.pick_regions(texts, characters),
                                            keystrokes.curve_settings(), ("whole",))
              for split, texts in splits.items()}
    keystrokes.plot_curve(curves, path, keystrokes.thresholds(Settings().cut_confidence, Settings().min_confidence))
    return curves


def _keystroke_cells(k: dict | None) -> list[tuple[str, str]]:
    rows = []
    """Keystrokes saved %, suggestions shown per 100 keystrokes, shown ones taken whole %: thresholds off
    and at their defaults, taking whole suggestions, or also the next word (+word)."""
    for name, label in (("off_whole", "off"), ("defaults_whole", "defaults"), ("off_word", "off+word"),
                        ("defaults_word", "defaults+word")):
        v = (k or {}).get(name)
        rows.append((f"keys saved/shown/taken, {label}",
                     f"{v['keystrokes_saved']} / {v['shown_per_100']} / {v['taken_of_shown']}" if v else "-"))
    return rows


# ------------------------------------------------------------------ every figure

def evaluate(bundle_path: Path, corpus: Path, samples: int = 400, scripts: int = 20, device: str | None = None,
             pairs: int = 300, keystrokes: int = 0, keystroke_curve_png: Path | None = None,
             blocks: int = 100, cross_file_samples: int = 200) -> dict:
    """Every figure of one bundle, per held-out split: loss and bits per byte, line completion, the
    comment-to-command shares, completion at calls of functions from sourced files with and without
    that context (cross_file), and with keystrokes > 0 the keystroke evaluation over that many characters of
    held-out regions; plus English loss and generated whole scripts.

    Raises ValueError when the corpus has no held-out shell files."""
    if not Path(corpus).is_dir():
        raise ValueError(f"{corpus}: no such corpus folder (build one with `codellm-train corpus`)")
    engine = Engine(load_bundle(bundle_path, device=choose_device(device)), device)
    held = {split: list(read_records(corpus / SHELL_FILE, split)) for split in HELDOUT_SPLITS}
    splits = {split: [r["text"] for r in records] for split, records in held.items() if records}
    if not splits:
        raise ValueError(f"{corpus}: no held-out shell files (split 'val' or 'val_user') to evaluate on; build "
                         "the corpus with --heldout-data DIR to keep scripts of yours out of training for this")
    start = time.time()
    results = {"bundle": str(bundle_path), "splits": {}}
    for split, texts in splits.items():
        user = all(r.get("source", "").startswith(USER_HELDOUT) for r in held[split])
        results["splits"][split] = {
            "label": "your held-out scripts (--heldout-data)" if user else HELDOUT_SPLITS[split],
            "heldout_files": len(texts),
            "shell_loss": heldout_loss(engine, texts),
            "line_completion": line_completion(engine, texts, samples),
            "comment_to_command": comment_to_command(engine, read_texts(corpus / PAIRS_FILE, split), pairs),
            "block_completion": block_completion(engine, texts, blocks),
            "cross_file": cross_file(engine, held[split], cross_file_samples,
                                     cross_file_samples) if cross_file_samples else None,
        }
        if keystrokes:
            results["splits"][split]["keystrokes"] = keystroke_figures(bundle_path, texts, keystrokes, device)
    if keystrokes and keystroke_curve_png:
        results["keystroke_curve"] = keystroke_curve(bundle_path, splits, keystrokes, keystroke_curve_png, device)
    results["english_loss"] = heldout_loss(engine, read_texts(corpus / ENGLISH_FILE, "val"), max_tokens=30000)
    results["whole_scripts"] = whole_scripts(engine, scripts) if scripts else None
    results["seconds"] = round(time.time() - start, 1)
    return results


def _cells(r: dict) -> list[tuple[str, str]]:
    """(label, value) rows of one bundle's results on one split."""
    rows = []
    for name in ("shell_loss",):
        v = r[name]
        rows.append(("shell loss / bits per byte", f"{v['loss']:.3f} / {v['bits_per_byte']:.3f}" if v else "-"))
    lc = r["line_completion"]
    for name, label in (("fim", "with suffix"), ("no_suffix", "no suffix"), ("baseline", "repeat prev. line")):
        for kind in ("all", "line_start", "mid_line"):
            v = lc[name].get(kind)
            rows.append((f"line EM/ES {label}, {kind.replace('_', ' ')}", f"{v['em']:.1f} / {v['es']:.1f}" if v else "-"))
    rows.append(("buffers still parsing %", f"{lc['syntax_kept_parseable']}"))
    c2c = r.get("comment_to_command")
    rows.append(("comment -> command % / right name %",
                 f"{c2c['command_share']} / {c2c['right_command_share']} (n={c2c['n']})" if c2c else "-"))
    own = (c2c or {}).get("model_command_share")  # results written before it have none
    rows.append(("  the model's own choice: command %", f"{own}" if own is not None else "-"))
    blk = r.get("block_completion")
    rows.append(("block after opener: body % / bash -n %",
                 f"{blk['with_body']} / {blk['bash_n_pass']} (n={blk['n']})" if blk else "-"))
    xf = r.get("cross_file")
    for kind, label in (("call_start", "at the call"), ("call_mid", "3 chars typed"), ("other_cuts", "other cuts"),
                        ("open_docs", "siblings open")):
        v = (xf or {}).get(kind)
        rows.append((f"cross-file EM/1st word {label}, +ctx / -ctx",
                     f"{v['with_context']['em']}/{v['with_context']['first_word']} / "
                     f"{v['without']['em']}/{v['without']['first_word']} (n={v['with_context']['n']})" if v else "-"))
    if "keystrokes" in r:
        rows += _keystroke_cells(r["keystrokes"])
    return rows


def print_table(all_results: list[dict]) -> None:
    """One table per held-out split, a column per bundle, so bundles compare in one run."""
    names = [Path(r["bundle"]).name or r["bundle"] for r in all_results]
    cells = [value for r in all_results for p in r["splits"].values() if p for _, value in _cells(p)]
    width = max(18, *(len(n) + 2 for n in names), *(len(c) + 2 for c in cells))  # columns never run together
    for split, label in HELDOUT_SPLITS.items():
        present = [r["splits"].get(split) for r in all_results]
        if not any(present):
            continue
        files = next(p["heldout_files"] for p in present if p)
        label = next(p.get("label", label) for p in present if p)
        print(f"\n== held-out split {split} ({label}, {files} file{'s' if files != 1 else ''})")
        print(f"{'':40s}" + "".join(f"{n:>{width}s}" for n in names))
        columns = [dict(_cells(p)) if p else {} for p in present]
        for key in dict(_cells(next(p for p in present if p))):
            print(f"{key:40s}" + "".join(f"{c.get(key, '-'):>{width}s}" for c in columns))
    print("\n== every split")
    rows = {
        "English loss / bits per byte": [f"{r['english_loss']['loss']:.3f} / {r['english_loss']['bits_per_byte']:.3f}"
                                         if r["english_loss"] else "-" for r in all_results],
        "whole scripts bash -n %": [f"{r['whole_scripts']['bash_n_pass']}" if r["whole_scripts"] else "-"
                                    for r in all_results],
        "whole scripts shellcheck-clean %": [f"{r['whole_scripts']['shellcheck_pass']}" if r["whole_scripts"] else "-"
                                             for r in all_results],
    }
    print(f"{'':40s}" + "".join(f"{n:>{width}s}" for n in names))
    for key, values in rows.items():
        print(f"{key:40s}" + "".join(f"{v:>{width}s}" for v in values))


def paired_difference(new: list[float], old: list[float], resamples: int = 2000, seed: int = 0) -> dict | None:
    """The mean of new[i] - old[i] over paired measurements (the same cut points, two bundles) and its 95%
    percentile bootstrap interval (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993): an
    interval that holds 0 says the two cannot be told apart on these points. None when the lists are
    empty or of different lengths (the bundles were not measured on the same points)."""
    if not new or len(new) != len(old):
        return None
    diffs = [a - b for a, b in zip(new, old)]
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(resamples))
    return {"mean": round(sum(diffs) / len(diffs), 2), "low": round(means[int(0.025 * resamples)], 2),
            "high": round(means[int(0.975 * resamples) - 1], 2), "n": len(diffs)}


def line_es_difference(new: dict, old: dict, split: str) -> dict | None:
    """paired_difference of line ES with the suffix on `split` (new - old), None where not measured."""
    a, b = (r["splits"].get(split, {}).get("line_completion", {}).get("es_per_point") for r in (new, old))
    return paired_difference(a or [], b or [])


def whole_script_change(new: dict, old: dict, key: str) -> dict | None:
    """How the whole scripts' `key` (bash_n_pass, shellcheck_pass) changed from `old` to `new`, script by
    script over the same prompts and seeds: {"n", "fell" (scripts that pass in old only), "rose" (in new
    only), "mean" (new - old, points of %), "p_worse"}; None where not measured so. p_worse is the exact
    one-sided sign test on the scripts that differ (McNemar, Psychometrika 12, 1947, in its exact binomial
    form): the chance of at least `fell` of them falling were both bundles equally good."""
    a, b = (((r.get("whole_scripts") or {}).get("per_script") or {}).get(key) for r in (new, old))
    if not a or not b or len(a) != len(b):
        return None
    fell = sum(x < y for x, y in zip(a, b))
    rose = sum(x > y for x, y in zip(a, b))
    differ = fell + rose
    p_worse = sum(math.comb(differ, k) for k in range(fell, differ + 1)) / 2 ** differ
    return {"n": len(a), "fell": fell, "rose": rose, "mean": (sum(a) - sum(b)) / len(a), "p_worse": p_worse}


def better_on_every_split(new: dict, old: dict) -> bool:
    """True when `new` has a lower held-out shell loss than `old` on every split both were measured on,
    and neither its line completion (ES with the suffix, point by point) on any of them nor its whole
    scripts (bash -n, shellcheck, script by script) are worse beyond doubt: for line completion the 95%
    interval of the difference does not lie wholly below 0, for whole scripts the one-sided sign test's
    p_worse is not under 2.5%."""
    shared = set(new["splits"]) & set(old["splits"])
    diffs = [line_es_difference(new, old, s) for s in shared]
    changes = [whole_script_change(new, old, key) for key in WHOLE_SCRIPT_SHARES]
    return (bool(shared) and all(new["splits"][s]["shell_loss"]["loss"] < old["splits"][s]["shell_loss"]["loss"]
                                 for s in shared)
            and all(d is None or d["high"] >= 0 for d in diffs)
            and all(c is None or c["p_worse"] >= 0.025 for c in changes))


def secondary_shares(r: dict) -> dict[str, tuple[float, int]]:
    """{label: (share %, sample count)} of the figures better_on_every_split does not weigh, or weighs only
    for a fall beyond doubt: generated whole scripts, block bodies that parse, the right command after a
    description."""
    out = {}
    scripts = r.get("whole_scripts") or {}
    for key, label in WHOLE_SCRIPT_SHARES.items():
        if scripts.get(key) is not None:
            out[label] = (scripts[key], scripts["n"])
    for split, figures in r["splits"].items():
        for name, key, label in (("block_completion", "bash_n_pass", "block bodies bash -n %"),
                                 ("comment_to_command", "right_command_share", "right command after a description %")):
            v = figures.get(name)
            if v:
                out[f"{label}, {split}"] = (v[key], v["n"])
    return out


def fallen_figures(new: dict, old: dict) -> list[str]:
    """The secondary shares on which `new` is lower than `old`, as "label old -> new (n=N)"."""
    a, b = secondary_shares(new), secondary_shares(old)
    return [f"{label} {b[label][0]} -> {a[label][0]} (n={a[label][1]})" for label in a
            if label in b and a[label][0] < b[label][0]]


def print_differences(new: dict, old: dict) -> None:
    """Line ES with the suffix per split, new - old point by point with the 95% interval, and the whole
    scripts' shares, script by script (whole_script_change)."""
    for split in HELDOUT_SPLITS:
        diff = line_es_difference(new, old, split)
        if diff:
            print(f"line ES with suffix, {split}, first - second bundle, same {diff['n']} cut points: "
                  f"{diff['mean']:+.2f} (95% interval {diff['low']:+.2f} .. {diff['high']:+.2f})")
    for key, label in WHOLE_SCRIPT_SHARES.items():
        c = whole_script_change(new, old, key)
        if c:
            print(f"{label}, first - second bundle, same {c['n']} prompts: {c['mean']:+.1f} ({c['fell']} fell, "
                  f"{c['rose']} rose; chance of as many falling were both as good: {c['p_worse']:.3f})")


def write_into_card(bundle_path: Path, results: dict) -> None:
    """Put the results into the bundle's data card, replacing the file atomically (a failed write leaves
    the card as it was and no temporary file)."""
    card_path = bundle_path / CARD_FILE
    card = msgpack.unpackb(card_path.read_bytes(), raw=False)
    card = card if isinstance(card, dict) else {}
    card["eval"] = copy.deepcopy({k: v for k, v in results.items() if k != "bundle"})
    for split in card["eval"].get("splits", {}).values():
        (split.get("line_completion") or {}).pop("es_per_point", None)  # in the results file only
    (card["eval"].get("whole_scripts") or {}).pop("per_script", None)
    write_bytes(card_path, msgpack.packb(card, use_bin_type=True))


def check_writable(args, out: Path, cards: list[Path]) -> None:
    """Refuse, before the evaluation runs, a results file or a bundle card that could not be written."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give the path of the results file")
    folders = [(out.parent, f"the results file {out} (choose another with --out)")]
    folders += [(b, f"the data card of {b} (--no-card leaves the bundles as they are)") for b in cards]
    curve = getattr(args, "keystroke_curve", None)
    if curve:
        folders.append((curve.parent, f"the keystroke curve {curve}"))
    for folder, what in folders:
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ValueError(f"cannot write {what}: {folder} is missing or not writable")


def is_shipped(bundle: Path) -> bool:
    """Whether `bundle` is the model shipped inside the package (codellm.defaults.PACKAGED_BUNDLE)."""
    from codellm.defaults import PACKAGED_BUNDLE
    return bundle.resolve() == PACKAGED_BUNDLE.resolve()


def main(args) -> None:
    first = args.bundle[0]  # results beside it, or in the working folder for the shipped model
    out = args.out or (Path.cwd() / "default-eval.json" if is_shipped(first) else first.with_name(first.name + "-eval.json"))
    # the shipped model's card is part of the installed package: never written by an evaluation
    cards = [] if args.no_card else [b for b in args.bundle if not is_shipped(b)]
    check_writable(args, out, cards)
    results = []
    for bundle in args.bundle:
        torch.manual_seed(0)
        curve = getattr(args, "keystroke_curve", None)
        if curve and len(args.bundle) > 1:
            curve = curve.with_name(f"{curve.stem}-{bundle.name}{curve.suffix}")
        results.append(evaluate(bundle, args.corpus, args.samples, args.scripts, args.device, args.pairs,
                                getattr(args, "keystrokes", 0), curve, getattr(args, "blocks", 100),
                                getattr(args, "cross_file", 200)))
    print_table(results)
    out.write_text(json.dumps(results if len(results) > 1 else results[0], indent=2))
    print(f"results written to {out}")
    if len(results) > 1:
        print_differences(results[0], results[1])
        verdict = better_on_every_split(results[0], results[1])
        print(f"is {args.bundle[0]} better than {args.bundle[1]} on every split (a lower held-out shell loss; line "
              f"completion and whole scripts not worse beyond doubt)? {'yes' if verdict else 'no'}")
        fallen = fallen_figures(results[0], results[1])
        if fallen:  # a few samples each: a fall may be chance, so measure it again with more before shipping
            print(f"lower in {args.bundle[0]} (not beyond doubt, or not weighed by that rule; few samples "
                  "each: measure again with more before shipping): " + "; ".join(fallen))
    for bundle, result in zip(args.bundle, results):
        if bundle in cards:
            write_into_card(bundle, result)
