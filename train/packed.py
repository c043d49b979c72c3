"""One-file corpora: a built corpus folder packed into a single compressed file, to carry to a GPU.

A pack holds the corpus files (shell, comment-to-command pairs, English, summary) as lzma-compressed
msgpack streams inside one msgpack map; a record's sha256 is left out where
unpacking can compute it again. Training reads a pack as it reads a corpus folder: it is
unpacked next to the run (once) and tokenised there, so fill-in-the-middle keeps its character-level
split points. Unpacking needs only the standard library and msgpack.
"""
from __future__ import annotations

import hashlib
import io
import json
import lzma
from pathlib import Path

import msgpack

from .atomic_write import write_bytes
from .corpus import read_records, sha256
from .recipe import ENGLISH_FILE, PAIRS_FILE, SHELL_FILE, SUMMARY_FILE

PACK_FORMAT = "codellm-corpus-pack/2"
READABLE_FORMATS = ("codellm-corpus-pack/1", PACK_FORMAT)
PACKED_FILES = (SHELL_FILE, PAIRS_FILE, ENGLISH_FILE, SUMMARY_FILE)
RECORD_FILES = (SHELL_FILE, PAIRS_FILE, ENGLISH_FILE)
UNPACKED_FILE = ".unpacked.json"  # {file: sha256 of the bytes written} of the last unpack into a folder


def compress(data: bytes) -> bytes:
    """LZMA2 at its strongest preset, with a dictionary as large as the data (up to 256 MiB): shell scripts
    repeat each other across the whole corpus, further apart than a preset's 64 MiB window reaches."""
    dict_size = max(1 << 20, min(1 << 28, 1 << max(0, len(data) - 1).bit_length()))
    return lzma.compress(data, format=lzma.FORMAT_XZ,
                         filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dict_size}])


def own_digest(r) -> bool:
    """The record's sha256 is its text's own (so that unpacking can compute it again)."""
    return isinstance(r, dict) and isinstance(r.get("text"), str) and r.get("sha256") == sha256(r["text"])


def without_digests(records: list) -> bytes:
    """The records as a msgpack stream, each sha256 that is its text's own replaced by nil (unpacking
    computes it again): 64 hex digits a file do not compress."""
    return b"".join(msgpack.packb({**r, "sha256": None} if own_digest(r) else r, use_bin_type=True) for r in records)


def with_digests(stream: bytes) -> bytes:
    """A packed record stream with every record's sha256 back in place."""
    out = []
    for r in msgpack.Unpacker(io.BytesIO(stream), raw=False):
        if isinstance(r, dict) and "sha256" in r and r["sha256"] is None and isinstance(r.get("text"), str):
            r["sha256"] = sha256(r["text"])
        out.append(msgpack.packb(r, use_bin_type=True))
    return b"".join(out)


def english_sample(records: list, share: float) -> list[dict]:
    """A fixed sample of English documents (in the order of their texts' sha256) holding about `share`
    of their characters."""
    docs = [r for r in records if isinstance(r, dict) and isinstance(r.get("text"), str)]
    budget, kept, total = share * sum(len(r["text"]) for r in docs), [], 0
    for r in sorted(docs, key=lambda r: sha256(r["text"])):
        if total + len(r["text"]) <= budget:
            kept.append(r)
            total += len(r["text"])
    return kept


def read_corpus_records(path: Path) -> list[dict]:
    """A corpus file's records (corpus.read_records); ValueError naming the file when it is not a msgpack
    stream of UTF-8."""
    try:
        return list(read_records(path))
    except (ValueError, msgpack.UnpackException) as exc:
        raise ValueError(f"{path}: not a readable corpus file ({type(exc).__name__}: {exc})") from None


def check_pack_target(corpus: Path, out: Path) -> None:
    """ValueError for an --out that is a folder or lies in the corpus folder (a corpus file would be lost)."""
    corpus, target = corpus.resolve(), out.resolve()
    if target == corpus or corpus in target.parents:
        raise ValueError(f"{out}: inside the corpus folder {corpus}; write the pack elsewhere")
    if target.is_dir():
        raise ValueError(f"{out}: is a folder; give the pack's file name")


