"""`codellm-train corpus`: build the English and shell corpora and their summary."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .corpus import (Counts, in_words, code_data_records, english_records_from_docs, english_records_from_machine,
                     language_data_records, read_records, record, sha256, shell_records_from_tree, write_records)
from .curate import (HELDOUT_CODE, HELDOUT_JACCARD, NEAR_DUPLICATE_JACCARD, NUM_PERM, SHINGLE_WORDS, SOURCE_CAP,
                     HeldOutCode, cap_per_source, drop_near_duplicates, strip_licence_comments)
from .pairs import pairs_from_manual, pairs_from_script
from .sources import fetch_packages, is_fetched, package_licence, read_package_list

MACHINE_SHELL_DIRS = ["/usr/bin", "/usr/sbin", "/usr/lib", "/usr/libexec", "/usr/share", "/etc"]
ENGLISH_FILE = "english.msgpack"
SHELL_FILE = "shell.msgpack"
SUMMARY_FILE = "summary.json"
PAIRS_FILE = "pairs.msgpack"


def build_corpus(out: Path, recipe: str | None = None, code_data: list[Path] = (), language_data: list[Path] = (),
                 package_list: Path | None = None, cache: Path | None = None, english_mb: float = 40.0,
                 log=print, retry_failed: bool = False, heldout_data: list[Path] = (),
                 cached_only: bool = False, download_budget: float | None = None) -> dict:
    """Write out/english.msgpack, out/shell.msgpack and out/summary.json; returns the summary.
    `heldout_data`: the user's scripts kept out of training for `codellm-train eval` (split val_user).
    `cached_only`: of the recipe's training packages, only those already in the download cache (the
    held-out ones are always fetched), for a quick build on a machine where downloads stopped part-way.
    `download_budget`: seconds after which no more training packages are downloaded; the build goes on
    with those fetched by then (held-out packages come first and are always fetched). The few packages
    of manuals (kind `doc`) are always fetched."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    build = CorpusBuild(out, recipe, code_data, language_data, package_list, cache, english_mb, log, retry_failed,
                        list(heldout_data), cached_only, download_budget)
    if recipe not in (None, "default"):
        raise ValueError(f"unknown recipe {recipe!r} (known: default)")
    log("building shell corpus")
    shell, curation = curate_shell(list(build.shell_records()), log)
    recount_sources(build.sources, shell)
    n_shell = write_records(out / SHELL_FILE, iter(shell))
    log("building English corpus")
    n_english = write_records(out / ENGLISH_FILE, without_heldout_code(build.english_records(), HeldOutCode(shell),
                                                                       build.english_counts))
    n_pairs, pair_counts = write_pairs(out, shell, log)
    summary = {
        "english": build.english_counts.as_dict(),
        "shell": build.shell_counts.as_dict(),
        "shell_curation": curation,
        "shell_val_files": sum(1 for r in shell if r["split"] == "val"),
        "shell_val_user_files": sum(1 for r in shell if r["split"] == "val_user"),
        "pairs": pair_counts,
        "sources": build.sources,
        "cached_only": cached_only,
        "download_budget": download_budget,
        "seconds": round(time.time() - start, 1),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    report_build(build, summary, n_shell, n_english, n_pairs)
    return summary


def report_build(build: CorpusBuild, summary: dict, n_shell: int, n_english: int, n_pairs: int) -> None:
    """Log what a build wrote; raise ValueError when it found no usable text at all."""
    shell_counts, english_counts = build.shell_counts, build.english_counts
    build.log(f"English: {n_english} documents, {english_counts.kept_bytes / 1e6:.1f} MB; "
              f"shell: {n_shell} files, {summary['shell_curation']['bytes_after'] / 1e6:.1f} MB after curation "
              f"(held out: {summary['shell_val_files']} in val, {summary['shell_val_user_files']} in val_user) from "
              f"{sum(1 for v in build.sources.values() if v['files'])} sources; comment-to-command pairs: "
              f"{n_pairs}; skipped: shell {in_words(shell_counts.skipped)}, English {in_words(english_counts.skipped)}")
    if n_shell == 0 and n_english == 0:
        raise ValueError("no usable text found: every input was empty, binary, non-UTF-8 or a duplicate "
                         f"(skipped: {dict(shell_counts.skipped) or dict(english_counts.skipped)})")


@dataclass
class CorpusBuild:
    """One corpus build: its inputs, and as its record streams are read, what each kept and skipped, the
    texts seen (exact duplicates are dropped) and the files and bytes per source."""
    out: Path
    recipe: str | None
    code_data: list[Path]
    language_data: list[Path]
    package_list: Path | None
    cache: Path | None
    english_mb: float
    log: Callable
    retry_failed: bool
    heldout_data: list[Path] = field(default_factory=list)
    cached_only: bool = False
    download_budget: float | None = None
    started: float = field(default_factory=time.monotonic)
    english_counts: Counts = field(default_factory=Counts)
    shell_counts: Counts = field(default_factory=Counts)
    english_seen: set[str] = field(default_factory=set)
    shell_seen: set[str] = field(default_factory=set)
    sources: dict[str, dict] = field(default_factory=dict)

    def tally(self, records: Iterable[dict], name: str | None, licence: str = "") -> Iterator[dict]:
        """Pass records through, counting files and bytes under `name` (None: each record's own source)."""
        for rec in records:
            entry = self.sources.setdefault(rec["source"] if not name else name,
                                            {"files": 0, "bytes": 0, "licence": licence or rec["licence"]})
            entry["files"] += 1
            entry["bytes"] += len(rec["text"].encode())
            yield rec

    def fetched(self, docs: bool) -> tuple[list, dict]:
        """The recipe's package specs and the folders of those fetched: the doc packages, or the others."""
        specs = read_package_list(self.package_list)
        cache = Path(self.cache or self.out / "cache")
        wanted = [s for s in specs if (s.kind == "doc") == docs]
        if docs:  # a few packages of manuals: always all of them
            return specs, fetch_packages(wanted, cache, self.log)
        if self.cached_only:
            wanted = [s for s in wanted if s.heldout or is_fetched(s, cache)]
            self.log(f"  {len(wanted)} of the list's packages: held out, or in the cache")
        stop_at = self.started + self.download_budget if self.download_budget is not None else None
        return specs, fetch_packages(wanted, cache, self.log, retry_failed=self.retry_failed, stop_at=stop_at)

    def shell_records(self) -> Iterator[dict]:
        """The user's --heldout-data (first: a training copy of a held-out text is the one dropped), the
        recipe's packages and this machine's shell files, then the user's --code-data."""
        for path in self.heldout_data:
            yield from self.tally(code_data_records(Path(path), self.shell_seen, self.shell_counts, "val_user"), None)
        if self.recipe == "default":
            yield from self.recipe_shell_records()
        for path in self.code_data:
            yield from self.tally(code_data_records(Path(path), self.shell_seen, self.shell_counts), None)

    def recipe_shell_records(self) -> Iterator[dict]:
        specs, fetched = self.fetched(docs=False)
        for spec in specs:
            if spec.kind == "doc" or spec.source not in fetched:
                continue
            folder = fetched[spec.source]
            licence = package_licence(folder, spec.name)
            yield from self.tally(shell_records_from_tree(folder, spec.source, licence, spec.split,
                                                          self.shell_seen, self.shell_counts), spec.source, licence)
        for root in MACHINE_SHELL_DIRS:
            if Path(root).is_dir():
                yield from self.tally(shell_records_from_tree(Path(root), f"machine:{root}", "", "train",
                                                              self.shell_seen, self.shell_counts), f"machine:{root}")

    def english_records(self) -> Iterator[dict]:
        """The recipe's Debian docs (up to a quarter of the budget each) and this machine's manuals up to
        --english-mb, then the user's --language-data."""
        if self.recipe == "default":
            yield from self.recipe_english_records(int(self.english_mb * 1e6))
        for path in self.language_data:
            yield from self.tally(language_data_records(Path(path), self.english_seen, self.english_counts), None)

    def recipe_english_records(self, budget: int) -> Iterator[dict]:
        specs, fetched = self.fetched(docs=True)
        for spec in specs:
            if spec.kind == "doc" and spec.source in fetched:
                folder = fetched[spec.source]
                licence = package_licence(folder, spec.name)
                yield from self.tally(english_records_from_docs(folder, f"debian:{spec.name}", licence,
                                                                self.english_seen, self.english_counts, budget // 4),
                                      f"debian:{spec.name}", licence)
        left = budget - self.english_counts.kept_bytes
        if left > 0:
            yield from self.tally(english_records_from_machine(self.english_seen, self.english_counts, left,
                                                               self.log), None)


def curate_shell(records: list[dict], log=print) -> tuple[list[dict], dict]:
    """Licence comments stripped from training files, near-duplicates dropped, each source capped
    (see curate.py). Returns (records, what each pass removed)."""
    before = sum(len(r["text"].encode()) for r in records)
    stripped, seen = [], set()
    for rec in records:
        # held-out files stay as people write them: the evaluation sees licence headers too
        text = strip_licence_comments(rec["text"]) if rec["split"] == "train" else rec["text"]
        digest = sha256(text)
        if text.strip() and digest not in seen:
            seen.add(digest)
            stripped.append({**rec, "text": text, "sha256": digest})
    after_strip = sum(len(r["text"].encode()) for r in stripped)
    deduped, dropped = drop_near_duplicates(stripped, log)
    train_files = sum(1 for r in stripped if r["split"] == "train")
    like_heldout = dropped["near-copy of a held-out file"] + dropped[HELDOUT_CODE]
    if train_files and like_heldout > train_files / 2:
        log(f"warning: {like_heldout} of {train_files} training files are copies of held-out files, or hold "
            "their code, and were dropped: is a held-out folder (--heldout-data) also given to train on?")
    capped, capped_bytes = cap_per_source(deduped)
    after = sum(len(r["text"].encode()) for r in capped)
    curation = {
        "files_before": len(records), "bytes_before": before,
        "licence_bytes_stripped": before - after_strip,
        "files_dropped_exact_after_strip": len(records) - len(stripped),
        "near_duplicates_dropped": dict(dropped),
        "near_duplicate_rule": f"MinHash {NUM_PERM} permutations over word {SHINGLE_WORDS}-grams, Jaccard >= "
                               f"{NEAR_DUPLICATE_JACCARD} (>= {HELDOUT_JACCARD} to a held-out file)",
        "source_cap": SOURCE_CAP, "bytes_dropped_by_cap": capped_bytes,
        "files_after": len(capped), "bytes_after": after,
        "train_bytes": sum(len(r["text"].encode()) for r in capped if r["split"] == "train"),
    }
    log(f"curation: {before / 1e6:.1f} MB -> licence comments stripped {after_strip / 1e6:.1f} MB -> "
        f"near-duplicates dropped {sum(len(r['text'].encode()) for r in deduped) / 1e6:.1f} MB -> "
        f"per-source cap {after / 1e6:.1f} MB ({len(capped_bytes)} sources capped)")
    return capped, curation


def without_heldout_code(records: Iterable[dict], heldout: HeldOutCode, counts: Counts) -> Iterator[dict]:
    """The English training records less those that are a held-out shell file or hold a run of its code
    lines (a manual or README can quote a whole script; --language-data can name the --heldout-data
    folder), counted as skipped."""
    for rec in records:
        if rec["split"] == "train" and heldout.found_in(rec["text"]):
            counts.skip(HELDOUT_CODE)
            counts.kept -= 1
            counts.kept_bytes -= len(rec["text"].encode())
            continue
        yield rec


def recount_sources(sources: dict[str, dict], records: list[dict]) -> None:
    """Files and bytes per source as written (after curation)."""
    for entry in sources.values():
        entry["files"], entry["bytes"] = 0, 0
    for rec in records:
        entry = sources.setdefault(rec["source"], {"files": 0, "bytes": 0, "licence": rec.get("licence", "")})
        entry["files"] += 1
        entry["bytes"] += len(rec["text"].encode())
        entry["split"] = rec["split"]


def command_names() -> set[str]:
    """Executables on this machine's PATH folders: what a manual's example line may start with."""
    names: set[str] = set()
    for folder in ("/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"):
        if Path(folder).is_dir():
            names.update(p.name for p in Path(folder).iterdir())
    return names


def write_pairs(out: Path, shell: list[dict], log=print) -> tuple[int, dict]:
    """out/pairs.msgpack: comment-to-command pairs from the English corpus's manuals and from the shell
    corpus's comment-then-code spans, split like their sources. A training pair whose text equals a
    held-out pair's is dropped."""
    names = command_names()
    by_split: dict[str, dict[str, dict]] = {"train": {}, "val": {}, "val_user": {}}

    def add(pairs, source, path, split):
        for pair in pairs:
            doc = pair.document()
            by_split.setdefault(split, {}).setdefault(sha256(doc), record(doc, source, path, "", split))

    english = out / ENGLISH_FILE
    for rec in read_records(english):
        man_page = "/man/" in rec["path"]
        add(pairs_from_manual(rec["text"], names, man_page), rec["source"], rec["path"], rec["split"])
    for rec in shell:
        add(pairs_from_script(rec["text"]), rec["source"], rec["path"], rec["split"])
    heldout = {d for split, docs in by_split.items() if split != "train" for d in docs}
    train = [r for d, r in by_split["train"].items() if d not in heldout]
    records = train + [r for split, docs in by_split.items() if split != "train" for r in docs.values()]
    n = write_records(out / PAIRS_FILE, iter(records))
    counts = {split: sum(1 for r in records if r["split"] == split) for split in by_split}
    log(f"comment-to-command pairs: {counts}")
    return n, counts
