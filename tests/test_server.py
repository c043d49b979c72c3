"""codellm-serve through a real LSP client over stdio."""
import asyncio
import shutil
import subprocess
import sys

import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcRequestCancelled

import codellm
from codellm import kernel
from codellm.bundle import save_bundle

from conftest import make_model
from lsp_session import Session, new_id

URI = "file:///tmp/work/deploy.sh"
SCRIPT = '#!/bin/bash\nset -e\nfor f in *.txt; do\n    cp "$f" /tmp/backup/\ndone\necho "copied fi'


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


def expected(bundle_path, prefix, suffix, mode="line"):
    engine = codellm.load(str(bundle_path), device="cpu")
    return engine.complete(prefix, suffix, mode)


def last_position(text):
    lines = text.split("\n")
    return len(lines) - 1, len(lines[-1])


def test_providers_follow_client_capabilities(bundle_path):
    async def main():
        async with Session("--model", str(bundle_path)) as s:  # inline-capable client: ghost text only
            caps = s.init.capabilities
            assert caps.inline_completion_provider is not None and caps.completion_provider is None
        async with Session("--model", str(bundle_path), inline=False) as s:  # Helix, Neovim 0.11
            caps = s.init.capabilities
            assert caps.completion_provider is not None and caps.inline_completion_provider is None
        async with Session("--model", str(bundle_path), init_options={"completionItems": "always"}) as s:
            caps = s.init.capabilities
            assert caps.inline_completion_provider is not None and caps.completion_provider is not None
    run(main())


def test_inline_completion_matches_the_engine_and_sits_at_the_cursor(bundle_path):
    async def main():
        async with Session("--model", str(bundle_path)) as s:
            s.open(URI, SCRIPT)
            line, char = last_position(SCRIPT)
            result = await s.inline(URI, line, char)
            want = expected(bundle_path, SCRIPT, "")
            assert [i.insert_text for i in result.items] == ([want] if want else [])
            for item in result.items:
                assert item.range.start == item.range.end == types.Position(line=line, character=char)
            status = await s.status()
            assert status.model_runs == 1 and status.parameters > 0
    run(main())


@pytest.mark.skipif(not kernel.available(), reason="no C decode step here (not built, or no AVX2)")
def test_every_start_answers_before_torch_loads_then_moves_to_torch(bundle_path, tmp_path, monkeypatch):
    from codellm.bundle_files import bundle_digest
    from codellm.kernel_engine import start_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    prefix = "for f in *.txt; do\n\tech"  # short: read by decode steps in both engines, the same numbers
    torch_loaded = lambda status: "without torch" not in status.decode_steps  # noqa: E731

    async def main():
        assert not start_file(bundle_digest(bundle_path)).exists()
        async with Session("--model", str(bundle_path)) as s:  # the first start writes the start file, no torch
            assert not torch_loaded(await s.status()) and start_file(bundle_digest(bundle_path)).is_file()
        async with Session("--model", str(bundle_path)) as s:  # the next ones read it
            assert not torch_loaded(await s.status())
            s.open(URI, prefix)
            result = await s.inline(URI, *last_position(prefix))
            want = expected(bundle_path, prefix, "")
            assert [i.insert_text for i in result.items] == ([want] if want else [])
            await wait_for_status(s, torch_loaded)
            other, uri = "#!/bin/sh\ncp /etc/hosts /tm", "file:///tmp/work/other.sh"
            s.open(uri, other)
            result = await s.inline(uri, *last_position(other))
            assert [i.insert_text for i in result.items] == [t for t in [expected(bundle_path, other, "")] if t]
    run(main())


def test_typed_ahead_is_served_without_the_model(bundle_path):
    async def main():
        async with Session("--model", str(bundle_path)) as s:
            text = "#!/bin/sh\nmkdir -p /var/tmp/x && cd "
            s.open(URI, text)
            line, char = last_position(text)
            first = (await s.inline(URI, line, char)).items
            if not first or len(first[0].insert_text) < 2:
                pytest.skip("the tiny model answered with fewer than two characters here")
            typed = first[0].insert_text[0]
            s.edit(URI, line, char, typed)
            again = await s.inline(URI, line, char + 1)
            assert [i.insert_text for i in again.items] == [first[0].insert_text[1:]]
            status = await s.status()
            assert status.model_runs == 1 and status.cache_hit_rate > 0
    run(main())


