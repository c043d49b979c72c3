"""`codellm-train corpus`: build the English and shell corpora and their summary."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .corpus import (Counts, code_data_records, english_records_from_docs, english_records_from_machine,
                     language_data_records, read_records, shell_records_from_tree, write_records)
from .sources import fetch_packages, package_licence, read_package_list

MACHINE_SHELL_DIRS = ["/usr/bin", "/usr/sbin", "/usr/lib", "/usr/libexec", "/usr/share", "/etc"]
ENGLISH_FILE = "english.msgpack"
SHELL_FILE = "shell.msgpack"
SUMMARY_FILE = "summary.json"


def build_corpus(out: Path, recipe: str | None = None, code_data: list[Path] = (), language_data: list[Path] = (),
                 package_list: Path | None = None, cache: Path | None = None, english_mb: float = 40.0,
                 log=print) -> dict:
    """Write out/english.msgpack, out/shell.msgpack and out/summary.json; returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    english_counts, shell_counts = Counts(), Counts()
    english_seen: set[str] = set()
    shell_seen: set[str] = set()
    sources: dict[str, dict] = {}

    def tally(records, name, licence=""):
        for rec in records:
            entry = sources.setdefault(rec["source"] if not name else name,
                                       {"files": 0, "bytes": 0, "licence": licence or rec["licence"]})
            entry["files"] += 1
            entry["bytes"] += len(rec["text"].encode())
            yield rec

    def shell_stream():
        if recipe == "default":
            specs = read_package_list(package_list)
            fetched = fetch_packages([s for s in specs if s.kind != "doc"], Path(cache or out / "cache"), log)
            for spec in specs:
                if spec.kind == "doc" or spec.source not in fetched:
                    continue
                folder = fetched[spec.source]
                licence = package_licence(folder, spec.name)
                split = spec.split
                yield from tally(shell_records_from_tree(folder, spec.source, licence, split,
                                                         shell_seen, shell_counts), spec.source, licence)
            for root in MACHINE_SHELL_DIRS:
                if Path(root).is_dir():
                    yield from tally(shell_records_from_tree(Path(root), f"machine:{root}", "", "train",
                                                             shell_seen, shell_counts), f"machine:{root}")
        for path in code_data:
            yield from tally(code_data_records(Path(path), shell_seen, shell_counts), None)

    def english_stream():
        budget = int(english_mb * 1e6)
        if recipe == "default":
            specs = read_package_list(package_list)
            fetched = fetch_packages([s for s in specs if s.kind == "doc"], Path(cache or out / "cache"), log)
            per_doc = budget // 4
            for spec in specs:
                if spec.kind == "doc" and spec.source in fetched:
                    folder = fetched[spec.source]
                    licence = package_licence(folder, spec.name)
                    yield from tally(english_records_from_docs(folder, f"debian:{spec.name}", licence,
                                                               english_seen, english_counts, per_doc),
                                     f"debian:{spec.name}", licence)
            left = budget - english_counts.kept_bytes
            if left > 0:
                yield from tally(english_records_from_machine(english_seen, english_counts, left, log), None)
        for path in language_data:
            yield from tally(language_data_records(Path(path), english_seen, english_counts), None)

    if recipe not in (None, "default"):
        raise ValueError(f"unknown recipe {recipe!r} (known: default)")
    log("building shell corpus")
    n_shell = write_records(out / SHELL_FILE, shell_stream())
    log("building English corpus")
    n_english = write_records(out / ENGLISH_FILE, english_stream())
    summary = {
        "english": english_counts.as_dict(),
        "shell": shell_counts.as_dict(),
        "shell_val_files": sum(1 for r in read_records(out / SHELL_FILE) if r["split"] == "val"),
        "sources": sources,
        "seconds": round(time.time() - start, 1),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    log(f"English: {n_english} documents, {english_counts.kept_bytes / 1e6:.1f} MB; "
        f"shell: {n_shell} files, {shell_counts.kept_bytes / 1e6:.1f} MB "
        f"({summary['shell_val_files']} held out); skipped: shell {dict(shell_counts.skipped)}, "
        f"English {dict(english_counts.skipped)}")
    if n_shell == 0 and n_english == 0:
        raise ValueError("no usable text found: every input was empty, binary, non-UTF-8 or a duplicate "
                         f"(skipped: {dict(shell_counts.skipped) or dict(english_counts.skipped)})")
    return summary
