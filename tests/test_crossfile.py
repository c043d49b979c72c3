"""Context from other files: source lines, definitions, the choice of chunks, what the server may read,
the ring of open documents, and a prompt that keeps its start while a person types."""
import asyncio
import os
import subprocess
import sys

from lsprotocol import types

import pytest

from codellm import crossfile
from codellm.crossfile import read_context_file, read_sourced
from codellm.prompt import ContextChunk, build_prompt, build_prompt_with_context, format_context
from codellm.server import workspace_context
from codellm.server.workspace_context import MAX_FILE_BYTES, OpenDocumentRing, WorkspaceContext, read_workspace_file
from codellm.train.data import Mixture, build_epoch
from lsp_session import Session

LIB = """#!/bin/bash
LOG_LEVEL=info
log_info() {
    echo "[info] $*"
}
log_error() {
    echo "[error] $*" >&2
    return 1
}
function fetch_release {
    local url=$1
    curl -fsSL "$url" -o release.tar.gz
    tar -xzf release.tar.gz
    rm -f release.tar.gz
}
"""


def test_source_lines_resolve_literal_and_script_folder_paths():
    text = """#!/bin/bash
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LIBS=$SCRIPT_DIR/lib
source ./lib/common.sh
. "$(dirname "$0")/helpers.sh"
. ${BASH_SOURCE%/*}/more.sh
source "$LIBS/net.sh"
source "$HOME/.config/app.sh"
[ -r /etc/default/app ] && . /etc/default/app
source "$UNKNOWN/x.sh"
"""
    found = crossfile.sourced_paths(text, "/ws/proj/run.sh", ["/ws"])
    firsts = [c[0] for c in found]
    assert firsts == ["/ws/proj/lib/common.sh", "/ws/proj/helpers.sh", "/ws/proj/more.sh", "/ws/proj/lib/net.sh",
                      "/etc/default/app"]
    assert found[0] == ["/ws/proj/lib/common.sh", "/ws/lib/common.sh"]  # then against the workspace folder


def test_definitions_are_functions_and_top_level_assignments():
    chunks = crossfile.definitions(LIB, "/ws/lib.sh")
    names = [crossfile.function_name(c.text) or c.text.split("=")[0] for c in chunks]
    assert names == ["LOG_LEVEL", "log_info", "log_error", "fetch_release"]
    long_one = chunks[-1].text
    assert long_one.startswith("function fetch_release {") and long_one.rstrip().endswith("}") and "# ..." in long_one


def test_chunks_related_to_the_cursor_come_first():
    prefix = "#!/bin/bash\nsource ./lib.sh\n" + "".join(f"step{i}\n" for i in range(6)) + \
        "if ! fetch_release \"$URL\"; then\n  log_error 'no release'\nfi\n" * 3 + "\n" * 8
    chunks = crossfile.choose_context(prefix, "", [("/ws/lib.sh", LIB)], [], "/ws/run.sh")
    assert {crossfile.function_name(c.text) for c in chunks[:2]} == {"fetch_release", "log_error"}
    assert chunks[0].path == "lib.sh"


def test_the_query_leaves_out_the_line_being_typed_and_moves_in_steps():
    prefix = "".join(f"line{i}\n" for i in range(20))
    assert crossfile.query_text(prefix + "ech", "") == crossfile.query_text(prefix + "echo hel", "")
    assert crossfile.query_text(prefix + "x\ny\n", "") == crossfile.query_text(prefix, "")  # 22 lines: same block


def test_a_short_script_ranks_by_its_own_lines_not_by_file_order():
    other = "".join(f"setup_thing_{i}() {{\n  echo {i}\n}}\n" for i in range(40))
    prefix = "#!/bin/bash\nsource ./lib.sh\nfetch_release \"$URL\" || log_error 'no release'\n"
    assert "fetch_release" in crossfile.query_text(prefix + "log", "")
    chunks = crossfile.choose_context(prefix + "log", "", [("/ws/other.sh", other), ("/ws/lib.sh", LIB)], [],
                                      "/ws/run.sh")
    assert chunks[0].path == "lib.sh"