def test_completion_item_shape(bundle_path):
    async def main():
        async with Session("--model", str(bundle_path), inline=False) as s:
            text = "#!/bin/bash\nfor f in *.log; do\n    gzi"
            s.open(URI, text)
            line, char = last_position(text)
            result = await s.completion(URI, line, char)
            want = expected(bundle_path, text, "")
            if not want:
                assert list(result.items) == []
                return
            (item,) = result.items
            assert item.filter_text == "gzi" + want.split("\n")[0]
            assert item.text_edit.range.start == types.Position(line=line, character=char - 3)
            assert item.text_edit.range.end == types.Position(line=line, character=char)
            assert item.insert_text_format == types.InsertTextFormat.Snippet
            unescaped = item.text_edit.new_text.replace("\\$", "$").replace("\\}", "}").replace("\\\\", "\\")
            assert unescaped == "gzi" + want
            assert ("gzi" + want) in item.documentation.value
    run(main())


def test_a_crlf_document_gets_a_popup_item_whose_shown_text_holds_no_carriage_return():
    """In a CRLF document a block suggestion is inserted with CRLF line ends, while what the popup
    filters on and shows (filterText, documentation) holds no carriage return. The shipped model
    closes this `if` (`    exit 1` and `fi`)."""
    from codellm.defaults import PACKAGED_BUNDLE
    text = "#!/bin/bash\r\nif [ -z \"$1\" ]; then\r\n    echo usage\r\n"

    async def main():
        async with Session("--model", str(PACKAGED_BUNDLE), inline=False,
                           init_options={"multilineMs": 600_000, "timeoutMs": 600_000}) as s:
            s.open(URI, text)
            line, char = last_position(text)
            (item,) = (await s.completion(URI, line, char)).items
            assert "\r\n" in item.text_edit.new_text  # two lines, joined as the document's are
            assert "\r" not in item.filter_text and "\r" not in item.documentation.value
    run(main())


@pytest.fixture(scope="module")
def slow_bundle(tmp_path_factory, tokenizer):
    """A random model with a long context: reading LONG_DOCUMENT takes most of a second. (Its answers
    are short: random weights loop at once, and loops end a suggestion.)"""
    path = tmp_path_factory.mktemp("slow") / "bundle"
    save_bundle(path, make_model(tokenizer, n_layer=8, d_model=256, n_head=4, context_length=8192), tokenizer)
    return path


def slow_server(slow_bundle) -> tuple[str, ...]:
    """The slow model served by the torch engine from the first request: after an earlier test has
    served it, a start file would make the server read LONG_DOCUMENT with the C step's short decode
    calls until torch loads, which takes most of a minute on a CPU without AVX-512."""
    return "--model", str(slow_bundle), "--precision", "fp32"


SLOW = {"maxTokens": 900, "timeoutMs": 60000, "multiline": "always", "multilineMs": 60000, "prefetch": "never"}
LONG_DOCUMENT = "#!/bin/sh\n" + "".join(f"echo step {i}\n" for i in range(700))
END = LONG_DOCUMENT.count("\n")  # the empty last line, where the cursor is: all the text is prefix


def test_cancel_answers_32800_and_the_next_request_works(slow_bundle):
    async def main():
        async with Session(*slow_server(slow_bundle), init_options=SLOW) as s:
            s.open(URI, LONG_DOCUMENT)
            msg_id = new_id()
            pending = asyncio.ensure_future(s.inline(URI, END, 0, msg_id=msg_id))
            await asyncio.sleep(0.3)
            s.cancel(msg_id)
            with pytest.raises(JsonRpcRequestCancelled) as err:
                await pending
            assert err.value.code == -32800
            s.edit(URI, END, 0, "ec")
            result = await s.inline(URI, END, 2)
            assert result.items is not None
            status = await s.status()
            assert status.requests == 2
    run(main())


