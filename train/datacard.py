"""The data card (`data.msgpack` in a bundle): what each training stage learned from, for users who ask.

Per stage: the corpus summary (sizes, curation, sources with licences), figures (steps, tokens, wall
time, device, losses) and the training settings. The sha256 of every training file is kept once per
distinct corpus, grouped by source (`{source: concatenated 32-byte digests}`), and a stage names its
corpus by digest. The first corpus is stored whole under `corpora`; each later one, under
`corpus_changes`, as the files it adds to and removes from the corpus of the stage before it, so that
a relay of stages on growing corpora keeps every hash while the card stays small enough to ship.
"""
from __future__ import annotations

import copy
from collections import Counter
import hashlib
import json
from pathlib import Path

import torch

from codellm.device import choose_device

from .corpus import read_records
from .recipe import ENGLISH_FILE, PAIRS_FILE, SHELL_FILE, SUMMARY_FILE


def corpus_files(corpus: Path) -> dict[str, bytes]:
    """{source: concatenated sha256 digests} of the corpus's training files (shell, English, pairs)."""
    grouped: dict[str, list[bytes]] = {}
    for name in (SHELL_FILE, ENGLISH_FILE, PAIRS_FILE):
        for r in read_records(corpus / name, "train"):
            grouped.setdefault(r["source"], []).append(bytes.fromhex(r["sha256"]))
    return {source: b"".join(sorted(digests)) for source, digests in sorted(grouped.items())}


def _digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for source, digests in files.items():
        h.update(source.encode() + b"\0" + digests)
    return h.hexdigest()[:16]


def compact(card: dict) -> dict:
    """The card with every file list in its compact form: per-stage lists of the oldest form
    ([[source, path, sha256], ...]) moved into `corpora`, each corpus after the first stored as its
    change from the earlier corpus it differs least from (in `corpus_changes`: digests added and removed
    per source, and the sources dropped whole), and per-source counts that repeat an earlier stage's
    replaced by its name (`sources_of`). Idempotent."""
    corpora = card.setdefault("corpora", {})
    for stage in card.get("stages", {}).values():
        if isinstance(stage.get("files"), list):
            grouped: dict[str, list[bytes]] = {}
            for source, _path, digest in stage.pop("files"):
                grouped.setdefault(source, []).append(bytes(digest))
            files = {s: b"".join(sorted(d)) for s, d in sorted(grouped.items())}
            key = _digest(files)
            corpora.setdefault(key, files)
            stage["corpus"] = key
    order = list(dict.fromkeys(s.get("corpus") for s in card.get("stages", {}).values() if s.get("corpus")))
    changes = card.setdefault("corpus_changes", {})
    known: dict = {}
    whole = {key: corpus_digests(card, key, known) for key in order}
    for i, key in enumerate(order[1:], 1):
        if not whole[key] or key in changes:
            continue  # a corpus the card does not hold, or holds as a change already
        # the smallest change from any earlier corpus: a corpus built from part of the list and the
        # whole-list corpus after it differ by thousands of sources, that whole list and an earlier one
        # by little
        base, change = min(((base, _change(whole[base], whole[key])) for base in order[:i] if whole[base]),
                           key=lambda pair: _change_size(pair[1]), default=(None, None))
        if change is not None and _change_size(change) < _size(whole[key]):
            changes[key] = {"base": base, **change}
            corpora.pop(key, None)
    if not changes:
        del card["corpus_changes"]
    _share_sources(card.get("stages", {}))
    return card


def _share_sources(stages: dict) -> None:
    """A stage whose per-source counts are those of an earlier stage names it (`sources_of`) instead of
    repeating them: stages trained on one corpus would each carry the same half megabyte."""
    for name, stage in stages.items():
        sources = stage.get("sources")
        if not sources:
            continue
        for earlier, other in stages.items():
            if earlier == name:
                break
            if other.get("sources") == sources:
                del stage["sources"]
                stage["sources_of"] = earlier
                break


def stage_sources(card: dict, stage: str) -> dict:
    """{source: {files, bytes, licence}} of the corpus a stage trained on ({} where the card has none)."""
    entry = card["stages"][stage]
    if "sources_of" in entry:
        entry = card["stages"].get(entry["sources_of"], {})
    return entry.get("sources", {})


def _size(files: dict[str, bytes]) -> int:
    return sum(len(d) for d in files.values())


def _change_size(change: dict) -> int:
    """Bytes a corpus change takes in the card, about (a dropped source's name counted as 64)."""
    return _size(change["added"]) + _size(change["removed"]) + 64 * len(change["dropped_sources"])


def _split(digests: bytes) -> Counter:
    """The 32-byte digests as a multiset: two files of one source may have the same text."""
    return Counter(digests[k:k + 32] for k in range(0, len(digests), 32))


def _join(digests: Counter) -> bytes:
    return b"".join(sorted(digests.elements()))