def test_name_candidates_where_a_library_function_may_be_typed():
    context = crossfile.definitions(LIB, "lib.sh")
    start = "#!/bin/bash\nsource ./lib.sh\nlogrotate -f /etc/app.conf\n"
    assert crossfile.name_candidates(start + "log", "\n", context) == ["log_error", "log_info", "logout", "logrotate"]
    assert crossfile.name_candidates(start + "f() {\n  ret", "\n", context + crossfile.definitions(
        "retry() {\n  :\n}\n", "lib.sh")) == ["retry", "return"]  # bash's own names stay possible
    assert crossfile.name_candidates(start + "if ! fetch_release x; then log_e", "\n", context) == ["log_error"]
    assert crossfile.name_candidates(start + "foo() {\n  fet", "\n}\nfetch_all\n", context) == \
        ["fetch_all", "fetch_release"]  # what the script itself calls or defines may be meant too
    assert crossfile.name_candidates(start + "echo log", "\n", context) == []  # an argument, not a command
    for not_a_command in ('echo "${log_', "x=$((log_", 'echo "failed (log_', "# then log_", "echo 'a; log_"):
        assert crossfile.name_candidates(start + not_a_command, "\n", context) == [], not_a_command
    assert crossfile.name_candidates(start + "x=$(log_", "\n", context) == ["log_error", "log_info"]
    assert crossfile.name_candidates(start + "log_info", "\n", context) == []  # typed in full: free to go on
    assert crossfile.typed_word(start + "log\n") == "" and crossfile.name_candidates(start + "log\n", "", context) == []
    for not_a_command in ("files=(log_", "echo if log_", "echo done log_"):
        assert crossfile.name_candidates(start + not_a_command, "\n", context) == [], not_a_command
    assert crossfile.name_candidates(start + "if ! log_", "\n", context) == ["log_error", "log_info"]
    assert crossfile.name_candidates(start + "log_", "info x\n", context) == []  # the cursor is inside the word
    many = [ContextChunk("lib.sh", i, f"log_{i}() {{ :; }}\n") for i in range(crossfile.MAX_NAMES + 1)]
    assert crossfile.name_candidates(start + "log_", "\n", many) == []  # too many to say which
    assert crossfile.name_candidates(start + "l", "\n", context) == []  # one letter says too little
    assert crossfile.name_candidates(start + "tar", "\n", context) == []  # no function of the library
    assert crossfile.name_candidates(start + "log", "\n", []) == []


def test_a_name_being_typed_is_completed_to_a_library_function(bundle_path):
    from codellm.engine import Engine
    from codellm.bundle import load_bundle

    engine = Engine(load_bundle(bundle_path), "cpu")
    prefix = "#!/bin/bash\nsource ./lib.sh\n\nlog_"
    context = crossfile.choose_context(prefix, "\n", [("/ws/lib.sh", LIB)], [], "/ws/run.sh")
    for mode in ("line", "block"):
        text = engine.complete(prefix, "\n", mode, context=context)
        name = ("log_" + text).split()[0] if text.strip() else ""
        assert name.split(";")[0] in ("log_info", "log_error"), text  # the test model alone writes noise here
        assert text.startswith(name[4:]) and text[len(name) - 4:len(name) - 3] in ("", " ", "\n", ";", "&", "|", ")")
    # the tokens allowed along the way: a start of the name's rest, or all of it and a word boundary; free after
    table, ends = engine.tokenizer.token_bytes, [bytes([c]) for c in b" \t\n\r;&|)<>"]

    def keeps_to_a_name(out: bytes) -> bool:
        return any(n.startswith(out) or (out.startswith(n) and out[len(n):len(n) + 1] in ends) for n in names)

    names = [b"log_info", b"log_error"]
    for out in (b"", b"log", b"log_i", b"log_info"):
        allowed = engine.names_allowed(names, bytearray(out), b"", allow_empty=False)
        assert allowed and all(keeps_to_a_name(out + table[i]) for i in allowed)
        assert (engine.tokenizer.encode(names[0][len(out):].decode() + " x")[0] in allowed)
        assert len(allowed) < len(table) // 4
    assert engine.names_allowed(names, bytearray(b"log_info "), b"", allow_empty=False) is None