def test_a_superseded_request_stops_and_the_newest_is_answered(slow_bundle):
    async def main():
        async with Session(*slow_server(slow_bundle), init_options=SLOW) as s:
            s.open(URI, LONG_DOCUMENT)
            old = asyncio.ensure_future(s.inline(URI, END, 0))
            await asyncio.sleep(0.3)
            s.edit(URI, END, 0, "x=1")
            s.client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
                settings={"codellm": {"maxTokens": 4}}))
            newest = await s.inline(URI, END, 3)
            stale = await old
            assert list(stale.items) == []  # stopped after reading its prompt: the newer request won
            assert newest.items is not None
            status = await s.status()
            assert status.superseded == 1 and status.model_runs == 1
    run(main())


async def wait_for_status(s, check, timeout=30):
    for _ in range(int(timeout / 0.05)):
        status = await s.status()
        if check(status):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"status never matched: {status}")


def typed_then_asked(bundle_path, prefetch, wait):
    """Type a character into SCRIPT and ask at the cursor, with the prefetch setting given; `wait`: let
    the server work before asking (as VS Code waits 50 ms). The answer's text and the status after."""
    async def main():
        async with Session("--model", str(bundle_path), init_options={"prefetch": prefetch}) as s:
            s.open(URI, SCRIPT)
            line, char = last_position(SCRIPT)
            s.edit(URI, line, char, "l")
            if wait:
                await wait_for_status(s, lambda st: st.prefetched == 1 and st.model_runs == 1)
            result = await s.inline(URI, line, char + 1, automatic=True)
            return [i.insert_text for i in result.items], await s.status()
    return run(main())


def test_an_edit_starts_the_suggestion_before_the_editor_asks(bundle_path):
    asked, plain = typed_then_asked(bundle_path, "never", wait=False)
    assert plain.prefetched == 0 and plain.model_runs == 1 and plain.cache_hit_rate == 0
    ready, status = typed_then_asked(bundle_path, "auto", wait=True)
    assert ready == asked  # the same answer, worked out before the request came (the request may come
    # while the finished run is still being put away: then it joins the run rather than read the cache)
    assert status.model_runs == 1 and status.requests == 1
    assert status.joined_prefetch + round(status.cache_hit_rate) == 1
    at_once, status = typed_then_asked(bundle_path, "always", wait=False)
    assert at_once == asked and status.model_runs == 1  # asked while it ran: joined, or answered from the cache
    assert status.joined_prefetch + round(status.cache_hit_rate) == 1


def test_a_line_cut_by_line_ms_shows_whole_words_then_the_next_keystroke_gets_the_whole_line():
    """The shipped model (a random one rarely writes two words): with lineMs 0 a line ends at its first
    whole word; the rest is decoded after the answer goes out, and the next keystroke gets the whole line
    from the cache, with no model run of its own. A popup item, picked as it is shown, is never cut."""
    text = '#!/bin/bash\nBACKUP_DIR=/var/backups\nfor f in /etc/*.conf; do\n    cp'
    line, char = last_position(text)
    whole = codellm.load(device="cpu", precision="fp32").complete(text, "", "line")
    assert len(whole.split()) >= 2, whole  # words to cut between

    async def main():
        async with Session("--precision", "fp32",
                           init_options={"lineMs": 0, "prefetch": "never", "completionItems": "always"}) as s:
            # the C step may answer first; its swap for torch starts a new cache
            await wait_for_status(s, lambda st: "without torch" not in st.decode_steps, timeout=120)
            s.open(URI, text)
            first = [i.insert_text for i in (await s.inline(URI, line, char)).items]
            assert len(first) == 1 and whole.startswith(first[0]) and whole[len(first[0])] in " \t", (first, whole)
            await wait_for_status(s, lambda st: st.lines_cut == 1 and st.line_rests == 1)
            s.edit(URI, line, char, whole[0])
            after = [i.insert_text for i in (await s.inline(URI, line, char + 1)).items]
            assert after == [whole[1:]]
            status = await s.status()
            assert status.model_runs == 1 and status.cache_hit_rate == 0.5
            (item,) = (await s.completion(URI, line, char + 1)).items  # the same place, as a popup item
            assert item.filter_text == whole[1:] and (await s.status()).lines_cut == 1
    run(main())


