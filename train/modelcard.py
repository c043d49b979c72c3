"""`python -m codellm.train.modelcard BUNDLE --out MODEL.md`: the model card, written from the bundle's
data card (sources, training figures) and the evaluation stored in it by `codellm-train eval`, so that
every figure in it comes from a command."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from codellm.bundle import load_bundle

from .datacard import stage_sources


def _fmt_table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render(bundle_path: Path, command: str, bench_text: str | None, curves: list[str], notes: str | None = None) -> str:
    """The model card's Markdown: the model, its data, its training, the evaluation stored in the card,
    the bench output and notes when given."""
    bundle = load_bundle(bundle_path)
    stages = bundle.card.get("stages", {})
    out = _model_section(bundle, bundle_path, command, stages)
    out += _data_section(stages)
    out += _training_section(stages, curves)
    ev = bundle.card.get("eval")
    if ev:
        out += _eval_section(ev, bundle_path)
    if bench_text:
        out += [f"`codellm bench --model {bundle_path}`:", "", "```", bench_text.strip(), "```", ""]
    if notes:
        out += ["## Observations", "", notes.strip(), ""]
    out += ["---", "", "Written by `python -m codellm.train.modelcard` from the bundle's data card; the evaluation "
            "figures are stored there by `codellm-train eval`.", ""]
    return "\n".join(out)


def _shell_stages(stages: dict) -> list[str]:
    return [name for name in stages if name.startswith("code")]


def _model_section(bundle, bundle_path: Path, command: str, stages: dict) -> list[str]:
    """The title, what the model is and what it was trained on, and the command that trained it."""
    cfg = bundle.config
    shell_stages = _shell_stages(stages)
    out = [f"# codellm model card: `{bundle_path}`", ""]
    trained = ("English, then shell scripts with fill-in-the-middle" if "language" in stages
               else "shell scripts with fill-in-the-middle")
    if len(shell_stages) > 1:
        trained += f" ({len(shell_stages)} shell stages)"
    averages = [st for st in stages.values() if isinstance(st, dict) and st.get("average_of")]
    last = list(stages.values())[-1] if stages else None
    if averages and last is averages[-1]:
        trained += (f"; its weights are the mean of {len(averages[-1]['average_of'])} models of those stages "
                    "(`codellm-train average`, the training table says which)")
    elif averages:
        trained += (f"; training went on from a mean of {len(averages[-1]['average_of'])} models of earlier "
                    "stages (`codellm-train average`, the training table says which)")
    grown = [name for name, st in stages.items() if isinstance(st, dict) and st.get("shape")]
    if grown:
        trained += f"; grown to {cfg.n_layer} layers by block expansion at stage `{grown[-1]}` (train/grow.py)"
    preset = f"preset `{cfg.preset}`: " if cfg.preset != "custom" else ""
    storage = ("; weights stored as int8 with a float32 scale per row" if bundle.storage_dtype == "int8" else "")
    out += [f"A {bundle.model.num_params() / 1e6:.2f}M-parameter decoder-only transformer ({preset}"
            f"{cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads, context {cfg.context_length} tokens, "
            f"byte-level BPE vocabulary of {cfg.vocab_size}), trained from scratch on {trained}{storage}. "
            f"Prompt format at serving time: {bundle.prompt_format.upper()}.", ""]
    out += ["Reproduce it with:", "", "```bash", command, "```", ""]
    return out


def _data_section(stages: dict) -> list[str]:
    """The corpus of the last shell stage: sizes, curation and the largest sources; none without a summary."""
    shell_stages = _shell_stages(stages)
    code = stages.get(shell_stages[-1], {}) if shell_stages else {}
    summary = code.get("corpus_summary", {})
    if not summary:
        return []
    eng, sh = summary.get("english", {}), summary.get("shell", {})
    out = ["## Data", "",
           f"- English: {eng.get('files', 0)} documents, {eng.get('bytes', 0) / 1e6:.1f} MB "
           "(man pages, GNU info manuals, Debian documentation packages).",
           f"- Shell: {sh.get('files', 0)} files, {sh.get('bytes', 0) / 1e6:.1f} MB after filtering and exact "
           f"de-duplication; {summary.get('shell_val_files', 0)} files from whole packages held out for "
           "evaluation and never trained on.",
           f"- Skipped shell files: {', '.join(f'{k} {v}' for k, v in sh.get('skipped', {}).items())}.",
           *_curation_lines(summary),
           "- Every training file's sha256 and source is listed in the bundle's `data.msgpack` (each corpus after "
           "the first as the files it adds to and drops from the earlier corpus nearest it; `codellm.train.datacard.stage_files`).", ""]
    sources = sorted(stage_sources({"stages": stages}, shell_stages[-1]).items(), key=lambda kv: -kv[1]["bytes"])
    rows = [[name, v["files"], f"{v['bytes'] / 1e6:.2f}", v.get("licence") or "-"] for name, v in sources[:25]]
    out += [_fmt_table(rows, ["source", "files", "MB", "licence"]), "",
            f"({len(sources)} sources in all; the full list is in the data card.)", ""]
    return out


def _training_section(stages: dict, curves: list[str]) -> list[str]:
    """One table row per stage, then the loss curves."""
    out = ["## Training", ""]
    rows = []
    for name, st in stages.items():
        if st.get("average_of"):
            parts = ", ".join(f"`{p['bundle']}` x {p['weight']:.2f}" for p in st["average_of"])
            rows.append([f"{name}: weights averaged, {parts}", "-", "-", "-", "-", "-", "-"])
        elif st:
            rows.append([name, f"{st['tokens'] / 1e6:.1f}M", st["steps"], f"{st['seconds'] / 60:.0f} min",
                         st["device"], f"{st['train_loss']:.3f}",
                         f"{st['val_loss']:.3f}" if st.get("val_loss") is not None else "-"])
    out += [_fmt_table(rows, ["stage", "tokens seen", "steps", "wall time", "device", "final train loss",
                              "held-out loss"]), ""]
    carried = [_sittings_line(name, st["sittings"]) for name, st in stages.items() if len(st.get("sittings", [])) > 1]
    out += carried + [""] * bool(carried)
    out += ["Loss curves:", ""] + [f"![{c}]({c})" for c in curves] + [""]
    return out


def _sittings_line(name: str, sittings: list[dict]) -> str:
    """A stage trained in several sittings (resumed runs): where each took it up and how."""
    def one(s: dict) -> str:
        start = f"from step {s.get('from_step', '?')} ({s.get('from_tokens', 0):,} tokens)"
        if s.get("not_recorded") or "learning_rate" not in s:
            return f"{start}, how not recorded"
        limits = ([f"--time-budget {s['time_budget']:g}"] if s.get("time_budget") else []) + (
            [f"{s['max_steps']} steps in all"] if s.get("max_steps") else [])
        return f"{start}, learning rate {s['learning_rate']:g}, {', '.join(limits) or 'no limit'}, {s.get('device')}"
    return f"- `{name}` was trained in {len(sittings)} sittings: " + "; ".join(map(one, sittings)) + "."


def _curation_lines(summary: dict) -> list[str]:
    cur = summary.get("shell_curation")
    if not cur:
        return []
    return [f"- Curation: {cur['bytes_before'] / 1e6:.1f} MB read; licence comments stripped "
            f"({cur['licence_bytes_stripped'] / 1e6:.1f} MB); near-duplicates dropped "
            f"({', '.join(f'{k} {v}' for k, v in cur['near_duplicates_dropped'].items()) or 'none'}; "
            f"{cur['near_duplicate_rule']}); no source above {cur['source_cap']:.0%} of the training bytes "
            f"({len(cur['bytes_dropped_by_cap'])} sources capped); {cur['train_bytes'] / 1e6:.1f} MB of shell "
            f"for training, {summary.get('shell_val_files', 0)} + {summary.get('shell_val_user_files', 0)} "
            "held-out files (Debian, npm/PyPI).",
            f"- Comment-to-command pairs: {summary.get('pairs', {})}."]


SPLIT_LABELS = {"val": "Debian packages", "val_user": "npm and PyPI packages"}


def _eval_section(ev: dict, bundle_path: Path) -> list[str]:
    """The held-out figures, one block per split (older cards hold one split at the top level)."""
    splits = ev.get("splits") or {"val": ev}
    out = ["## Held-out evaluation", "", f"From `codellm-train eval {bundle_path}`.", ""]
    for split, r in splits.items():
        out += _split_section(split, r, ev)
    ws = ev.get("whole_scripts")
    if ws:
        out += [f"Whole scripts generated from {ws['n']} one-line descriptions (temperature 0.6): "
                f"{ws['bash_n_pass']}% pass `bash -n`, {ws['shellcheck_pass']}% have no `shellcheck -S error` "
                f"finding; {ws['ended_by_model']}% ended by the model within 400 tokens.", ""]
    lat = next(iter(splits.values()))["line_completion"].get("latency_ms", {})
    out += ["## Speed", "", f"Line completion latency during the evaluation (engine only, CPU): p50 "
            f"{lat.get('p50')} ms, p95 {lat.get('p95')} ms.", ""]
    return out


def _split_section(split: str, r: dict, ev: dict) -> list[str]:
    """One held-out split's figures: loss, line completion, comment to command."""
    lc = r["line_completion"]
    out = [f"### {SPLIT_LABELS.get(split, split)} (`{split}`, {r['heldout_files']} files)", ""]
    rows = [[label, v["loss"], v["perplexity"], v["bits_per_byte"], v["tokens"]]
            for label, v in (("shell", r.get("shell_loss")), ("English", ev.get("english_loss"))) if v]
    out += [_fmt_table(rows, ["text", "loss (nats/token)", "perplexity", "bits per byte", "tokens"]), ""]
    rows = []
    for key, label in (("fim", "model, with the suffix (FIM)"), ("no_suffix", "model, prefix only"),
                       ("baseline", "repeat previous line")):
        cells = [label]
        for kind in ("all", "line_start", "mid_line"):
            c = lc[key].get(kind)
            cells.append(f"{c['em']} / {c['es']}" if c else "-")
        rows.append(cells)
    out += [f"Line completion (CodeXGLUE protocol, {lc['fim']['all']['n']} cut points, greedy): exact match % / "
            "edit similarity", "", _fmt_table(rows, ["", "all", "line start", "mid-line"]), "",
            f"Held-out files that still parse (`bash -n`) with the predicted line in place of the real one, "
            f"among those that parse: {lc['syntax_kept_parseable']}%.", ""]
    c2c = r.get("comment_to_command")
    if c2c:
        out += [f"After `#!/bin/bash` and a held-out description comment ({c2c['n']} pairs), the first greedy "
                f"line is a command in {c2c['command_share']}% of cases, running the right command in "
                f"{c2c['right_command_share']}%." + (
                    f" Served answers start with code after a comment line; left to itself, the model's greedy "
                    f"first line is a command in {c2c['model_command_share']}%." if "model_command_share" in c2c
                    else ""), ""]
    return out


