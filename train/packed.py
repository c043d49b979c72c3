"""One-file corpora: a built corpus folder packed into a single compressed file, to carry to a GPU.

A pack holds the corpus files (shell, comment-to-command pairs, English, summary) as lzma-compressed
msgpack streams inside one msgpack map. Training reads a pack as it reads a corpus folder: it is
unpacked next to the run (once) and tokenised there, so fill-in-the-middle keeps its character-level
split points. Unpacking needs only the standard library and msgpack.
"""
from __future__ import annotations

import lzma
import os
from pathlib import Path

import msgpack

from .recipe import ENGLISH_FILE, PAIRS_FILE, SHELL_FILE, SUMMARY_FILE

PACK_FORMAT = "codellm-corpus-pack/1"
PACKED_FILES = (SHELL_FILE, PAIRS_FILE, ENGLISH_FILE, SUMMARY_FILE)


def pack_corpus(corpus: Path, out: Path, max_mb: float = 60.0, log=print) -> int:
    """Write the corpus folder's files into one file `out`; returns its size in bytes.

    Raises FileNotFoundError when the folder has no shell corpus, and ValueError when the pack would
    exceed max_mb (nothing is left behind then)."""
    corpus, out = Path(corpus), Path(out)
    if not (corpus / SHELL_FILE).exists():
        raise FileNotFoundError(f"{corpus}: no {SHELL_FILE} here (build one with `codellm-train corpus`)")
    files = {}
    for name in PACKED_FILES:
        if (corpus / name).exists():
            files[name] = lzma.compress((corpus / name).read_bytes(), preset=6)
            log(f"  {name}: {(corpus / name).stat().st_size / 1e6:.1f} MB -> {len(files[name]) / 1e6:.1f} MB")
    data = msgpack.packb({"format": PACK_FORMAT, "files": files}, use_bin_type=True)
    if len(data) > max_mb * 1e6:
        raise ValueError(f"the pack would be {len(data) / 1e6:.1f} MB, over --max-mb {max_mb:g}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    log(f"packed {corpus} into {out}: {len(data) / 1e6:.1f} MB")
    return len(data)


def unpack_corpus(pack: Path, dest: Path) -> Path:
    """Unpack a corpus pack into the folder `dest` (atomically per file); returns dest.

    Raises ValueError naming the file when it is not a corpus pack or is damaged."""
    pack = Path(pack)
    try:
        data = msgpack.unpackb(pack.read_bytes(), raw=False)
        if not isinstance(data, dict) or data.get("format") != PACK_FORMAT:
            raise ValueError("not a corpus pack")
        files = {name: lzma.decompress(blob) for name, blob in data["files"].items() if name in PACKED_FILES}
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