def pack_corpus(corpus: Path, out: Path, max_mb: float = 60.0, log=print) -> int:
    """Write the corpus folder's files into one file `out`; returns its size in bytes. Shell scripts and
    comment-to-command pairs go in whole; where the pack would exceed max_mb, a sample of the English
    documents (a small share of a shell stage's text) goes in instead of all of them, and the packed
    summary says so.

    Raises FileNotFoundError when the folder has no shell corpus, and ValueError for a corpus file that
    cannot be read, an `out` inside the corpus folder, or a pack that would exceed max_mb even without
    English (nothing is left behind then)."""
    corpus, out = Path(corpus), Path(out)
    if not (corpus / SHELL_FILE).exists():
        raise FileNotFoundError(f"{corpus}: no {SHELL_FILE} here (build one with `codellm-train corpus`)")
    check_pack_target(corpus, out)
    files, english = {}, None
    for name in PACKED_FILES:
        if (corpus / name).exists():
            if name in RECORD_FILES:
                records = read_corpus_records(corpus / name)
                english = records if name == ENGLISH_FILE else english
                files[name] = compress(without_digests(records))
            else:
                files[name] = compress((corpus / name).read_bytes())
            log(f"  {name}: {(corpus / name).stat().st_size / 1e6:.1f} MB -> {len(files[name]) / 1e6:.1f} MB")
    data = packed(files)
    if len(data) > max_mb * 1e6 and english:
        sample = fit_english(files, english, max_mb)
        log(f"  {ENGLISH_FILE}: {len(sample)} of {len(english)} documents, to fit --max-mb {max_mb:g}")
        if SUMMARY_FILE in files:
            files[SUMMARY_FILE] = compress(sampled_summary((corpus / SUMMARY_FILE).read_bytes(), sample, len(english)))
        data = packed(files)
    if len(data) > max_mb * 1e6:
        raise ValueError(f"the pack would be {len(data):,} bytes, over --max-mb {max_mb:g} "
                         f"({max_mb * 1e6:,.0f} bytes) even without English")
    write_bytes(out, data)
    log(f"packed {corpus} into {out}: {len(data) / 1e6:.1f} MB")
    return len(data)


def fit_english(files: dict[str, bytes], english: list, max_mb: float) -> list[dict]:
    """Replaces files[ENGLISH_FILE] by the largest English sample found (in a few tries) with which the
    pack fits, or by none; returns the sample."""
    share, data = 1.0, packed(files)
    for _ in range(4):
        room = max_mb * 1e6 - (len(data) - len(files[ENGLISH_FILE]))
        share *= 0.97 * max(0.0, room) / len(files[ENGLISH_FILE])  # a sample compresses a little worse
        sample = english_sample(english, min(1.0, share))
        files[ENGLISH_FILE] = compress(without_digests(sample))
        data = packed(files)
        if len(data) <= max_mb * 1e6:
            return sample
    files[ENGLISH_FILE] = compress(b"")
    return []


def sampled_summary(summary: bytes, sample: list[dict], total: int) -> bytes:
    """The corpus summary with its English figures those of the sample (the data card reads them)."""
    try:
        data = json.loads(summary)
        data["english"] = {**data.get("english", {}), "files": len(sample), "sampled_from_files": total,
                           "bytes": sum(len(r["text"].encode("utf-8")) for r in sample)}
    except (ValueError, TypeError, AttributeError):
        return summary  # not a summary codellm-train wrote: packed as it is
    return json.dumps(data, indent=1).encode()


def packed(files: dict[str, bytes]) -> bytes:
    return msgpack.packb({"format": PACK_FORMAT, "files": files}, use_bin_type=True)


def unpack_corpus(pack: Path, dest: Path) -> Path:
    """Unpack a corpus pack into the folder `dest` (atomically per file); returns dest. A corpus file
    an earlier unpack wrote there, unchanged since, that this pack lacks is removed (stale_unpacked): the
    folder then holds this pack's corpus, not another's pairs or English; files made otherwise stay.

    Raises ValueError naming the file when it is not a corpus pack or is damaged."""
    pack = Path(pack)
    try:
        data = msgpack.unpackb(pack.read_bytes(), raw=False)
        if not isinstance(data, dict) or data.get("format") not in READABLE_FORMATS:
            raise ValueError("not a corpus pack")
        files = {name: lzma.decompress(blob) for name, blob in data["files"].items() if name in PACKED_FILES}
        files = {name: with_digests(blob) if name in RECORD_FILES else blob for name, blob in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError, lzma.LZMAError, msgpack.UnpackException) as exc:
        raise ValueError(f"{pack}: not a readable corpus pack ({type(exc).__name__}: {exc})") from exc
    if SHELL_FILE not in files:
        raise ValueError(f"{pack}: the pack holds no {SHELL_FILE}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in stale_unpacked(dest, set(files)):
        (dest / name).unlink()
    for name, blob in files.items():
        write_bytes(dest / name, blob)
    write_bytes(dest / UNPACKED_FILE, json.dumps({n: file_digest(b) for n, b in files.items()}).encode())
    return dest


def file_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stale_unpacked(dest: Path, keep: set[str]) -> list[str]:
    """The corpus files in `dest` outside `keep` whose bytes are still those an earlier unpack wrote
    (recorded in UNPACKED_FILE): another pack's, not the user's."""
    try:
        written = json.loads((dest / UNPACKED_FILE).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(written, dict):
        return []
    stale = []
    for name in sorted(set(PACKED_FILES) & set(written) - keep):
        try:
            if file_digest((dest / name).read_bytes()) == written[name]:
                stale.append(name)
        except OSError:
            pass
    return stale