def first_keystroke_at_a_new_place(bundle_path, rest: bool):
    """Open SCRIPT, (with `rest`) tell the server the cursor rests at the end of `set -e` and let it work,
    then type a character there and ask: the status after."""
    async def main():
        async with Session("--model", str(bundle_path)) as s:
            s.open(URI, SCRIPT)
            if rest:
                s.cursor(URI, 1, 6)
                await wait_for_status(s, lambda st: st.prefetched == 1 and st.model_runs == 1)
            s.edit(URI, 1, 6, "u")
            await s.inline(URI, 1, 7, automatic=True)
            return await s.status()
    return run(main())


def test_a_resting_cursor_has_the_prompt_read_before_the_first_keystroke(bundle_path):
    cold = first_keystroke_at_a_new_place(bundle_path, rest=False)
    assert cold.prefetched == 1 and cold.model_runs == 1 and cold.kv_reuse_ratio == 0  # the keystroke read all
    warm = first_keystroke_at_a_new_place(bundle_path, rest=True)
    # the keystroke's run read only its few new tokens: the rest's run read the whole prompt once
    assert warm.prefetched == 2 and warm.model_runs == 2 and warm.kv_reuse_ratio > 0.4


def test_a_cursor_rest_with_bad_params_or_for_another_file_does_nothing(bundle_path):
    async def main():
        async with Session("--model", str(bundle_path)) as s:
            s.open(URI, SCRIPT)
            s.open("file:///notes.txt", "plain words", language="plaintext")
            s.client.protocol.notify("codellm/cursor", {"textDocument": "x", "position": [1]})
            s.client.protocol.notify("codellm/cursor", None)
            s.cursor("file:///never-opened.sh", 0, 0)
            s.cursor("file:///notes.txt", 0, 3)
            s.cursor(URI, 99, 0)  # past the end of the document
            await asyncio.sleep(0.5)  # time for any prefetch these could have started
            status = await s.status()
            assert status.prefetched == 0 and status.model_runs == 0
            line, char = last_position(SCRIPT)
            assert (await s.inline(URI, line, char)).items is not None  # still serving
    run(main())


def test_a_cursor_rest_where_a_request_runs_leaves_the_request_alone(slow_bundle):
    async def main():
        async with Session(*slow_server(slow_bundle), init_options={**SLOW, "maxTokens": 40, "prefetch": "always"}) as s:
            s.open(URI, LONG_DOCUMENT)
            asked = asyncio.ensure_future(s.inline(URI, END, 0))
            await wait_for_status(s, lambda st: st.requests == 1)
            s.cursor(URI, END, 0)  # the editor asked on a click; the rest is told after
            result = await asked
            status = await s.status()
            assert status.superseded == 0 and status.model_runs == 1 and list(result.items)
    run(main())


def test_a_cursor_rest_is_read_after_the_messages_before_it(bundle_path):
    async def main():
        async with Session("--model", str(bundle_path)) as s:
            s.open(URI, SCRIPT)
            s.client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
                settings={"codellm": {"prefetch": "never"}}))
            s.cursor(URI, 1, 6)  # prefetch is off by now
            s.cursor(URI, 2**31, 0)  # past LSP's integers
            await asyncio.sleep(0.5)
            status = await s.status()
            assert status.prefetched == 0 and status.model_runs == 0
    run(main())


def test_lines_end_where_the_editor_ends_them_not_at_form_feeds(bundle_path):
    from codellm.server.lsp import LspLinesWorkspace, cursor_split
    text = "#!/bin/sh\n# page\x0cbreak \u2028 end\r\nfoo_word\rlast"
    workspace = LspLinesWorkspace(None)
    workspace.put_text_document(types.TextDocumentItem(uri=URI, language_id="shellscript", version=1, text=text))
    doc = workspace.get_text_document(URI)
    assert len(doc.lines) == 4
    doc.apply_change(types.TextDocumentContentChangePartial(
        range=types.Range(start=types.Position(line=2, character=0), end=types.Position(line=2, character=3)), text="bar"))
    assert doc.source == text.replace("foo_word", "bar_word")
    assert cursor_split(doc, types.Position(line=2, character=8)) == (
        text.replace("foo_word", "bar_word")[:-5], "\rlast", types.Position(line=2, character=8))
    # past the end of a line: its end, also on a last line with no line break (pygls would cut one back)
    assert cursor_split(doc, types.Position(line=3, character=40)) == (doc.source, "", types.Position(line=3, character=4))
    assert cursor_split(doc, types.Position(line=2, character=40))[1:] == ("\rlast", types.Position(line=2, character=8))
    workspace.put_text_document(types.TextDocumentItem(uri="file:///b.sh", language_id="sh", version=1, text="ls\n"))
    after_break = workspace.get_text_document("file:///b.sh")  # the empty line after the last line break
    assert cursor_split(after_break, types.Position(line=1, character=9)) == ("ls\n", "", types.Position(line=1, character=0))
    assert cursor_split(after_break, types.Position(line=2, character=0)) is None
    assert cursor_split(doc, types.Position(line=4, character=0)) is None  # no line break ends "last"

    async def main():  # the server's documents split so: a text edit replaces the word at the cursor's line
        async with Session("--model", str(bundle_path), inline=False) as s:
            s.open(URI, "#!/bin/sh\n# page\x0cbreak\nfoo_word\n")
            s.edit(URI, 2, 8, "_x")
            items = await s.completion(URI, 2, 10)
            items = items.items if hasattr(items, "items") else items
            assert items and all(i.text_edit.range.start == types.Position(line=2, character=0) for i in items)
            assert all(i.text_edit.new_text.startswith("foo_word_x") for i in items)
    run(main())


