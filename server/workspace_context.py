"""Context from other files for the document being completed: the files it sources and chunks of the
other open shell documents (codellm.crossfile chooses; this module decides what may be read).

A sourced file is read through the editor when it is open; otherwise from disk only when its real path
(symbolic links resolved) lies inside a workspace folder the client declared, and only if it is a
regular file of at most MAX_FILE_BYTES of UTF-8: never devices, FIFOs or anything outside the workspace.
A workspace folder that is the filesystem root `/` allows no reading from disk (every file would be
inside it); the files open in the editor still count. A home folder is taken as declared: it is where
many people open their editor, and only the files a script sources are read. A file: URI naming
another host (file://host/...) is no local path.

Open documents are kept in a small ring (the RING_DOCUMENTS most recently opened or changed); a
document's chunks are cut again when it changes.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from urllib.parse import unquote, urlparse

from codellm import crossfile
from codellm.prompt import ContextChunk

MAX_FILE_BYTES = crossfile.MAX_FILE_BYTES
RING_DOCUMENTS = 8
log = logging.getLogger("codellm.server")
DISK_CACHE_ENTRIES = 64
TOLD_ENTRIES = 1024  # file versions whose refusal was logged


def uri_to_path(uri: str) -> str | None:
    """The absolute POSIX path of a local file: URI, else None (also for another host's file, and for a
    path holding a NUL byte: no file has one, and the os functions raise ValueError for it)."""
    parsed = urlparse(uri)
    if parsed.scheme != "file" or not parsed.path or parsed.netloc.lower() not in ("", "localhost"):
        return None
    path = os.path.normpath(unquote(parsed.path))
    return path if "\0" not in path else None


def inside(path: str, folders: list[str]) -> bool:
    """`path` (a resolved path) lies in one of `folders` (resolved paths)."""
    return any(path == f or path.startswith(f.rstrip(os.sep) + os.sep) for f in folders)


def read_workspace_file(path: str, folders: list[str]) -> str | None:
    """The text of a regular file whose real path lies inside one of `folders`; None for anything else
    (outside, missing, a device or FIFO, larger than MAX_FILE_BYTES, not UTF-8, a path the os functions
    refuse such as one holding a NUL byte)."""
    return workspace_file(path, folders)[0]


def workspace_file(path: str, folders: list[str]) -> tuple[str | None, str | None]:
    """(text, None) as read_workspace_file gives it, or (None, why) for a file inside the folders that
    exists and is refused (not UTF-8, a binary file, too large, a device): the person editing should learn
    why a file their script sources gives no context. A file outside the folders or missing is (None, None)."""
    try:
        real = os.path.realpath(path)
        if not inside(real, [os.path.realpath(f) for f in folders]):
            return None, None
        info = os.stat(real)
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return None, None
    try:
        crossfile.check_context_stat(path, info)  # before opening too: a device is never opened
        return crossfile.read_context_file(real, follow_links=False), None
    except ValueError as exc:  # refused, saying why (read_context_file names the real path)
        return None, str(exc).replace(real, path, 1)


def document_path(uri: str) -> str:
    """How an open document is named among the context: its path (uri_to_path), else its URI."""
    return uri_to_path(uri) or uri


class OpenDocumentRing:
    """The most recently opened or changed shell documents (uri -> text), with their chunks cut lazily
    (kept under the document's path, document_path, and dropped with the document)."""

    def __init__(self, size: int = RING_DOCUMENTS):
        self.size = size
        self.texts: OrderedDict[str, str] = OrderedDict()
        self._chunks: dict[str, tuple[str, list[ContextChunk]]] = {}

    def update(self, uri: str, text: str) -> None:
        """A document was opened or changed: it becomes the newest of the ring."""
        self.texts[uri] = text
        self.texts.move_to_end(uri)
        while len(self.texts) > self.size:
            old, _ = self.texts.popitem(last=False)
            self._chunks.pop(document_path(old), None)

    def remove(self, uri: str) -> None:
        self.texts.pop(uri, None)
        self._chunks.pop(document_path(uri), None)

    def chunks(self, path: str, text: str) -> list[ContextChunk]:
        """The chunks of a document's text, cut again only when the text changed; `path` is its
        document_path."""
        cached = self._chunks.get(path)
        if cached is None or cached[0] is not text and cached[0] != text:
            cached = (text, crossfile.line_chunks(text, path))
            self._chunks[path] = cached
        return cached[1]


class WorkspaceContext:
    """Chooses the context for a cursor from the sourced files and the ring of open documents.

    `open_text(uri)` gives an open document's text (or None), `folders()` the workspace folders."""

    def __init__(self, open_text, folders):
        self.open_text = open_text
        self.folders = folders
        self.ring = OpenDocumentRing()
        self._disk: OrderedDict[tuple, tuple[str | None, str | None]] = OrderedDict()
        self.refused: dict[str, str] = {}  # path -> why it gave no context, at the last cursor (workspace_file)
        self._told: OrderedDict[tuple, None] = OrderedDict()

    def disk_folders(self) -> list[str]:
        """The workspace folders files may be read from disk in, as declared and with symbolic links
        resolved; never one that is the filesystem root."""
        found = []
        for folder in self.folders():
            try:
                real = os.path.realpath(folder)
            except (OSError, ValueError):
                continue
            if real != "/":
                found += [folder, real]
        return list(dict.fromkeys(found))

    def _open_by_path(self) -> dict[str, str]:
        return {p: t for uri, t in self.ring.texts.items() if (p := uri_to_path(uri))}

    def read(self, path: str, folders: list[str] | None = None) -> str | None:
        """A sourced file: the editor's text when open, else the workspace file (read_workspace_file).
        A path that is not inside the folders (disk_folders) as written is never passed to the os (a
        hung network mount outside the workspace does not block the server)."""
        text = self._open_by_path().get(path)
        if text is not None:
            return text
        folders = self.disk_folders() if folders is None else folders
        if not inside(path, folders):
            return None
        try:
            info = os.stat(path)
            # the folders are part of the key: a link's target may be inside some folders and not others
            key = (path, info.st_mtime_ns, info.st_size, tuple(folders))
        except (OSError, ValueError):  # ValueError: a NUL byte in the path
            return None
        if key in self._disk:
            self._disk.move_to_end(key)
        else:
            self._disk[key] = workspace_file(path, folders)
            if len(self._disk) > DISK_CACHE_ENTRIES:
                self._disk.popitem(last=False)
        text, why = self._disk[key]
        if why:
            self._tell_once(key, why)
            self.refused.setdefault(path, why)
        return text

    def _tell_once(self, key: tuple, why: str) -> None:
        """Log why a sourced file gives no context, once per file version (not at each keystroke)."""
        if key not in self._told:
            self._told[key] = None
            if len(self._told) > TOLD_ENTRIES:
                self._told.popitem(last=False)
            # a path from the document may hold lone surrogates (bytes that are not UTF-8): escaped
            log.info("sourced file gives no context: %s", why.encode("utf-8", "backslashreplace").decode())

    def chunks_for(self, uri: str, prefix: str, suffix: str) -> list[ContextChunk]:
        """Context chunks for a cursor in document `uri`, best first."""
        doc_path = uri_to_path(uri) or "/" + uri.rsplit("/", 1)[-1]
        folders = self.disk_folders()
        self.refused = {}
        sourced = crossfile.read_sourced(prefix + suffix, doc_path, lambda path: self.read(path, folders),
                                         self.folders())
        sourced_paths = {p for p, _ in sourced}
        # a `source` line's candidates (one relative path in several folders) share a name: a refused
        # candidate is no loss when another was read
        used = {os.path.basename(p) for p in sourced_paths}
        self.refused = {p: why for p, why in self.refused.items() if os.path.basename(p) not in used}
        others = [(p, t) for u, t in self.ring.texts.items()
                  if u != uri and (p := document_path(u)) not in sourced_paths]
        return crossfile.choose_context(prefix, suffix, sourced, others, doc_path, self.ring.chunks)