def test_prompt_with_context_keeps_its_start_while_typing(tokenizer):
    chunks = crossfile.definitions(LIB, "lib.sh")
    line = "fetch_release https://example.org/app.tar.gz && log_info done"
    before = "#!/bin/bash\nsource ./lib.sh\n"
    previous = None
    for n in range(1, len(line)):
        prompt = build_prompt_with_context(tokenizer, chunks, before + line[:n], "\nexit 0\n", "spm", budget=400)
        context_ids = tokenizer.encode(format_context(chunks))
        assert context_ids[:5] == prompt.ids[prompt.ids.index(tokenizer.fim_middle_id) + 1:][:5]
        if previous is not None:  # all but the last few (backed-off) tokens are the same as one keystroke before
            same = next((i for i, (a, b) in enumerate(zip(previous, prompt.ids)) if a != b), len(previous))
            assert same >= len(previous) - 3
        previous = prompt.ids


def test_context_takes_only_the_room_the_file_leaves(tokenizer):
    chunks = crossfile.definitions(LIB, "lib.sh")
    short = build_prompt_with_context(tokenizer, chunks, "#!/bin/bash\nlog_", "", "spm", budget=300)
    assert len(short.ids) > len(build_prompt(tokenizer, "#!/bin/bash\nlog_", "", "spm", 300).ids)
    long_prefix = "echo step\n" * 400
    full = build_prompt_with_context(tokenizer, chunks, long_prefix, "", "spm", budget=300)
    assert full.ids == build_prompt(tokenizer, long_prefix, "", "spm", 300).ids
    assert len(full.ids) <= 300


def test_format_is_shell_text_under_a_path_comment_in_line_order():
    text = format_context([ContextChunk("b.sh", 9, "b2\n"), ContextChunk("a.sh", 1, "a1\n"),
                           ContextChunk("b.sh", 2, "b1\n")])
    assert text == "# b.sh\nb1\nb2\n\n# a.sh\na1\n\n"


def test_files_outside_the_workspace_are_never_read(tmp_path):
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir()
    outside.mkdir()
    (outside / "secret.sh").write_text("secret_function() {\n  echo secret\n}\n")
    (ws / "lib.sh").write_text(LIB)
    (ws / "link.sh").symlink_to(outside / "secret.sh")
    os.mkfifo(ws / "fifo.sh")
    (ws / "big.sh").write_text("x=1\n" * (MAX_FILE_BYTES // 4 + 1))
    folders = [str(ws)]
    assert read_workspace_file(str(ws / "lib.sh"), folders) == LIB
    for path in (outside / "secret.sh", ws / "link.sh", ws / "fifo.sh", ws / "big.sh", ws / "missing.sh",
                 ws / ".." / "outside" / "secret.sh"):
        assert read_workspace_file(str(path), folders) is None, path

    script = f"source {outside}/secret.sh\nsource ../outside/secret.sh\n. ./link.sh\n. ./fifo.sh\n. ./lib.sh\n"
    context = WorkspaceContext(lambda uri: None, lambda: folders)
    chunks = context.chunks_for((ws / "run.sh").as_uri(), script + "log_", "")
    assert chunks and all(c.path == "lib.sh" for c in chunks)
    assert not any("secret" in c.text for c in chunks)


def test_a_changing_open_document_updates_the_ring():
    ring = OpenDocumentRing(size=2)
    ring.update("file:///ws/a.sh", "alpha_tool() {\n  echo a\n}\n")
    assert "alpha_tool" in ring.chunks("/ws/a.sh", ring.texts["file:///ws/a.sh"])[0].text
    ring.update("file:///ws/a.sh", "beta_tool() {\n  echo b\n}\n")
    assert "beta_tool" in ring.chunks("/ws/a.sh", ring.texts["file:///ws/a.sh"])[0].text
    ring.update("file:///ws/b.sh", "b\n")
    ring.update("file:///ws/c.sh", "c\n")
    assert list(ring.texts) == ["file:///ws/b.sh", "file:///ws/c.sh"]  # the oldest went


def test_training_examples_can_carry_sibling_context(tokenizer):
    texts = [LIB, "#!/bin/bash\n. ./lib.sh\nlog_info start\nfetch_release \"$1\" || log_error failed\n" * 3]
    mix = Mixture(texts, fim_rate=0.0, paths=["pkg:/lib.sh", "pkg:/run.sh"], context_rate=1.0)
    inputs, _ = build_epoch(tokenizer, mix, 256, seed=0, epoch=0)
    plain, _ = build_epoch(tokenizer, Mixture(texts, fim_rate=0.0), 256, seed=0, epoch=0)
    decoded = tokenizer.decode([int(i) for i in inputs.flatten()])
    assert "# lib.sh\n" in decoded and inputs.numel() > plain.numel()


def test_server_uses_sourced_files_inside_the_workspace_only(bundle_path, tmp_path):
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir()
    outside.mkdir()
    (ws / "lib.sh").write_text(LIB)
    (outside / "secret.sh").write_text("secret_function() {\n  echo secret\n}\n")
    script = f"#!/bin/bash\nsource ./lib.sh\nsource {outside}/secret.sh\n\nlog_"
    uri = (ws / "run.sh").as_uri()

    async def run():
        async with Session("--model", str(bundle_path), workspace=str(ws)) as s:  # on by default
            s.open(uri, script)
            await s.inline(uri, 4, 4)
            first = list((await s.status()).context)
            s.client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
                settings={"fileContext": False}))
            await s.inline(uri, 4, 4)
            return first, list((await s.status()).context)

    with_context, switched_off = asyncio.run(run())
    assert with_context and all(c.startswith("lib.sh:") for c in with_context)
    assert not any("secret" in c for c in with_context)
    assert switched_off == []

    async def launched_without():
        async with Session("--model", str(bundle_path), "--no-file-context", workspace=str(ws)) as s:
            s.open(uri, script)
            await s.inline(uri, 4, 4)
            return list((await s.status()).context)

    assert asyncio.run(launched_without()) == []


