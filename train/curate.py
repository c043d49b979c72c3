"""Curating the shell corpus: licence boilerplate, near-duplicates, and a cap per source.

Three passes over the records that corpus building collected (each record: text, source, split):
- `strip_licence_comments`: comment paragraphs that state a licence or copyright are dropped, so that
  the model does not learn "after a comment comes more comment" from licence headers.
- `drop_near_duplicates`: MinHash signatures of word 5-gram shingles, indexed with locality-sensitive
  hashing (Broder 1997; Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3) through
  `datasketch`. A training file is dropped when its estimated Jaccard similarity to a file kept before
  reaches `NEAR_DUPLICATE_JACCARD`, or to any held-out file reaches `HELDOUT_JACCARD` (a looser bar: a
  near-copy of an evaluation file must never reach training). Whole-file similarity misses a held-out
  script copied into a larger file (a vendored copy, an older version inside a source tree), so a
  training file that shares any run of `HELDOUT_WINDOW_LINES` consecutive code lines with a held-out
  file is dropped as well.
- `cap_per_source`: no source keeps more than `SOURCE_CAP` of the training split's shell bytes, so a
  few large test suites do not dominate.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict

from .corpus import in_words

NEAR_DUPLICATE_JACCARD = 0.8
HELDOUT_JACCARD = 0.5
SHINGLE_WORDS = 5
NUM_PERM = 128
SOURCE_CAP = 0.02
HELDOUT_WINDOW_LINES = 8  # consecutive code lines (blank and comment lines left out) a training file may not share

_LICENCE = re.compile(
    r"copyright|\(c\)\s*\d{4}|licen[cs]e|warranty|permission is hereby granted|redistribut|"
    r"free software foundation|all rights reserved|spdx-license-identifier", re.I)
_STRONG = re.compile(r"copyright|spdx-license-identifier|\(c\)\s*\d{4}", re.I)
_COMMENT = re.compile(r"^\s*#(?!!)")
_BLANK_COMMENT = re.compile(r"^\s*#\s*[-=*#]*\s*$")


def _is_licence_paragraph(lines: list[str]) -> bool:
    text = "\n".join(lines)
    if not _LICENCE.search(text):
        return False
    return len(lines) >= 2 or bool(_STRONG.search(text))


def strip_licence_comments(text: str) -> str:
    """Drop the comment paragraphs of `text` that state a licence or copyright.

    A comment block (consecutive `#` lines, not the shebang) splits into paragraphs at `#` lines
    with nothing else on them; a paragraph goes if it names a licence, copyright or warranty and has
    two lines or more, or carries a copyright or SPDX line. A block left with only blank `#` lines
    goes entirely. Code and other comments stay byte for byte."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not _COMMENT.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        j = i
        while j < len(lines) and _COMMENT.match(lines[j]):
            j += 1
        out.extend(_strip_block(lines[i:j]))
        i = j
    return "\n".join(out)


def _strip_block(block: list[str]) -> list[str]:
    paragraphs: list[list[str]] = [[]]
    for line in block:
        if _BLANK_COMMENT.match(line):
            paragraphs.append([line])
        else:
            paragraphs[-1].append(line)
    kept = [line for para in paragraphs
            if not _is_licence_paragraph([l for l in para if not _BLANK_COMMENT.match(l)])
            for line in para]
    if len(kept) == len(block):
        return block
    while kept and _BLANK_COMMENT.match(kept[0]):  # the separator left by a dropped first paragraph
        kept.pop(0)
    while kept and _BLANK_COMMENT.match(kept[-1]):
        kept.pop()
    return kept


def shingles(text: str, n: int = SHINGLE_WORDS) -> set[bytes]:
    """The set of word n-grams of `text` (whitespace-split), as bytes; one shingle for a shorter text."""
    words = text.split()
    if len(words) <= n:
        return {" ".join(words).encode()}
    return {" ".join(words[k:k + n]).encode() for k in range(len(words) - n + 1)}


def minhash(text: str):
    """datasketch.LeanMinHash of the text's shingles (NUM_PERM permutations)."""
    from datasketch import LeanMinHash, MinHash

    m = MinHash(num_perm=NUM_PERM)
    m.update_batch(list(shingles(text)))
    return LeanMinHash(m)