def test_a_position_past_the_end_of_a_line_completes_and_edits_at_its_end(bundle_path):
    text = "#!/bin/sh\necho \U0001F600 rsync_opt"  # an emoji: 2 UTF-16 units; no line break at the end

    async def main():
        async with Session("--model", str(bundle_path), inline=False) as s:
            s.open(URI, text)
            items = (await s.completion(URI, 1, 99)).items
            want = codellm.load(str(bundle_path), device="cpu").complete(text, "", "line")
            assert [i.text_edit.new_text for i in items] == (["rsync_opt" + want] if want else [])
            end = len("echo \U0001F600 rsync_opt".encode("utf-16-le")) // 2
            assert all(i.text_edit.range == types.Range(start=types.Position(line=1, character=end - 9),
                                                        end=types.Position(line=1, character=end)) for i in items)
        async with Session("--model", str(bundle_path)) as s:
            s.open(URI, text)
            items = (await s.inline(URI, 1, 99)).items
            assert [i.insert_text for i in items] == ([want] if want else [])
            assert all(i.range.start == i.range.end == types.Position(line=1, character=end) for i in items)
    run(main())


def test_prefetch_cursor_counts_line_breaks_and_units_as_the_document_does():
    from pygls.workspace import TextDocument
    from codellm.server.lsp import cursor_after

    def after(text, line=0, char=6, source="echo a\n"):
        change = types.TextDocumentContentChangePartial(
            range=types.Range(start=types.Position(line=line, character=char),
                              end=types.Position(line=line, character=char)), text=text)
        return cursor_after(TextDocument("file:///a.sh", source), [change])

    assert after("x") == types.Position(line=0, character=7)
    assert after("\U0001F600") == types.Position(line=0, character=8)  # two UTF-16 units
    assert after("\r\nls -l") == after("\nls -l") == after("\rls -l") == types.Position(line=1, character=5)
    assert after("a\nb\n") == types.Position(line=2, character=0)
    assert after("a\x0cb\u2028c\x85") == types.Position(line=0, character=12)  # no line ends, for LSP
    whole = types.TextDocumentContentChangeWholeDocument(text="echo b\n")
    assert cursor_after(TextDocument("file:///a.sh", "echo a\n"), [whole]) is None


def test_the_cursor_after_a_whole_line_edit_is_where_the_new_text_ends():
    """Neovim sends edits of whole lines: its `o` below `}` replaces the line break after it with two,
    Enter typed before the `y` of `x  y` replaces "y" with a line break and "y"."""
    from codellm.server.lsp import LspLinesDocument, cursor_after

    def after(source, start, end, text):
        doc = LspLinesDocument("file:///a.sh", source)
        change = types.TextDocumentContentChangePartial(
            range=types.Range(start=types.Position(*start), end=types.Position(*end)), text=text)
        doc.apply_change(change)
        return doc.source, cursor_after(doc, [change])

    assert after("f() {\n}\nls\n", (1, 1), (2, 0), "\n\n") == ("f() {\n}\n\nls\n", types.Position(line=2, character=0))
    assert after("x  y\n", (0, 3), (0, 4), "\ny") == ("x  \ny\n", types.Position(line=1, character=0))
    assert after("echo a\n", (0, 6), (0, 6), "b")[1] == types.Position(line=0, character=7)  # typed
    assert after("echo a\n", (0, 5), (0, 6), "")[1] == types.Position(line=0, character=5)  # deleted
    assert after("echo a\n", (0, 5), (0, 6), "b c")[1] == types.Position(line=0, character=8)  # replaced