KEPT = re.compile(r"<!-- kept: .*? -->.*?<!-- end kept -->", re.S)


def kept_sections(text: str) -> str:
    """Parts of an existing card between `<!-- kept: NAME -->` and `<!-- end kept -->` (figures measured
    by other commands, such as the keystroke evaluation), which a rewrite keeps."""
    return "\n\n".join(KEPT.findall(text))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m codellm.train.modelcard")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, default=Path("MODEL.md"))
    parser.add_argument("--command", required=True, help="the command that trained the bundle")
    parser.add_argument("--bench", type=Path, default=None, help="saved output of `codellm bench --model BUNDLE`")
    parser.add_argument("--curve", action="append", default=[], help="loss-curve image paths, relative to --out")
    parser.add_argument("--notes", type=Path, default=None, help="a Markdown file of observations to include")
    args = parser.parse_args(argv)
    bench = args.bench.read_text() if args.bench else None
    notes = args.notes.read_text() if args.notes else None
    kept = kept_sections(args.out.read_text()) if args.out.exists() else ""
    text = render(args.bundle, args.command, bench, args.curve, notes)
    if kept:  # sections written by hand stay, above the footer
        footer = text.rindex("\n---\n")
        text = text[:footer] + "\n" + kept + "\n" + text[footer:]
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