def test_server_says_why_a_sourced_file_gives_no_context(bundle_path, tmp_path):
    """A sourced file in another encoding is not read (the model speaks UTF-8), and the status says so
    rather than leaving the person to wonder why their library is not used; once saved as UTF-8 it is."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "lib.sh").write_bytes(LIB.replace("release", "r\u00e9lease").encode("latin-1"))
    script = "#!/bin/bash\nsource ./lib.sh\n\nlog_"
    uri = (ws / "run.sh").as_uri()

    async def run():
        async with Session("--model", str(bundle_path), workspace=str(ws)) as s:
            s.open(uri, script)
            await s.inline(uri, 3, 4)
            before = await s.status()
            (ws / "lib.sh").write_text(LIB)
            s.edit(uri, 3, 4, "i")
            await s.inline(uri, 3, 5)
            return before, await s.status()

    before, after = asyncio.run(run())
    assert not before.context
    assert len(before.context_refused) == 1 and "lib.sh: not UTF-8 text" in before.context_refused[0]
    assert after.context_refused == [] and all(c.startswith("lib.sh:") for c in after.context) and after.context


def test_refused_sourced_files_are_logged_once_and_a_used_candidate_hides_its_twin(tmp_path, caplog, monkeypatch):
    """Many refused files (more than the read cache holds) are logged once per version, not at each
    keystroke; `source lib.sh` refused in the script's folder but read in the workspace root is no loss."""
    monkeypatch.setattr(workspace_context, "DISK_CACHE_ENTRIES", 8)
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    names = [f"l{i}.sh" for i in range(20)]
    for name in names:
        (ws / "sub" / name).write_bytes(b"x=\xe9\n")
    (ws / "sub" / "lib.sh").write_bytes(b"y=\xe9\n")
    (ws / "lib.sh").write_text(LIB)
    script = "".join(f"source ./{n}\n" for n in names) + "source lib.sh\nlog_"
    context = WorkspaceContext(lambda uri: None, lambda: [str(ws)])
    uri = (ws / "sub" / "run.sh").as_uri()
    with caplog.at_level("INFO", logger="codellm.server"):
        for _ in range(3):
            chunks = context.chunks_for(uri, script, "")
    told = [r for r in caplog.records if "gives no context" in r.getMessage()]
    assert len(told) == 21 and len({r.getMessage() for r in told}) == 21
    assert any(c.path.endswith("lib.sh") for c in chunks)
    assert str(ws / "sub" / "lib.sh") not in context.refused and str(ws / "sub" / "l0.sh") in context.refused


