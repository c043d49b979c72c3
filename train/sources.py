"""Fetch the raw material of the default recipe: Debian packages and the machine's own docs.

Nothing here edits system apt files: source packages go through a private APT_CONFIG whose
sources list adds a deb-src line. Packages that fail to download are skipped and reported.
"""
from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from importlib import resources


@dataclass(frozen=True)
class PackageSpec:
    kind: str  # "binary" | "source" | "doc"
    name: str
    heldout: bool = False


def read_package_list(path: Path | None = None) -> list[PackageSpec]:
    text = Path(path).read_text() if path else resources.files("codellm.train").joinpath("packages.txt").read_text()
    specs = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if parts[0] not in ("binary", "source", "doc") or len(parts) < 2:
            raise ValueError(f"bad line in package list: {line!r}")
        specs.append(PackageSpec(parts[0], parts[1], "heldout" in parts[2:]))
    return specs


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 1800) -> bool:
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    return proc.returncode == 0


def _private_apt_config(cache: Path) -> dict:
    """An APT_CONFIG that adds deb-src lines without touching /etc/apt."""
    root = cache / "apt"
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
    conf = root / "apt.conf"
    conf.write_text(
        f'Dir::State::Lists "{lists}";\n'
        f'Dir::Etc::SourceList "{root / "sources.list"}";\n'
        f'Dir::Etc::SourceParts "{root / "none"}";\n'
        f'Dir::Cache "{root / "cache"}";\n'
    )
    (root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, APT_CONFIG=str(conf))
    return env


def fetch_packages(specs: list[PackageSpec], cache: Path, log=print) -> dict[str, Path]:
    """Download and unpack each package once; returns {package name: unpacked folder}. Skips failures."""
    cache = Path(cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    failed: list[str] = []
    src_env = None
    for spec in specs:
        dest = cache / "unpacked" / spec.kind / spec.name
        done_marker = dest / ".done"
        if done_marker.exists():
            out[spec.name] = dest
            continue
        work = cache / "download" / spec.kind / spec.name
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(dest, ignore_errors=True)
        work.mkdir(parents=True)
        dest.mkdir(parents=True)
        ok = False
        try:
            if spec.kind in ("binary", "doc"):
                ok = _run(["apt-get", "download", spec.name], work) and all(
                    _run(["dpkg-deb", "-x", str(deb), str(dest)], work) for deb in work.glob("*.deb")
                )
            else:
                if src_env is None:
                    src_env = _private_apt_config(cache)
                    _run(["apt-get", "update", "-q"], cache, src_env)
                ok = _run(["apt-get", "source", "--download-only", spec.name], work, src_env)
                dscs = list(work.glob("*.dsc"))
                ok = ok and bool(dscs) and _run(
                    ["dpkg-source", "--no-check", "--skip-patches", "-x", str(dscs[0]), str(dest / "src")], work
                )
        except (subprocess.TimeoutExpired, OSError) as exc:
            log(f"  {spec.name}: {exc}")
            ok = False
        shutil.rmtree(work, ignore_errors=True)
        if ok:
            done_marker.touch()
            out[spec.name] = dest
            log(f"  fetched {spec.kind} {spec.name}")
        else:
            failed.append(spec.name)
            shutil.rmtree(dest, ignore_errors=True)
            log(f"  skipped {spec.kind} {spec.name}: download or unpack failed")
    if failed:
        log(f"skipped {len(failed)} package(s): {', '.join(failed)}")
    return out


def package_licence(unpacked: Path, name: str) -> str:
    """The licence a package's Debian copyright file names first, or ''."""
    candidates = list(unpacked.glob(f"usr/share/doc/{name}/copyright")) + list(unpacked.glob("src/debian/copyright"))
    for path in candidates:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        match = re.search(r"^License:\s*(\S.*)$", text, re.M)
        if match:
            return match.group(1).strip()
        return "see copyright file"
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
