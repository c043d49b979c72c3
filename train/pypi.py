"""PyPI source distributions fetched from the index's JSON API, without a pip process.

pip prepares each package's metadata before it keeps the file (seconds of CPU each, most of a whole-list
corpus build); the JSON API names the newest release's files and their SHA-256, which is all a corpus
build needs. Every failure here is an answer of None or [], so that the caller can fall back to pip.
"""
from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

# PyPI's JSON API (https://docs.pypi.org/api/json/): the files of a project's newest release
JSON_API = "https://pypi.org/pypi/{name}/json"
PYPI_INDEX = ("https://pypi.org/", "https://pypi.python.org/")
JSON_MAX_BYTES = 16 << 20
SDIST_MAX_BYTES = 1 << 30
# the archives a corpus build unpacks (sources.extract_shell_members: tar, compressed or not, and zip)
ARCHIVE = re.compile(r"\.(tar(\.(gz|xz|bz2|lzma))?|tgz|zip)$")
SHA256 = re.compile(r"[0-9a-f]{64}")
FAILURES = (OSError, ValueError, http.client.HTTPException)

# after this many failures in a row to reach the index at all, a build stops asking it: a machine
# without it then waits a few timeouts, not one a package
UNREACHABLE_AFTER = 3
_no_answer = {"count": 0}
_no_answer_lock = threading.Lock()


def _read(response, write, limit: int, deadline: float) -> None:
    """Pass `response` to `write` a piece at a time until its end.

    Raises OSError past `limit` bytes or past `deadline` (time.monotonic): a socket timeout counts from
    the last byte received, so a server sending a byte at a time would never reach it."""
    size = 0
    while chunk := response.read1(1 << 16):
        size += len(chunk)
        if size > limit:
            raise OSError(f"answer over {limit} bytes")
        if time.monotonic() > deadline:
            raise OSError("answer took too long")
        write(chunk)


def sdist_of(name: str, timeout: float = 30) -> dict | None:
    """The source distribution of the newest release of PyPI project `name` as the JSON API lists it:
    {"filename", "url" (absolute), "sha256", "size" (bytes or None)}; None when that release has none.

    Raises OSError (urllib.error.URLError, HTTPError for an unknown project) when the index cannot answer,
    http.client.HTTPException when its answer is not HTTP, ValueError when it is not the JSON it should be
    or lists the file without a plain archive name, an http(s) address and a SHA-256."""
    url = JSON_API.format(name=urllib.parse.quote(name, safe=""))
    body = bytearray()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        _read(response, body.extend, JSON_MAX_BYTES, time.monotonic() + 4 * timeout)
    try:
        release = json.loads(body)
    except RecursionError:
        raise ValueError(f"the index's answer for {name} is nested too deep") from None
    files = release.get("urls") if isinstance(release, dict) else None
    if not isinstance(files, list):
        raise ValueError(f"the index's answer for {name} has no list of files")
    for file in files:
        if isinstance(file, dict) and file.get("packagetype") == "sdist" and not file.get("yanked"):
            return _checked_file(name, url, file)
    return None


def _checked_file(name: str, api_url: str, file: dict) -> dict:
    filename, url, digests = file.get("filename"), file.get("url"), file.get("digests")
    sha256 = digests.get("sha256") if isinstance(digests, dict) else None
    if not (isinstance(filename, str) and PurePosixPath(filename).name == filename and ARCHIVE.search(filename)):
        raise ValueError(f"the index names {name}'s sdist {filename!r}, not an archive's file name")
    if not isinstance(url, str) or not isinstance(sha256, str) or not SHA256.fullmatch(sha256.lower()):
        raise ValueError(f"the index lists {name}'s sdist without an address or SHA-256")
    url = urllib.parse.urljoin(api_url, url)  # a mirror may give it relative
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"the index gives {name}'s sdist the address {url!r}")
    size = file.get("size")
    return {"filename": filename, "url": url, "sha256": sha256.lower(),
            "size": size if isinstance(size, int) and size > 0 else None}


def download_checked(url: str, target: Path, sha256: str, max_bytes: int = SDIST_MAX_BYTES,
                     timeout: float = 60, deadline_s: float = 900) -> None:
    """Stream `url` into `target` and check its SHA-256 (lower-case hex).

    Raises OSError (and removes what it wrote) when the transfer fails, passes `max_bytes` or
    `deadline_s` seconds, or the digest differs; http.client.HTTPException for a broken HTTP answer."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        out = open(target, "wb")
        try:
            with out:  # closing may fail too (a full disk): then the file goes as well
                def write(chunk: bytes) -> None:
                    digest.update(chunk)
                    out.write(chunk)
                _read(response, write, max_bytes, time.monotonic() + deadline_s)
            if digest.hexdigest() != sha256:
                raise OSError(f"{target.name}: SHA-256 {digest.hexdigest()} is not the index's {sha256}")
        except BaseException:
            target.unlink(missing_ok=True)
            raise


def _pip_told_otherwise() -> bool:
    """Whether pip is set to use an index other than pypi.org, or none: `index-url` or `no-index` in the
    environment (PIP_INDEX_URL, PIP_NO_INDEX) or in pip's configuration files."""
    settings = dict(_pip_config(os.environ.get("PIP_CONFIG_FILE")))
    for key, variable in (("index-url", "PIP_INDEX_URL"), ("no-index", "PIP_NO_INDEX")):
        if os.environ.get(variable):  # the environment overrides the files, as in pip
            settings[key] = os.environ[variable]
    index = settings.get("index-url", "").strip()
    no_index = settings.get("no-index", "").strip().lower() not in ("", "0", "false", "no", "off")
    return no_index or bool(index) and not index.startswith(PYPI_INDEX)


@functools.lru_cache(maxsize=None)
def _pip_config(_config_file: str | None) -> dict[str, str]:
    """`index-url` and `no-index` as pip's configuration files set them for `pip download` (sections
    global and download; `pip config list`, once for each PIP_CONFIG_FILE); {} when pip
    cannot say."""
    try:
        listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found = {}
    for section, key, value in re.findall(r"^(global|download)\.(index-url|no-index)='(.*)'$", listed, re.M):
        if section == "download" or key not in found:  # the download section overrides global
            found[key] = value
    return found


def fetch_sdist(name: str, work: Path) -> list[Path]:
    """The newest sdist of PyPI project `name`, downloaded into `work` and checked: [path], or [] when the
    index has none, cannot be reached or answers wrongly (then pip is the way), or when pip is told to use
    another index (PIP_INDEX_URL, PIP_NO_INDEX)."""
    if _pip_told_otherwise() or _no_answer["count"] >= UNREACHABLE_AFTER:
        return []
    try:
        file = sdist_of(name)
    except urllib.error.HTTPError:  # the index answered, on this package only
        file = None
    except urllib.error.URLError:  # no answer at all
        with _no_answer_lock:
            _no_answer["count"] += 1
        return []
    except FAILURES:
        return []
    _no_answer["count"] = 0  # counted are failures in a row: a blip does not end the quick way
    if file is None:
        return []
    target = work / file["filename"]
    try:
        download_checked(file["url"], target, file["sha256"],
                         max_bytes=min(file["size"] or SDIST_MAX_BYTES, SDIST_MAX_BYTES))
    except FAILURES:
        return []
    return [target]
