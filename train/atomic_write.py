"""Writing a file so that a failure (a full disk, a kill, an error midway) leaves what was there before:
the data goes to a temporary sibling that replaces the file only once it is complete."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: Path, mode: str = "wb", **open_args) -> Iterator:
    """Opens a temporary sibling of `path` (hidden, `.NAME.tmp`) for writing; when the block ends without
    an error it is flushed to disk and replaces `path` (os.replace: atomic on one file system), else it is
    removed and the error goes on. Creates `path`'s folder if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # so a power cut after the rename cannot leave an empty file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    """Writes `data` to `path` through atomic_write."""
    with atomic_write(path) as f:
        f.write(data)
