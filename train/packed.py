"""One-file corpora: a built corpus folder packed into a single compressed file, to carry to a GPU.

A pack holds the corpus files (shell, comment-to-command pairs, English, summary) as lzma-compressed
msgpack streams inside one msgpack map; records leave out their sha256, which unpacking computes again. Training reads a pack as it reads a corpus folder: it is
unpacked next to the run (once) and tokenised there, so fill-in-the-middle keeps its character-level
split points. Unpacking needs only the standard library and msgpack.
"""
from __future__ import annotations

import io
import lzma
import os
from pathlib import Path

import msgpack

from .corpus import sha256
from .recipe import ENGLISH_FILE, PAIRS_FILE, SHELL_FILE, SUMMARY_FILE

PACK_FORMAT = "codellm-corpus-pack/2"
READABLE_FORMATS = ("codellm-corpus-pack/1", PACK_FORMAT)
PACKED_FILES = (SHELL_FILE, PAIRS_FILE, ENGLISH_FILE, SUMMARY_FILE)
RECORD_FILES = (SHELL_FILE, PAIRS_FILE, ENGLISH_FILE)


def compress(data: bytes) -> bytes:
    """LZMA2 at its strongest preset, with a dictionary as large as the data (up to 256 MiB): shell scripts
    repeat each other across the whole corpus, further apart than a preset's 64 MiB window reaches."""
    dict_size = max(1 << 20, min(1 << 28, 1 << max(0, len(data) - 1).bit_length()))
    return lzma.compress(data, format=lzma.FORMAT_XZ,
                         filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dict_size}])


def without_digests(records: list[dict]) -> bytes:
    """The records as a msgpack stream, each sha256 left out where it is the text's own (unpacking
    computes it again): 64 hex digits a file do not compress."""
    return b"".join(msgpack.packb({k: v for k, v in r.items() if not (k == "sha256" and v == sha256(r["text"]))},
                                  use_bin_type=True) for r in records)


def with_digests(stream: bytes) -> bytes:
    """A packed record stream with every record's sha256 back in place."""
    return b"".join(msgpack.packb(r if "sha256" in r else {**r, "sha256": sha256(r["text"])}, use_bin_type=True)
                    for r in msgpack.Unpacker(io.BytesIO(stream), raw=False))


def english_sample(records: list[dict], share: float) -> list[dict]:
    """A fixed sample of English documents (in sha256 order) holding about `share` of their characters."""
    budget, kept, total = share * sum(len(r["text"]) for r in records), [], 0
    for r in sorted(records, key=lambda r: r["sha256"]):
        if total + len(r["text"]) <= budget:
            kept.append(r)
            total += len(r["text"])
    return kept


def pack_corpus(corpus: Path, out: Path, max_mb: float = 60.0, log=print) -> int:
    """Write the corpus folder's files into one file `out`; returns its size in bytes. Shell scripts and
    comment-to-command pairs go in whole; where the pack would exceed max_mb, a sample of the English
    documents (a small share of a shell stage's text) goes in instead of all of them.

    Raises FileNotFoundError when the folder has no shell corpus, and ValueError when the pack would
    exceed max_mb even without English (nothing is left behind then)."""
    corpus, out = Path(corpus), Path(out)
    if not (corpus / SHELL_FILE).exists():
        raise FileNotFoundError(f"{corpus}: no {SHELL_FILE} here (build one with `codellm-train corpus`)")
    files, english = {}, None
    for name in PACKED_FILES:
        if (corpus / name).exists():
            raw = (corpus / name).read_bytes()
            if name in RECORD_FILES:
                records = list(msgpack.Unpacker(io.BytesIO(raw), raw=False))
                english = records if name == ENGLISH_FILE else english
                raw = without_digests(records)
            files[name] = compress(raw)
            log(f"  {name}: {(corpus / name).stat().st_size / 1e6:.1f} MB -> {len(files[name]) / 1e6:.1f} MB")
    data = packed(files)
    if len(data) > max_mb * 1e6 and english:
        data = fit_english(files, english, max_mb, log)
    if len(data) > max_mb * 1e6:
        raise ValueError(f"the pack would be {len(data) / 1e6:.1f} MB, over --max-mb {max_mb:g}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    log(f"packed {corpus} into {out}: {len(data) / 1e6:.1f} MB")
    return len(data)


def fit_english(files: dict[str, bytes], english: list[dict], max_mb: float, log) -> bytes:
    """The pack with files[ENGLISH_FILE] replaced by the largest sample found (in a few tries) that fits."""
    share, data = 1.0, packed(files)
    for _ in range(4):
        room = max_mb * 1e6 - (len(data) - len(files[ENGLISH_FILE]))
        share *= 0.97 * max(0.0, room) / len(files[ENGLISH_FILE])  # a sample compresses a little worse
        sample = english_sample(english, min(1.0, share))
        files[ENGLISH_FILE] = compress(without_digests(sample))
        data = packed(files)
        if len(data) <= max_mb * 1e6:
            log(f"  {ENGLISH_FILE}: {len(sample)} of {len(english)} documents, to fit --max-mb {max_mb:g}")
            break
    return data


def packed(files: dict[str, bytes]) -> bytes:
    return msgpack.packb({"format": PACK_FORMAT, "files": files}, use_bin_type=True)


def unpack_corpus(pack: Path, dest: Path) -> Path:
    """Unpack a corpus pack into the folder `dest` (atomically per file); returns dest.

    Raises ValueError naming the file when it is not a corpus pack or is damaged."""
    pack = Path(pack)
    try:
        data = msgpack.unpackb(pack.read_bytes(), raw=False)
        if not isinstance(data, dict) or data.get("format") not in READABLE_FORMATS:
            raise ValueError("not a corpus pack")
        files = {name: lzma.decompress(blob) for name, blob in data["files"].items() if name in PACKED_FILES}
        files = {name: with_digests(blob) if name in RECORD_FILES else blob for name, blob in files.items()}
    except (ValueError, KeyError, TypeError, lzma.LZMAError, msgpack.UnpackException) as exc:
        raise ValueError(f"{pack}: not a readable corpus pack ({exc})") from exc
    if SHELL_FILE not in files:
        raise ValueError(f"{pack}: the pack holds no {SHELL_FILE}")
    dest.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        tmp = dest / (name + ".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, dest / name)
    return dest