def test_server_ring_follows_open_documents_and_keeps_the_prompt_start(bundle_path, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    helper_uri, main_uri = (ws / "helper.sh").as_uri(), (ws / "main.sh").as_uri()
    calls = "deploy_app build server && notify_team build\n" * 10

    async def run():
        async with Session("--model", str(bundle_path), "--file-context", workspace=str(ws)) as s:
            s.open(helper_uri, "deploy_app() {\n  rsync -a build/ server:/srv/app\n}\n")
            s.open(main_uri, "#!/bin/bash\n" + calls + "\n")
            await s.inline(main_uri, 11, 0)
            before = list((await s.status()).context)
            s.edit(helper_uri, 0, 0, "notify_team() {\n  mail -s done team\n}\n")
            await s.inline(main_uri, 11, 0)
            after = list((await s.status()).context)
            typed = "deploy_app final"
            for n, ch in enumerate(typed):
                s.edit(main_uri, 11, n, ch)
                await s.inline(main_uri, 11, n + 1)
            status = await s.status()
            return before, after, status

    before, after, status = asyncio.run(run())
    assert any("deploy_app()" in c for c in before) and not any("notify_team()" in c for c in before)
    assert any("notify_team()" in c for c in after)
    assert status.kv_reuse_ratio >= 0.9  # the context before the prefix stays put while typing


def test_cli_complete_takes_context_files(bundle_path, tmp_path, capsys):
    from codellm.cli import main
    (tmp_path / "lib.sh").write_text(LIB)
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/bash\n. ./lib.sh\nlog_\n")
    assert main(["complete", f"{script}:3:5", "--context", str(tmp_path / "lib.sh"), "--model", str(bundle_path),
                 "--device", "cpu", "-v"]) == 0
    assert main(["complete", f"{script}:3:5", "--context", str(tmp_path / "missing.sh"), "--model",
                 str(bundle_path), "--device", "cpu"]) == 2
    assert "missing.sh" in capsys.readouterr().err


LINEAR_CHECK = """
import pytest

from codellm import crossfile
from codellm.crossfile import read_context_file, read_sourced
from codellm.server.lsp import word_before_cursor
spaces = " " * 200_000
line = "function a" + spaces + "x"
assert crossfile.FUNCTION.match(line) is None
assert crossfile.FUNCTION.match("function a" + spaces + "()" + spaces + "{").group(2) == "a"
assert crossfile.definitions(line + "\\n" + line + "\\nb=1\\n", "/ws/lib.sh")[0].text == "b=1\\n"
assert crossfile.sourced_paths("source " + spaces + "x\\n" + "; " * 100_000, "/ws/run.sh") == [["/ws/x"]]
assert crossfile._expand("$(cd $(dirname $0) && pwd" + spaces + "x", {}) is None
assert crossfile._expand("$(cd $(dirname $0) && pwd" + spaces + ")", {}) == crossfile.HERE
assert word_before_cursor("echo " + "a" * 200_000 + " b" * 1000 + " " + "w" * 100_000) == "w" * 100_000
print("done")
"""


def test_patterns_are_linear_in_a_long_line():
    # each of these took minutes while two neighbouring repeats could share a run of spaces
    result = subprocess.run([sys.executable, "-c", LINEAR_CHECK], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"


def test_a_definition_starts_on_a_line_of_reasonable_length():
    long_name = "f" + "x" * crossfile.MAX_SCAN_CHARS + "() {\n  echo long\n}\n"
    chunks = crossfile.definitions(long_name + LIB, "/ws/lib.sh")
    assert [crossfile.function_name(c.text) for c in chunks][:2] == [None, "log_info"]  # LOG_LEVEL, then log_info


def test_a_nul_byte_in_a_path_skips_that_path(tmp_path):
    (tmp_path / "lib.sh").write_text(LIB)
    folders = [str(tmp_path)]
    script = "source ./nul\0x.sh\nsource \"$(dirname \"$0\")/a\0b.sh\"\n. ./lib.sh\nlog_"
    assert crossfile.sourced_paths(script, f"{tmp_path}/run.sh") == [[f"{tmp_path}/lib.sh"]]
    assert read_workspace_file(f"{tmp_path}/nul\0x.sh", folders) is None
    assert read_workspace_file(str(tmp_path / "lib.sh"), [f"{tmp_path}/a\0b"]) is None
    context = WorkspaceContext(lambda uri: None, lambda: folders)
    assert context.read(f"{tmp_path}/nul\0x.sh") is None
    for uri in ((tmp_path / "run.sh").as_uri(), f"{tmp_path.as_uri()}/nul%00x.sh"):
        chunks = context.chunks_for(uri, script, "")
        assert chunks and all(c.path.endswith("lib.sh") for c in chunks), uri


def test_server_completes_a_script_with_a_nul_byte_in_a_path(bundle_path, tmp_path):
    (tmp_path / "lib.sh").write_text(LIB)
    script = "#!/bin/bash\nsource ./nul\0x.sh\n. ./lib.sh\nlog_"
    uris = [(tmp_path / "run.sh").as_uri(), f"{tmp_path.as_uri()}/nul%00x.sh"]

    async def run():
        async with Session("--model", str(bundle_path), "--file-context", workspace=str(tmp_path)) as s:
            contexts = []
            for uri in uris:
                s.open(uri, script)
                await s.inline(uri, 3, 4)  # answered, not an internal error
                contexts.append(list((await s.status()).context))
            return contexts

    for context in asyncio.run(run()):  # lib.sh is read (the other open copy of the script may be offered too)
        sourced = [c for c in context if c.split(":")[0].endswith("lib.sh")]
        assert sourced and all(c.split(":")[0].endswith(("lib.sh", "run.sh")) for c in context)


def test_the_ring_keeps_no_chunks_of_documents_gone():
    ring = OpenDocumentRing(size=4)
    uris = [f"file:///ws/doc%20{i}.sh" for i in range(50)] + [f"untitled:Untitled-{i}" for i in range(50)]
    for n, uri in enumerate(uris):
        ring.update(uri, f"tool_{n}() {{\n  echo {n}\n}}\n")
        context = WorkspaceContext(lambda u: None, lambda: [])
        context.ring = ring
        context.chunks_for("file:///ws/main.sh", "tool_\n" * 9, "")  # cuts the chunks of the ring's documents
        if n % 2:
            ring.remove(uri)
    assert 0 < len(ring._chunks) <= 4
    for uri in list(ring.texts):
        ring.remove(uri)
    assert not ring.texts and not ring._chunks


def test_cli_context_takes_only_regular_files_of_limited_size(bundle_path, tmp_path, capsys):
    from codellm.cli import main
    (tmp_path / "lib.sh").write_text(LIB)
    (tmp_path / "big.sh").write_text("x=1\n" * (MAX_FILE_BYTES // 4 + 1))
    os.mkfifo(tmp_path / "fifo.sh")
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/bash\n. ./lib.sh\nlog_\n")
    for bad, why in ((tmp_path, "Is a directory"), ("/dev/zero", "not a regular file"),
                     (tmp_path / "fifo.sh", "not a regular file"), (tmp_path / "big.sh", "larger than 256 KB"),
                     (tmp_path / "lib.sh" / "x.sh", "Not a directory")):
        assert main(["complete", f"{script}:3:5", "--context", str(tmp_path / "lib.sh"), str(bad),
                     "--model", str(bundle_path), "--device", "cpu"]) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith(f"codellm: error: {bad}: {why}"), err
    assert main(["complete", f"{tmp_path}:1:1", "--model", str(bundle_path), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("codellm: error: ")  # the script itself a directory


def test_the_filesystem_root_is_no_workspace_to_read_from(tmp_path):
    (tmp_path / "lib.sh").write_text(LIB)
    (tmp_path / "root").symlink_to("/")
    script = ". ./lib.sh\nlog_"
    uri = (tmp_path / "run.sh").as_uri()
    for folders in (["/"], [str(tmp_path / "root")]):
        context = WorkspaceContext(lambda u: None, lambda: folders)
        assert context.read(str(tmp_path / "lib.sh")) is None
        assert context.chunks_for(uri, script, "") == []
        context.ring.update((tmp_path / "lib.sh").as_uri(), LIB)  # open in the editor: still context
        assert [c.path for c in context.chunks_for(uri, script, "")][:1] == ["lib.sh"]
    both = WorkspaceContext(lambda u: None, lambda: ["/", str(tmp_path)])
    assert both.read(str(tmp_path / "lib.sh")) == LIB


def test_a_file_uri_of_another_host_is_no_local_path():
    from codellm.server.workspace_context import uri_to_path
    assert uri_to_path("file://otherhost/ws/run.sh") is None
    assert uri_to_path("file://localhost/ws/run.sh") == uri_to_path("file:///ws/run.sh") == "/ws/run.sh"


def test_only_the_first_distinct_source_lines_are_followed():
    script = "source ./a.sh\n" * 1000 + "source ./b.sh\n" + \
        "".join(f"source ./missing_{i}.sh\n" for i in range(100_000))
    found = crossfile.sourced_paths(script, "/ws/run.sh", ["/ws"])
    assert len(found) == crossfile.MAX_SOURCE_LINES
    assert [c[0] for c in found[:3]] == ["/ws/a.sh", "/ws/b.sh", "/ws/missing_0.sh"]


def test_paths_outside_the_workspace_are_never_looked_at(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "lib.sh").write_text(LIB)
    looked_at = []
    for name in ("stat", "lstat"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda p, *a, real=real, **k: looked_at.append(str(p)) or real(p, *a, **k))
    script = "source /net/hung/x.sh\n. ../other/y.sh\n. ./lib.sh\n" + \
        "".join(f"source ./missing_{i}.sh\n" for i in range(100_000)) + "log_"
    context = WorkspaceContext(lambda u: None, lambda: [str(ws)])
    chunks = context.chunks_for((ws / "run.sh").as_uri(), script, "")
    assert chunks and all(c.path == "lib.sh" for c in chunks)
    outside = [p for p in looked_at if not (p == str(ws) or p.startswith(f"{ws}/"))]
    assert all(str(ws).startswith(p) for p in outside), outside  # only the folders above the workspace
    assert len(looked_at) < 20 * crossfile.MAX_SOURCE_LINES  # not one look per source line


def test_a_file_reached_twice_gives_its_text_once(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "common.sh").write_text(LIB)
    (tmp_path / "link.sh").symlink_to(tmp_path / "lib" / "common.sh")
    script = ". ./lib/common.sh\n. ./link.sh\n. ./lib/../lib/common.sh\n"
    files = read_sourced(script, str(tmp_path / "run.sh"), lambda p: read_workspace_file(p, [str(tmp_path)]))
    assert [p for p, _ in files] == [str(tmp_path / "lib" / "common.sh")]


def test_a_linked_file_follows_the_workspace_folders_as_they_change(tmp_path):
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir()
    outside.mkdir()
    (outside / "secret.sh").write_text("secret_function() {\n  echo secret\n}\n")
    (ws / "link.sh").symlink_to(outside / "secret.sh")
    folders = [str(ws)]
    context = WorkspaceContext(lambda uri: None, lambda: folders)
    assert context.read(str(ws / "link.sh")) is None
    folders.append(str(outside))
    assert "secret_function" in context.read(str(ws / "link.sh"))
    folders.pop()
    assert context.read(str(ws / "link.sh")) is None


def test_a_context_file_holding_nul_bytes_is_refused(tmp_path):
    (tmp_path / "blob.sh").write_bytes(b"a\0b\0\x01\x02")
    with pytest.raises(ValueError, match="NUL bytes"):
        read_context_file(str(tmp_path / "blob.sh"))


def test_variables_that_double_each_line_stay_bounded():
    import time
    lines = ["A0=xx"] + [f"A{i}=$A{i - 1}$A{i - 1}" for i in range(1, 40)] + ["source $A39/lib.sh", "source $A5/lib.sh"]
    start = time.perf_counter()
    found = crossfile.sourced_paths("\n".join(lines) + "\n", "/w/s.sh")
    assert time.perf_counter() - start < 5  # unbounded, the 40 lines would ask for 2**40 characters
    assert found == [["/w/" + "xx" * 32 + "/lib.sh"]]  # A5 (64 characters) still resolves; A39 is no path


def test_training_context_from_the_folder_takes_only_other_files_of_that_folder():
    import random
    from codellm.train.data import MAX_SIBLINGS, by_folder, folder_files
    package = {f"/{folder}/{k}.sh": f"echo {folder}{k}\n" for folder in ("a", "b", "a/c") for k in range(12)}
    package["/b/only.sh"] = "echo b\n"
    folders = by_folder(package)
    picked = folder_files("/a/3.sh", package, folders, random.Random(0))
    assert len(picked) == MAX_SIBLINGS and len(set(picked)) == MAX_SIBLINGS
    assert all(p.startswith("/a/") and p.count("/") == 2 and p != "/a/3.sh" and package[p] == t for p, t in picked)
    assert folder_files("/x/alone.sh", {"/x/alone.sh": ""}, by_folder(["/x/alone.sh"]), random.Random(0)) == []