def _change(base: dict[str, bytes], new: dict[str, bytes]) -> dict:
    """The digests `new` adds to `base` and those it drops, per source; a source `new` lacks altogether
    is named in `dropped_sources` instead (a corpus built from part of the package list drops
    thousands of sources, and their digests would weigh megabytes)."""
    added, removed = {}, {}
    dropped = sorted(set(base) - set(new))
    for source in sorted(set(new)):
        if base.get(source) == new[source]:
            continue  # most sources are the same from one corpus to the next
        old, now = _split(base.get(source, b"")), _split(new[source])
        if now - old:
            added[source] = _join(now - old)
        if old - now:
            removed[source] = _join(old - now)
    return {"added": added, "removed": removed, "dropped_sources": dropped}


def _apply(files: dict[str, bytes], change: dict) -> dict[str, bytes]:
    """The corpus `files` with `change` made to it; only the sources it touches are split into digests."""
    dropped = set(change.get("dropped_sources", ()))
    out = {s: d for s, d in files.items() if s not in dropped}
    for source in set(change["removed"]) | set(change["added"]):
        digests = _split(out.get(source, b"")) - _split(change["removed"].get(source, b""))
        digests += _split(change["added"].get(source, b""))
        out[source] = _join(digests)
    return {s: d for s, d in sorted(out.items()) if d}


def corpus_digests(card: dict, key: str, known: dict | None = None) -> dict[str, bytes]:
    """{source: concatenated sha256 digests} of the corpus `key`, rebuilt from its chain of changes.
    `known` ({key: digests}, filled in as corpora are rebuilt) saves rebuilding the start of a chain that
    another corpus shares. An unknown key gives {}; a chain that loops or does not rebuild the corpus its
    key names raises ValueError (a damaged card)."""
    known = {} if known is None else known
    chain, seen = [], set()
    while key not in card.get("corpora", {}) and key not in known:
        change = card.get("corpus_changes", {}).get(key)
        if change is None:
            return {}
        if key in seen:
            raise ValueError(f"data card: the changes of corpus {key} loop")
        seen.add(key)
        chain.append((key, change))
        key = change["base"]
    files = known[key] if key in known else card["corpora"][key]
    for key, change in reversed(chain):
        files = _apply(files, change)
        if _digest(files) != key:
            raise ValueError(f"data card: corpus {key} does not rebuild from its changes")
        known[key] = files
    return files


def checked_card(card: dict, where: str) -> dict:
    """`card` in its compact form (a copy), after checking that every stage's file list rebuilds.
    Raises ValueError naming `where` for a damaged card."""
    try:
        if not isinstance(card, dict) or not isinstance(card.get("stages", {}), dict):
            raise TypeError("not a map of stages")
        checked = compact(copy.deepcopy(card))
        names = list(checked.get("stages", {}))
        known: dict = {}
        for i, stage in enumerate(names):
            corpus_digests(checked, checked["stages"][stage].get("corpus"), known)  # rebuilds, else raises
            of = checked["stages"][stage].get("sources_of")
            if of is not None and (of not in names[:i] or "sources" not in checked["stages"][of]):
                raise ValueError(f"stage {stage}: sources_of names no earlier stage with its own sources")
        return checked
    except (TypeError, AttributeError, KeyError, ValueError, RecursionError) as exc:
        raise ValueError(f"{where}: damaged data card ({type(exc).__name__}: {exc}); the stages it records "
                         "cannot be carried into a new model") from None


def stage_files(card: dict, stage: str) -> list[tuple[str, bytes]]:
    """(source, sha256) of every file a stage trained on, in any form of the card. Raises KeyError
    for an unknown stage, ValueError for a damaged chain of corpus changes."""
    entry = card["stages"][stage]
    if isinstance(entry.get("files"), list):
        return [(source, bytes(digest)) for source, _path, digest in entry["files"]]
    files = corpus_digests(card, entry.get("corpus"))
    return [(source, digests[k:k + 32]) for source, digests in files.items() for k in range(0, len(digests), 32)]


def data_card(corpus: Path, stage: str, result, cfg, previous: dict | None, mix: dict | None = None,
              shape: dict | None = None) -> dict:
    """The card of `previous` (a copy) with this stage added under a new key (`code`, `code-2`, ...);
    `mix` records how the stage mixed its data (FIM rate, context rate, pair share), `shape` the model's
    layers and parameters where a stage changed them (train.grow)."""
    summary = json.loads((corpus / SUMMARY_FILE).read_text()) if (corpus / SUMMARY_FILE).exists() else {}
    card = compact(copy.deepcopy(previous or {}))
    card.pop("eval", None)  # held-out figures belong to the model they were measured on
    files = corpus_files(corpus)
    key = _digest(files)
    if not corpus_digests(card, key):
        card["corpora"][key] = files
    stages = card.setdefault("stages", {})
    name, n = stage, 2
    while name in stages:  # fine-tuning adds a stage; the base model's stages stay on record
        name, n = f"{stage}-{n}", n + 1
    stages[name] = {
        "corpus_summary": {k: v for k, v in summary.items() if k != "sources"},
        "sources": summary.get("sources", {}),
        "corpus": key,
        "steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 1),
        "device": str(choose_device(None)) if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "train_loss": result.train_loss, "val_loss": result.val_loss,
        "train_config": cfg.to_dict(),  # the last sitting's; `sittings` has each one's changing flags
        **({"sittings": result.sittings} if result.sittings else {}),
        **({"mix": mix} if mix else {}),
        **({"shape": shape} if shape else {}),
    }
    return compact(card)