def code_windows(text: str, n: int = HELDOUT_WINDOW_LINES) -> set[bytes]:
    """8-byte hashes of every run of n consecutive code lines of `text` (lines stripped; blank and
    comment lines left out, so that edits of comments and indentation do not hide a copy)."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return {hashlib.blake2b("\n".join(lines[i:i + n]).encode("utf-8", "surrogatepass"), digest_size=8).digest()
            for i in range(len(lines) - n + 1)}


HELDOUT_CODE = "shares code lines with a held-out file"


class HeldOutCode:
    """The held-out shell files as the other corpora are checked against them: their texts, and their
    runs of HELDOUT_WINDOW_LINES code lines (code_windows)."""

    def __init__(self, records: list[dict]):
        heldout = [r["text"] for r in records if r["split"] != "train"]
        self.digests = {self.digest(text) for text in heldout}
        self.windows: set[bytes] = set().union(*map(code_windows, heldout)) if heldout else set()

    def found_in(self, text: str) -> bool:
        """Whether `text` is a held-out file or holds a run of its code lines."""
        if not self.digests:
            return False
        return self.digest(text) in self.digests or not self.windows.isdisjoint(code_windows(text))

    @staticmethod
    def digest(text: str) -> bytes:
        """The same for a copy with other line endings or surrounding blank space."""
        text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
        return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).digest()


def drop_near_duplicates(records: list[dict], log=print) -> tuple[list[dict], Counter]:
    """Keep held-out records (split != "train") and the training records that are neither a near-copy
    of one kept before them nor of any held-out record. Order decides which of two near-copies stays.

    Returns (kept records in their original order, counts of what was dropped and why)."""
    from datasketch import MinHashLSH
    from tqdm import tqdm

    heldout_index = MinHashLSH(threshold=HELDOUT_JACCARD, num_perm=NUM_PERM)
    kept_index = MinHashLSH(threshold=NEAR_DUPLICATE_JACCARD, num_perm=NUM_PERM)
    dropped: Counter = Counter()
    signatures = [minhash(r["text"]) for r in tqdm(records, desc="minhash", unit="file", mininterval=10,
                                                     disable=len(records) < 1000)]
    keep = [False] * len(records)
    for k, (rec, sig) in enumerate(zip(records, signatures)):
        if rec["split"] != "train":
            if kept_index.query(sig):
                dropped["near-duplicate (held out)"] += 1
                continue
            heldout_index.insert(f"h{k}", sig)
            kept_index.insert(f"k{k}", sig)
            keep[k] = True
    heldout = HeldOutCode([r for r, k in zip(records, keep) if k])  # the held-out records kept
    for k, (rec, sig) in enumerate(zip(records, signatures)):
        if rec["split"] != "train":
            continue
        if heldout_index.query(sig):
            dropped["near-copy of a held-out file"] += 1
        elif not heldout.windows.isdisjoint(code_windows(rec["text"])):
            dropped[HELDOUT_CODE] += 1
        elif kept_index.query(sig):
            dropped["near-duplicate"] += 1
        else:
            kept_index.insert(f"k{k}", sig)
            keep[k] = True
    log(f"near-duplicates: {in_words(dropped)} (MinHash {NUM_PERM} permutations, word {SHINGLE_WORDS}-grams, "
        f"Jaccard >= {NEAR_DUPLICATE_JACCARD}; >= {HELDOUT_JACCARD} to a held-out file, or "
        f"{HELDOUT_WINDOW_LINES} code lines in a row shared with one)")
    return [r for r, k in zip(records, keep) if k], dropped


def cap_per_source(records: list[dict], share: float = SOURCE_CAP) -> tuple[list[dict], dict[str, int]]:
    """Cap every source at `share` of the training split's shell bytes (held-out records untouched).

    The cap is a share of the total after capping, so it is found by iterating to a fixed point, then
    lowered until the whole files kept satisfy it. Within a source, files are kept in the order of their
    sha256 (a fixed pseudo-random order) while they fit. With fewer than 1/share sources no cap can
    hold (a user's own folder is one source): records are returned unchanged.
    Returns (kept records in their original order, bytes dropped per capped source)."""
    by_source: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        if rec["split"] == "train":
            by_source[rec["source"]].append(rec)
    if len(by_source) * share <= 1:
        return records, {}
    sizes = {s: sum(len(r["text"].encode()) for r in recs) for s, recs in by_source.items()}
    cap = float(sum(sizes.values()))
    for _ in range(100):
        new_cap = share * sum(min(size, cap) for size in sizes.values())
        if abs(new_cap - cap) < 1:
            break
        cap = new_cap
    while True:
        kept = {source: _fill(recs, cap) for source, recs in by_source.items()}
        used = {source: sum(len(r["text"].encode()) for r in recs) for source, recs in kept.items()}
        if max(used.values()) <= share * sum(used.values()):
            break
        cap *= 0.99
    kept_ids = {id(r) for recs in kept.values() for r in recs}
    dropped = {source: sizes[source] - used[source] for source in sizes if used[source] < sizes[source]}
    return [r for r in records if r["split"] != "train" or id(r) in kept_ids], dropped


def _fill(records: list[dict], cap: float) -> list[dict]:
    """The records (in sha256 order) that fit in `cap` bytes, skipping those that would overflow it."""
    kept, used = [], 0
    for rec in sorted(records, key=lambda r: r["sha256"]):
        size = len(rec["text"].encode())
        if used + size <= cap:
            kept.append(rec)
            used += size
    return kept