def test_a_prefetch_begun_before_a_settings_change_leaves_no_answer(slow_bundle):
    async def main():
        options = {**SLOW, "maxTokens": 200, "prefetch": "always"}
        async with Session(*slow_server(slow_bundle), init_options=options) as s:
            s.open(URI, LONG_DOCUMENT)
            s.edit(URI, END, 0, "ec")
            await wait_for_status(s, lambda st: st.prefetched == 1)
            s.client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
                settings={"codellm": {"maxTokens": 1}}))
            await wait_for_status(s, lambda st: st.model_runs == 1, timeout=120)  # the prefetch ended
            await s.inline(URI, END, 2, automatic=True)
            status = await s.status()
            assert status.cache_hit_rate == 0 and status.model_runs == 2  # asked anew, under maxTokens 1
    run(main())


def test_a_prefetch_a_request_joined_is_not_given_up_for_another_documents_request(slow_bundle):
    async def main():
        async with Session(*slow_server(slow_bundle), init_options={**SLOW, "prefetch": "always"}) as s:
            s.open(URI, LONG_DOCUMENT)
            other = "file:///tmp/work/other.sh"
            s.open(other, "echo one\necho two\n")
            s.edit(URI, END, 0, "ec")
            await wait_for_status(s, lambda st: st.prefetched == 1)
            asked = asyncio.ensure_future(s.inline(URI, END, 2, automatic=True))
            await wait_for_status(s, lambda st: st.joined_prefetch == 1)
            await s.inline(other, 0, 0, automatic=True)  # text follows the cursor there: skipped, but newer
            await asked
            status = await s.status()
            assert status.superseded == 0 and status.model_runs == 1  # the joined run went on to its answer
    run(main())


def test_edits_to_many_documents_leave_one_prefetch(slow_bundle):
    async def main():
        # the slow model reads a long document for most of a second: the burst of edits arrives while the
        # first prefetch still runs, however busy the machine
        async with Session(*slow_server(slow_bundle), init_options={**SLOW, "prefetch": "always"}) as s:
            uris = [f"file:///tmp/work/f{i}.sh" for i in range(30)]
            for uri in uris:
                s.open(uri, LONG_DOCUMENT)
            for uri in uris:  # a replace across the workspace
                s.edit(uri, END, 0, "l")
            await wait_for_status(s, lambda st: st.model_runs >= 1)
            await asyncio.sleep(0.5)
            status = await s.status()
            assert status.model_runs == 1  # the newest edit's; the 29 before it gave way
    run(main())


def test_popup_clients_get_no_prefetch_unless_asked(bundle_path):
    async def main():
        async with Session("--model", str(bundle_path), inline=False) as s:
            s.open(URI, SCRIPT)
            line, char = last_position(SCRIPT)
            s.edit(URI, line, char, "l")
            await asyncio.sleep(0.5)
            status = await s.status()
            assert status.prefetched == 0 and status.model_runs == 0
    run(main())


