"""Fetch the raw material of the default recipe: Debian packages, npm packages, PyPI source distributions
and the machine's own docs.

Nothing here edits system apt files: source packages go through a private APT_CONFIG whose
sources list adds a deb-src line. Packages that fail to download are skipped and reported.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from importlib import resources

from .atomic_write import write_bytes
from .pypi import ARCHIVE, fetch_sdist


KINDS = ("binary", "source", "doc", "npm", "pypi")


@dataclass(frozen=True)
class PackageSpec:
    kind: str  # "binary" | "source" | "doc" (Debian) | "npm" | "pypi"
    name: str
    heldout: bool = False

    @property
    def source(self) -> str:
        """The record source name: "debian:NAME" (binary or doc), "debian-src:NAME", "npm:NAME", "pypi:NAME"."""
        prefix = {"binary": "debian", "doc": "debian", "source": "debian-src"}.get(self.kind, self.kind)
        return f"{prefix}:{self.name}"

    @property
    def split(self) -> str:
        """"train", or the held-out split: "val" (Debian packages) or "val_user" (npm and PyPI packages)."""
        if not self.heldout:
            return "train"
        return "val_user" if self.kind in ("npm", "pypi") else "val"


# Debian, npm (scoped: @scope/name) and PyPI names; nothing that could climb out of the cache folder or
# reach apt-get, npm or pip as an option
PACKAGE_NAME = re.compile(r"@?\w[\w.+-]*(/\w[\w.+-]*)?", re.ASCII)


def read_package_list(path: Path | None = None) -> list[PackageSpec]:
    """Parse a package list: one `KIND NAME [heldout]` a line, `#` comments.

    Raises ValueError naming the line for an unknown kind, a missing or malformed name (`..` in it, a
    leading `-`), a word other than `heldout` after the name, or a package listed both held out and not."""
    text = Path(path).read_text() if path else resources.files("codellm.train").joinpath("packages.txt").read_text()
    specs: dict[tuple[str, str], PackageSpec] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if parts[0] not in KINDS or len(parts) < 2 or not PACKAGE_NAME.fullmatch(parts[1]) or ".." in parts[1] \
                or any(word != "heldout" for word in parts[2:]):
            raise ValueError(f"bad line in package list: {line!r} (want KIND NAME [heldout], KIND one of "
                             f"{', '.join(KINDS)})")
        spec = PackageSpec(parts[0], parts[1], "heldout" in parts[2:])
        earlier = specs.setdefault((spec.kind, spec.name), spec)
        if earlier.heldout != spec.heldout:
            raise ValueError(f"package list: {spec.kind} {spec.name} is listed both held out and for training")
    return list(specs.values())


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 1800) -> bool:
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    return proc.returncode == 0


def _private_apt_config(cache: Path) -> dict:
    """An APT_CONFIG that adds deb-src lines without touching /etc/apt."""
    root = cache / "apt"
    conf = root / "apt.conf"
    if conf.exists():
        return dict(os.environ, APT_CONFIG=str(conf))
    lists = root / "lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    sources = []
    for src in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]:
        if src.exists():
            sources.append(src.read_text())
    deb822 = "\n".join(sources)
    uris = re.findall(r"^URIs:\s*(\S+)", deb822, re.M) or ["http://deb.debian.org/debian"]
    suites = re.findall(r"^Suites:\s*(.+)$", deb822, re.M) or ["bookworm"]
    lines = []
    for uri, suite_line in zip(uris, suites):
        for suite in suite_line.split():
            lines.append(f"deb-src [trusted=yes] {uri} {suite} main")
    (root / "sources.list").write_text("\n".join(lines) + "\n")
    (root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    write_bytes(conf, (
        f'Dir::State::Lists "{lists}";\n'
        f'Dir::Etc::SourceList "{root / "sources.list"}";\n'
        f'Dir::Etc::SourceParts "{root / "none"}";\n'
        f'Dir::Cache "{root / "cache"}";\n'
    ).encode())
    return dict(os.environ, APT_CONFIG=str(conf))


# files kept from an archive besides shell scripts: where its licence is stated
LICENCE_FILES = ("debian/copyright", "package.json", "PKG-INFO")


def _archive_member_wanted(name: str, head: bytes) -> bool:
    from .corpus import is_shell_file

    return is_shell_file(PurePosixPath(name), head) or name.endswith(LICENCE_FILES)


def _safe_member_path(dest: Path, name: str) -> Path | None:
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".", "/")]
    if not parts or ".." in parts:
        return None
    return dest.joinpath(*parts)


def extract_shell_members(archive: Path, dest: Path, max_bytes: int = 1_000_000) -> int:
    """Write the shell scripts (and licence files) of a tar or zip archive under dest; returns how many.

    Only regular files up to max_bytes are read; names with `..` or absolute paths are skipped, so
    nothing is written outside dest. Raises tarfile.TarError / zipfile.BadZipFile for a broken archive."""
    written = 0

    def keep(name: str, data: bytes) -> None:
        nonlocal written
        target = _safe_member_path(dest, name)
        if target is None:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written += 1

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.is_dir() or info.file_size > max_bytes:
                    continue
                data = zf.read(info)
                if _archive_member_wanted(info.filename, data[:4096]):
                    keep(info.filename, data)
        return written
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:
            if not member.isreg() or member.size > max_bytes:
                continue
            f = tf.extractfile(member)
            data = f.read() if f else b""
            if _archive_member_wanted(member.name, data[:4096]):
                keep(member.name, data)
    return written


def _binary_apt_options(cache: Path) -> list[str]:
    """apt-get options that keep a package cache under cache/apt-bin.

    Container images often switch apt's binary cache off (`Dir::Cache::pkgcache ""`); then every
    `apt-get download` parses all package lists again, about a second of CPU each. Command-line
    options override the configuration files, so the cache is kept without touching /etc/apt."""
    root = cache / "apt-bin"
    (root / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    return ["-o", f"Dir::Cache={root}", "-o", "Dir::Cache::pkgcache=pkgcache.bin",
            "-o", "Dir::Cache::srcpkgcache=srcpkgcache.bin"]


def _fetch_debian_binary(spec: PackageSpec, work: Path, dest: Path, cache: Path) -> bool:
    return _run(["apt-get", *_binary_apt_options(cache), "download", spec.name], work) and all(
        _run(["dpkg-deb", "-x", str(deb), str(dest)], work) for deb in work.glob("*.deb"))


def _fetch_debian_source(spec: PackageSpec, work: Path, dest: Path, cache: Path) -> bool:
    env = _private_apt_config(cache)
    # the newest version may come from a suite whose files the mirror lacks (security updates): then
    # the version of each suite is asked for in turn. The exit status is not trusted either: the
    # upstream tarball, where the scripts are, may arrive while the Debian tarball does not.
    suites = re.findall(r"^deb-src \S+ \S+ (\S+)", (cache / "apt" / "sources.list").read_text(), re.M)
    for target in [spec.name] + [f"{spec.name}/{suite}" for suite in suites]:
        _run(["apt-get", "source", "--download-only", target], work, env)
        archives = [p for p in work.iterdir() if ARCHIVE.search(p.name)]
        if any(".orig." in p.name or ".debian." not in p.name for p in archives):
            break
    for archive in archives:
        extract_shell_members(archive, dest / "src")
    return bool(archives)


def _fetch_npm(spec: PackageSpec, work: Path, dest: Path, cache: Path) -> bool:
    if not _run(["npm", "pack", "--silent", "--ignore-scripts", spec.name], work, timeout=300):
        return False
    archives = list(work.glob("*.tgz"))
    for archive in archives:
        extract_shell_members(archive, dest)
    return bool(archives)


def _fetch_pypi_with_pip(spec: PackageSpec, work: Path) -> list[Path]:
    # pip reads a package's metadata before it keeps the file, with this environment's build tools first
    # (quick) and, where the package needs others (pillow needs pybind11), in an environment of its own,
    # whose tools come as wheels (`--no-binary :all:` would compile Cython and the like for minutes each)
    download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", spec.name,
                "-d", str(work), spec.name]
    if not (_run(download[:-3] + ["--no-build-isolation"] + download[-3:], work, timeout=600)
            or _run(download, work, timeout=900)):
        return []
    return [p for p in work.iterdir() if ARCHIVE.search(p.name)]


def _fetch_pypi(spec: PackageSpec, work: Path, dest: Path, cache: Path) -> bool:
    # source distributions only: wheels rarely carry the build and CI scripts
    archives = fetch_sdist(spec.name, work) or _fetch_pypi_with_pip(spec, work)
    for archive in archives:
        extract_shell_members(archive, dest)
    return bool(archives)


FETCHERS = {"binary": _fetch_debian_binary, "doc": _fetch_debian_binary, "source": _fetch_debian_source,
            "npm": _fetch_npm, "pypi": _fetch_pypi}


def is_fetched(spec: PackageSpec, cache: Path) -> bool:
    """Whether `spec` is unpacked in the download cache already (its `.done` marker)."""
    return (Path(cache) / "unpacked" / spec.kind / spec.name / ".done").exists()


def _fetch_one(spec: PackageSpec, cache: Path, log, retry_failed: bool = False) -> Path | None:
    """Download and unpack one package into cache/unpacked/KIND/NAME (marked .done); None on failure,
    remembered in cache/failed/KIND/NAME so that a rebuild does not ask again unless retry_failed."""
    dest = cache / "unpacked" / spec.kind / spec.name
    failed = cache / "failed" / spec.kind / spec.name
    if is_fetched(spec, cache):
        return dest
    if failed.exists() and not retry_failed:
        return None
    work = cache / "download" / spec.kind / spec.name
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    work.mkdir(parents=True)
    dest.mkdir(parents=True)
    try:
        ok = FETCHERS[spec.kind](spec, work, dest, cache)
    except (subprocess.TimeoutExpired, OSError, tarfile.TarError, zipfile.BadZipFile, EOFError, lzma.LZMAError,
            zlib.error) as exc:
        log(f"  {spec.kind} {spec.name}: {exc}")
        ok = False
    shutil.rmtree(work, ignore_errors=True)
    if not ok:
        shutil.rmtree(dest, ignore_errors=True)
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.touch()
        return None
    failed.unlink(missing_ok=True)
    (dest / ".done").touch()
    return dest


def fetch_order(specs: list[PackageSpec]) -> list[PackageSpec]:
    """The order of downloads: held-out packages first, so that a build stopped part-way already has every
    file that training must avoid; then the others in an order fixed by a hash of their names, so that
    the part fetched is a fair sample of every kind and not the head of the list."""
    return sorted(specs, key=lambda s: (not s.heldout, hashlib.sha256(s.source.encode()).hexdigest()))


def fetch_packages(specs: list[PackageSpec], cache: Path, log=print, workers: int = 4,
                   retry_failed: bool = False, stop_at: float | None = None) -> dict[str, Path]:
    """Download and unpack each package once; returns {source name: unpacked folder}. Skips failures.

    Downloads are the slow part: they run `workers` at a time, each package is kept in `cache`
    once unpacked (a `.done` marker), so an interrupted build resumes where it stopped; packages that
    failed before are skipped unless retry_failed (held-out ones are always asked for again). From
    `stop_at` (time.monotonic) on, no download of a training package starts: those left are skipped."""
    from tqdm import tqdm

    cache = Path(cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    missing = [s for s in specs if not is_fetched(s, cache)]
    if any(s.kind == "source" for s in missing):
        env = _private_apt_config(cache)  # one index update before the parallel downloads
        if not any((cache / "apt" / "lists").glob("*Sources*")):
            _run(["apt-get", "update", "-q"], cache, env)
    if any(s.kind in ("binary", "doc") for s in missing):
        try:
            _run(["apt-cache", *_binary_apt_options(cache), "stats"], cache)  # the cache, built once
        except OSError:  # no apt here: each download says so in turn
            pass
    out: dict[str, Path] = {}
    failed: list[str] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # a held-out package is asked for again each build: without it, copies of its scripts would train
        futures = {pool.submit(_fetch_one, spec, cache, log, retry_failed or spec.heldout): spec
                   for spec in fetch_order(specs)}
        bar = tqdm(as_completed(futures), total=len(futures), desc="packages", unit="pkg",
                   disable=len(specs) < 2, mininterval=5)
        left = 0
        for future in bar:
            spec = futures[future]
            if future.cancelled():
                continue
            folder = future.result()
            if folder is None:
                failed.append(spec.source)
            else:
                out[spec.source] = folder
            if stop_at is not None and not left and time.monotonic() >= stop_at:
                left = sum(f.cancel() for f, s in futures.items() if not s.heldout)
                log(f"download budget spent: {left} package(s) left for a later build")
    if failed:
        log(f"skipped {len(failed)} package(s) that failed to download or unpack: {', '.join(sorted(failed))}")
    heldout_failed = sorted(s.source for s in specs if s.heldout and s.source in failed)
    if heldout_failed:
        log(f"warning: held-out package(s) missing, so their files are neither evaluated on nor kept out of "
            f"training as near-copies: {', '.join(heldout_failed)}")
    return out


def package_licence(unpacked: Path, name: str) -> str:
    """The licence a package names first (Debian copyright file, package.json or PKG-INFO), or ''."""
    for path in list(unpacked.glob(f"usr/share/doc/{name}/copyright")) + list(unpacked.glob("src/debian/copyright")):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        match = re.search(r"^License:\s*(\S.*)$", text, re.M)
        return match.group(1).strip() if match else "see copyright file"
    for path in sorted(unpacked.glob("*/package.json"), key=lambda p: len(p.parts)):
        try:
            licence = json.loads(path.read_text(errors="replace")).get("license", "")
        except (OSError, ValueError, AttributeError):
            continue
        return licence if isinstance(licence, str) else ""
    for path in sorted(unpacked.glob("*/PKG-INFO"), key=lambda p: len(p.parts)):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        match = re.search(r"^License(?:-Expression)?:\s*(\S.*)$", text, re.M)
        return match.group(1).strip()[:80] if match else ""
    return ""


def render_man_page(path: Path, timeout: int = 20) -> str:
    env = dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="0")
    try:
        man = subprocess.run(["man", "--nh", "--nj", "-l", str(path)], env=env, capture_output=True, timeout=timeout)
        col = subprocess.run(["col", "-bx"], input=man.stdout, capture_output=True, timeout=timeout)
    except (subprocess.TimeoutExpired, OSError):
        return ""
    return col.stdout.decode("utf-8", errors="replace") if man.returncode == 0 else ""


def read_info_manual(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace").replace("\x1f", "").replace("\x7f", "")


_TAG = re.compile(r"<[^>]+>")
_SCRIPT_STYLE = re.compile(r"<(script|style)\b.*?</\1>", re.S | re.I)


def html_to_text(html: str) -> str:
    import html as htmllib

    text = _TAG.sub("", _SCRIPT_STYLE.sub("", html))
    text = htmllib.unescape(text)
    return re.sub(r"\n\s*\n\s*\n+", "\n\n", text).strip()
