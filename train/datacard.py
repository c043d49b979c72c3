"""The data card (`data.msgpack` in a bundle): what each training stage learned from, for users who ask.

Per stage: the corpus summary (sizes, curation, sources with licences), figures (steps, tokens, wall
time, device, losses) and the training settings. The sha256 of every training file is kept once per
distinct corpus under `corpora`, grouped by source (`{source: concatenated 32-byte digests}`), and a
stage names its corpus by digest: relay stages that train on the same corpus add no second copy, so
the card stays small enough to ship inside the bundle.
"""
from __future__ import annotations

import copy
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
    """Move per-stage file lists of the older form ([[source, path, sha256], ...]) into `corpora`."""
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
    return card


def stage_files(card: dict, stage: str) -> list[tuple[str, bytes]]:
    """(source, sha256) of every file a stage trained on, in either form of the card. Raises KeyError
    for an unknown stage."""
    entry = card["stages"][stage]
    if isinstance(entry.get("files"), list):
        return [(source, bytes(digest)) for source, _path, digest in entry["files"]]
    files = card.get("corpora", {}).get(entry.get("corpus"), {})
    return [(source, digests[k:k + 32]) for source, digests in files.items() for k in range(0, len(digests), 32)]


def data_card(corpus: Path, stage: str, result, cfg, previous: dict | None, mix: dict | None = None) -> dict:
    """The card of `previous` (a copy) with this stage added under a new key (`code`, `code-2`, ...);
    `mix` records how the stage mixed its data (FIM rate, context rate, pair share)."""
    summary = json.loads((corpus / SUMMARY_FILE).read_text()) if (corpus / SUMMARY_FILE).exists() else {}
    card = compact(copy.deepcopy(previous or {}))
    files = corpus_files(corpus)
    key = _digest(files)
    card["corpora"].setdefault(key, files)
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
        "train_config": cfg.to_dict(),
        **({"mix": mix} if mix else {}),
    }
    return card