def test_hot_swap_takes_a_valid_bundle_and_rejects_a_corrupt_one(bundle_path, tmp_path, tokenizer):
    live = tmp_path / "models" / "live"
    shutil.copytree(bundle_path, live)
    other = tmp_path / "other"
    save_bundle(other, make_model(tokenizer, seed=5), tokenizer)
    prefix = "#!/bin/bash\nif [ -z \"$1\" ]; then\n    echo usage"
    log_file = tmp_path / "server.log"

    async def main():
        async with Session("--model", str(live), "--log-file", str(log_file)) as s:
            s.open(URI, prefix)
            line, char = last_position(prefix)
            before = await s.inline(URI, line, char)
            assert [i.insert_text for i in before.items] == [t for t in [expected(bundle_path, prefix, "")] if t]
            save_bundle(live, make_model(tokenizer, seed=5), tokenizer)  # atomic replace of the directory
            await s.wait_for_message("switched to the new model")
            s.edit(URI, line, char, " ")
            s.edit(URI, line, char, "", end=(line, char + 1))
            after = await s.inline(URI, line, char)
            assert [i.insert_text for i in after.items] == [t for t in [expected(other, prefix, "")] if t]
            weights = live / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:1000])  # a half-written copy
            await s.wait_for_message("rejected")
            assert "truncated or corrupt" in (await s.status()).model_error  # status says so too
            assert "new model rejected" in log_file.read_text()  # and the log, where the pop-up is gone
            s.edit(URI, line, char, " ")
            s.edit(URI, line, char, "", end=(line, char + 1))
            still = await s.inline(URI, line, char)
            assert [i.insert_text for i in still.items] == [i.insert_text for i in after.items]
    run(main())


def test_a_folder_swapped_between_the_start_and_initialize_is_read_again(bundle_path, tmp_path, tokenizer):
    """The model read when the server starts is not served once its folder has been replaced."""
    live = tmp_path / "models" / "live"
    shutil.copytree(bundle_path, live)
    bigger = make_model(tokenizer, seed=5, n_layer=3)
    save_bundle(tmp_path / "models" / "next", bigger, tokenizer)
    log_file = tmp_path / "server.log"

    async def swap_once_read():
        for _ in range(1200):  # the start's load logs when done (importing torch on a busy machine takes a while)
            if log_file.exists() and "model read at start" in log_file.read_text():
                break
            await asyncio.sleep(0.1)
        live.rename(tmp_path / "models" / "old")
        (tmp_path / "models" / "next").rename(live)

    async def main():
        async with Session("--model", str(live), "--log-file", str(log_file), before_initialize=swap_once_read) as s:
            assert "model read at start" in log_file.read_text()  # the swap came after the start's load
            status = await s.status()
            assert status.parameters == bigger.num_params() != make_model(tokenizer).num_params()
    run(main())


def test_configuration_change_applies(bundle_path):
    async def main():
        async with Session("--model", str(bundle_path)) as s:
            text = "#!/bin/bash\nif [ -f /etc/hosts ]; then\n"
            s.open(URI, text)
            s.client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
                settings={"codellm": {"multiline": "never", "maxTokens": 7}}))
            result = await s.inline(URI, 2, 0)
            for item in result.items:
                assert "\n" not in item.insert_text
            status = await s.status()
            assert status.settings.multiline == "never" and status.settings.max_tokens == 7
    run(main())


def test_no_model_still_starts_and_says_how_to_get_one(tmp_path):
    async def main():
        async with Session("--model", str(tmp_path / "missing")) as s:
            s.open(URI, "echo hi")
            result = await s.inline(URI, 0, 7)
            assert list(result.items) == []
            message = await s.wait_for_message("codellm-train")
            assert "not found" in message
            await asyncio.sleep(0.5)
            assert sum("codellm-train" in m for m in s.messages) == 1  # told once
    run(main())


def test_non_shell_documents_get_nothing(bundle_path):
    async def main():
        async with Session("--model", str(bundle_path)) as s:
            s.open("file:///tmp/notes.md", "# notes\nsome text", language="markdown")
            assert list((await s.inline("file:///tmp/notes.md", 1, 9)).items) == []
    run(main())


def test_tcp_refuses_non_loopback():
    r = subprocess.run([sys.executable, "-m", "codellm.server.cli", "--tcp", "0", "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "only loopback" in r.stderr


def test_a_block_answer_and_a_line_answer_at_one_place_share_the_kv_cache(bundle_path):
    """Block and line answers read the same prompt window, so typing on after a block answer reads only
    the new characters (a window that depends on the mode re-reads the whole prompt)."""
    async def main():
        async with Session("--model", str(bundle_path)) as s:
            s.open(URI, LONG_DOCUMENT)
            await s.inline(URI, END, 0)  # an empty line: a block answer
            s.edit(URI, END, 0, "e")
            await s.inline(URI, END, 1)  # a line with content: a line answer
            return await s.status()
    status = run(main())
    assert status.model_runs == 2 and status.requests == 2
    assert status.kv_reuse_ratio > 0.45  # the second run read only the new tokens: about half of all read
