"""Engine behaviour: stop rules, token healing, modes, seeded generation, the public API."""
import dataclasses
import time

import pytest
import torch

import codellm
from codellm.bundle import BundleError, load_bundle
from codellm.completion import (Completion, a_piece_of_the_line_above, code_expected, indentation_typed,
                                without_a_bare_comment_start, worth_another_try)
from codellm.engine import Engine
from codellm.shell import choose_mode, closing_text, open_blocks


@pytest.fixture
def engine(bundle_path):
    return codellm.load(str(bundle_path), device="cpu")


def test_line_mode_returns_one_nonempty_line(engine):
    for prefix in ['#!/bin/bash\nif [ -z "$1" ]; then\n    ', "for f in *.txt; do\n\tec", "x="]:
        result = engine.complete_detailed(prefix, "\nfi\n", mode="line")
        assert "\n" not in result.text
        assert result.new_tokens >= 1 and result.text.strip() != "" or result.stop_reason != "eot"


def test_token_healing_continues_the_partial_word(engine):
    prefix = "for f in *.txt; do\n\tech"
    prompt = codellm.prompt.build_prompt(engine.tokenizer, prefix, "", "plain")
    assert prompt.heal  # the partial word was backed off ...
    allowed = engine.healing_allowed(prompt.heal)
    table = engine.tokenizer.token_bytes
    # every allowed token agrees with the backed-off bytes: it extends them or is a start of them
    assert all(table[i].startswith(prompt.heal) or prompt.heal.startswith(table[i]) for i in allowed.tolist())
    original = engine.tokenizer.encode(prefix)
    assert original[-1] in allowed.tolist() or original[-2] in allowed.tolist()  # the text's own split stays possible


def test_healing_retypes_indentation_only_as_the_tokenizer_splits_it(engine):
    table = engine.tokenizer.token_bytes
    assert [table[i] for i in engine.tokenizer.encode("done\n    echo x")][1:3] == [b"\n   ", b" echo"]
    heal = b"\n    "
    first = {table[i] for i in engine.healing_allowed(heal).tolist()}
    assert b"\n   " in first  # "\n    echo" is "\n   " + " echo"
    assert not first & {b"\n", b"\n ", b"\n  "}  # never a line end and single spaces, a split never trained on
    then = {table[i] for i in engine.healing_allowed(heal, b"\n   ").tolist()}
    assert {b" echo", b" "} <= then
    kept = {table[i] for i in engine.healing_allowed(heal, b"\n   ", keep_indent=True).tolist()}
    assert b" echo" in kept and not any(t[1:2].isspace() for t in kept)  # no indentation beyond what was typed


def test_healing_bytes_that_are_not_whole_text_still_have_tokens(engine):
    table = engine.tokenizer.token_bytes
    heal = "é".encode()[:1]  # half a character: no split of it as text
    allowed = engine.healing_allowed(heal).tolist()
    assert allowed and all(table[i].startswith(heal) or heal.startswith(table[i]) for i in allowed)


def test_a_line_of_typed_indentation_is_answered_at_that_indentation(engine):
    table = engine.tokenizer.token_bytes
    heal = b"\n    "
    masked = engine.mask_logits(torch.zeros(len(table)), bytearray(heal), heal, "line", False, None, True)
    assert all(masked[i] == float("-inf") for i, t in enumerate(table) if t[:1].isspace())
    free = engine.mask_logits(torch.zeros(len(table)), bytearray(heal), heal, "line", False, None, False)
    assert free[table.index(b" echo")] == 0
    assert not indentation_typed("if true; then\n  ", "  echo hi\nfi\n")  # the cursor is inside the indentation
    assert indentation_typed("if true; then\n\t", "\nfi\n") and not indentation_typed("x", "")
    for prefix in ["if true; then\n    ", "for f in *; do\n\t", "case $1 in\n  a)\n    "]:
        for mode in ("line", "block"):
            result = engine.complete_detailed(prefix, "\ndone\n", mode=mode, clean=False)
            assert not result.text[:1].isspace(), (prefix, mode, result.text)


def test_a_token_that_retypes_a_backed_off_line_end_and_ends_the_line_is_no_answer():
    # the cursor on an empty line: the prompt backs off the "\n" before it, and a token such as "\n\n"
    # would re-type it and end the cursor's line at once, an empty answer the first-token rule bans
    engine = codellm.load(device="cpu")  # the shipped tokenizer has such tokens; the tests' small one has none
    table = engine.tokenizer.token_bytes
    heal = b"\n"
    ending = [i for i, t in enumerate(table) if t.startswith(b"\n") and t[1:].strip(b" \t")[:1] == b"\n"]
    assert ending  # the tokenizer has such tokens
    blank = ending[0]
    logits = torch.zeros(len(table))
    logits[blank] = 5.0
    doubt = []
    masked = engine.mask_logits(logits.clone(), bytearray(), heal, "line", False, start_doubt=doubt)
    assert masked[blank] == float("-inf") and masked[table.index(b"\n")] == 0
    assert all(masked[i] == float("-inf") for i in ending)
    assert len(doubt) == 1 and doubt[0] > 0.5  # the model's wish to end the line lowers the answer's confidence
    assert engine.mask_logits(logits.clone(), bytearray(), heal, "line", True)[blank] == 5.0  # allow_empty
    assert engine.mask_logits(logits.clone(), bytearray(), heal, "block", False)[blank] == 5.0  # a blank line then code


def test_an_answer_can_avoid_the_start_an_earlier_one_took(engine):
    prefix = "#!/bin/sh\nfor f in *.txt; do\n    "
    first = engine.complete_detailed(prefix, "\ndone\n", mode="line", clean=False)
    assert first.first_choice is not None and first.first_choice[0] == b"\n    "[:len(first.first_choice[0])]
    other = engine.complete_detailed(prefix, "\ndone\n", mode="line", clean=False, avoid=first.first_choice)
    assert other.first_choice[0] == first.first_choice[0] and other.first_choice[1] != first.first_choice[1]


def test_the_token_picked_instead_of_an_avoided_one_keeps_the_probability_the_model_gave_it(engine):
    logits = torch.full((len(engine.tokenizer.token_bytes),), -30.0)
    logits[10], logits[11] = 2.0, 1.0
    given = torch.softmax(logits, -1)
    assert engine.pick(logits.clone(), bytearray(b"x"), None)[0] == 10
    token, p = engine.pick(logits.clone(), bytearray(b"x"), (b"x", 10))
    assert token == 11 and abs(p - float(given[11])) < 1e-4
    assert engine.pick(logits.clone(), bytearray(b"y"), (b"x", 10))[0] == 10  # another output: not avoided


def test_no_second_try_that_could_not_reach_the_confidence_shown():
    first = Completion("", "newline", "line", 10, 0, 5, 0.01, first_choice=(b"", 7), first_choice_probability=0.9)
    assert worth_another_try(first, "echo x", "", tokens_left=40, floor=0.05)
    assert not worth_another_try(first, "echo x", "", tokens_left=40, floor=0.2)  # another answer: at most 0.1
    assert not worth_another_try(first, "echo x", "echo x", tokens_left=40)  # the cleaning kept it
    assert not worth_another_try(dataclasses.replace(first, stop_reason="deadline"), "echo x", "", 40)
    assert not worth_another_try(first, "echo x", "", tokens_left=0)


def test_a_second_try_is_no_piece_of_the_line_above():
    assert a_piece_of_the_line_above('    java -cp "${JAR}" \\\n    ', '"${JAR}" \\')
    assert a_piece_of_the_line_above("mkdir -p /a\n\nmk", "dir -p /a")
    assert not a_piece_of_the_line_above("mkdir -p /a\n", "}")
    assert not a_piece_of_the_line_above("mkdir -p /a\n", "")


def test_completion_text_is_what_follows_the_prefix(engine):
    # greedy with healing: the prefix plus the answer must re-tokenize to what the model produced
    prefix = "mkdir -p /tmp/backup && cp"
    text = engine.complete(prefix, "", mode="line")
    assert isinstance(text, str) and "\n" not in text


def test_token_budget_and_deadline_and_cancel(engine):
    r = engine.complete_detailed("echo", "", mode="block", max_new_tokens=3)
    assert r.new_tokens <= 3
    r = engine.complete_detailed("echo", "", mode="block", max_new_tokens=100, deadline=time.monotonic() - 1)
    assert r.stop_reason in ("deadline", "eot", "newline") and r.new_tokens <= 1
    r = engine.complete_detailed("echo", "", mode="block", max_new_tokens=100, should_stop=lambda: True)
    assert r.stop_reason in ("cancelled", "eot") and r.new_tokens <= 1


def test_prefill_of_no_tokens_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="at least one token"):
        engine.prefill([])


def test_second_request_reuses_the_cache(engine):
    prefix = "#!/bin/sh\nset -e\nfor x in a b c; do\n  echo $x\ndone\n" * 3
    engine.complete_detailed(prefix, "\nexit 0\n", mode="line")
    again = engine.complete_detailed(prefix + "e", "\nexit 0\n", mode="line")
    assert again.reused_tokens >= again.prompt_tokens - 3


def test_generate_is_reproducible_with_a_seed(engine):
    a = engine.generate("#!/bin/bash\n", max_new_tokens=30, seed=7)
    b = engine.generate("#!/bin/bash\n", max_new_tokens=30, seed=7)
    assert a == b
    greedy = engine.generate("#!/bin/bash\n", max_new_tokens=20, temperature=0)
    assert greedy == engine.generate("#!/bin/bash\n", max_new_tokens=20, temperature=0, seed=3)


def test_generate_beyond_the_context_window(engine):
    text = engine.generate("echo hi\n", max_new_tokens=engine.config.context_length + 20, temperature=1.0,
                           top_k=None, top_p=None, seed=1)
    assert len(engine.tokenizer.encode(text)) > 0


def test_choose_mode():
    assert choose_mode("if [ -f x ]; then", "\nfi\n") == "block"
    assert choose_mode("for f in *; do\n", "") == "block"
    assert choose_mode("echo he", " world\n") == "line"  # text after the cursor
    assert choose_mode("echo hello", "\n") == "line"
    assert choose_mode("x=1\n    ", "") == "block"  # empty line
    assert choose_mode("# the user logs in", "\n") == "line"  # a comment opens no block
    assert choose_mode('echo "x"  # then we do', "\n") == "line"
    assert choose_mode('for f in "#"; do', "\n") == "block"


def test_open_blocks_and_what_closes_them():
    assert open_blocks("for f in *; do\n    if [ -f x ]") == ["do", "if"]
    assert open_blocks('case "$1" in\n  a) echo if ;;\nesac\nmain() {\n  # for the record, do\n') == ["{"]
    assert open_blocks("while true; do :; done; echo fi") == []
    assert closing_text(["do", "if"]) == "\nthen :\nfi\n:\ndone"


def test_load_without_a_model_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.delenv("CODELLM_MODEL", raising=False)
    monkeypatch.setattr("codellm.defaults.PACKAGED_BUNDLE", tmp_path / "none")
    with pytest.raises(BundleError, match="codellm-train"):
        codellm.load()


def test_load_from_environment(monkeypatch, bundle_path, tmp_path):
    monkeypatch.setenv("CODELLM_MODEL", str(bundle_path))
    assert codellm.load(device="cpu").path == bundle_path
    from codellm.defaults import default_bundle_path
    monkeypatch.setattr("codellm.defaults.PACKAGED_BUNDLE", bundle_path)
    monkeypatch.setenv("CODELLM_MODEL", "default")  # as --model default
    monkeypatch.chdir(tmp_path)
    assert default_bundle_path() == bundle_path


def test_engine_on_explicit_cpu(bundle_path):
    engine = Engine(load_bundle(bundle_path), "cpu", threads=1)
    assert engine.device.type == "cpu"
    with pytest.raises(ValueError):
        engine.complete("x", mode="paragraph")


def test_block_mode_may_start_with_a_newline_and_allow_empty_lets_the_model_stop(engine):
    eot = engine.tokenizer.eot_id
    r = engine.complete_detailed("if true; then", "\nfi\n", mode="block", max_new_tokens=1, clean=False)
    assert r.stop_reason != "eot"  # never empty by default ...
    # ... but a newline may come first in block mode: the mask bans end of text only
    line_ban = set(engine.empty_answer_ids.tolist())
    assert eot in line_ban and any(engine.tokenizer.token_bytes[i].startswith(b"\n") for i in line_ban)
    r = engine.complete_detailed("echo done;", "\n", mode="line", allow_empty=True, clean=False)
    assert isinstance(r.text, str)


def test_runaway_output_is_recognised_as_it_is_written():
    from codellm.engine import runaway
    from codellm.postprocess import ends_in_loop
    assert ends_in_loop(b"printf '%s" + b"\\t" * 8)
    assert ends_in_loop(b"sed -e 's/" + b"\\./" * 6)
    assert not ends_in_loop(b'echo "copied $src to $dst"')
    assert not ends_in_loop(b"# " + b"-" * 40)  # a rule, drawn on purpose
    looped = bytearray(b'  [ -n "$p" ] && echo "no $p"\n  [ -n "$p" ] && echo "no $p"\n  ')
    assert runaway(looped, b"\n  ")  # the newline arrives merged with the next indentation
    assert not runaway(bytearray(b"    fi\n  done\n"), b"\n")


def test_engine_falls_back_to_python_when_the_compiled_step_fails(tokenizer, monkeypatch):
    """Where the TorchScript step cannot run (a device it fails on), the engine runs the same step as
    Python and still completes."""
    import codellm.decode

    def failing_step(*args):
        raise RuntimeError("not supported on this device")

    from codellm.bundle import Bundle
    from conftest import make_model

    model = make_model(tokenizer)
    prefix = "#!/bin/bash\nfor f in *.txt; do\n"
    compiled = Engine(Bundle(model.cfg, tokenizer, model), "cpu", threads=1, precision="fp32")
    want = compiled.complete_detailed(prefix, "", mode="line", clean=False)
    monkeypatch.setattr(codellm.decode, "compiled_decode_tokens", lambda: failing_step)
    engine = Engine(Bundle(model.cfg, tokenizer, model), "cpu", threads=1, precision="fp32")
    assert engine.decoder.run_layers is codellm.decode.decode_tokens
    got = engine.complete_detailed(prefix, "", mode="line", clean=False)
    assert got.new_tokens > 0 and got.text == want.text


def test_a_deadline_mid_line_answers_up_to_a_safe_cut_and_the_next_keystroke_reuses_the_cache(engine, monkeypatch):
    from codellm.postprocess import open_quote

    prefix, suffix = '#!/bin/bash\nset -e\nname="backup"\necho "', "\n"
    engine.cache.reset()  # every run below reads the prompt afresh: the same numbers, the same greedy tokens
    full = engine.complete_detailed(prefix, suffix, mode="line", max_new_tokens=24, clean=False).text
    clock = iter(range(10**6))
    monkeypatch.setattr("codellm.engine.time.monotonic", lambda: next(clock))
    stopped = 0
    for k in range(1, 25):  # the deadline passes after about k tokens
        start = next(clock)
        engine.cache.reset()
        r = engine.complete_detailed(prefix, suffix, mode="line", max_new_tokens=24, clean=False,
                                     deadline=start + k)
        if r.stop_reason != "deadline":
            continue
        stopped += 1
        assert full.startswith(r.text)
        if r.text:  # a whole word of what the model would have written, and no quote it opened left open
            assert full[len(r.text):][:1] in (" ", "\t")
            assert open_quote('echo "' + r.text) in ("", '"')
        again = engine.complete_detailed(prefix + "x", suffix, mode="line", max_new_tokens=1, clean=False)
        assert again.reused_tokens >= again.prompt_tokens - 3  # the keys and values written so far serve on
    assert stopped


def test_a_loop_in_free_text_is_cut_after_its_first_copy():
    from codellm.engine import loop_free_text, repeated_lines_cut
    text = b"# back up\ncp -a /etc /backup\n\n# back up\ncp -a /etc /backup\n\n"
    cut = repeated_lines_cut(text)
    assert text[:cut] == b"# back up\ncp -a /etc /backup\n\n"
    assert repeated_lines_cut(b"fi\nfi\nfi\n") is None and repeated_lines_cut(b"echo one\necho two\n") is None
    assert loop_free_text(b"cp a b\n\n# now compress\n\n") == "cp a b\n"  # no comment of a missing step
    prompt = b"echo hello world\necho hello world\n"  # a prompt that repeats itself is no loop of the model's
    assert repeated_lines_cut(prompt + b"ls -la\n", given=len(prompt)) is None
    assert repeated_lines_cut(prompt + b"echo hello world\n", given=len(prompt)) == len(prompt)  # writing it again is


def test_generated_text_never_holds_a_block_of_lines_twice_in_a_row():
    from codellm.postprocess import first_repeated_line
    engine = codellm.load(device="cpu")  # the shipped model, which loops on this prompt without the cut
    prompt = "#!/bin/bash\n# Create a backup script"
    for seed in range(1, 6):
        text = engine.generate(prompt, max_new_tokens=300, seed=seed)
        assert text.strip()
        assert first_repeated_line((prompt + text).split("\n")[:-1]) is None, text


def test_a_prompt_read_stops_between_pieces_and_the_next_request_reuses_them(bundle_path, monkeypatch):
    PREFILL_CHUNK = 32  # pieces shorter than the test model's prompts
    monkeypatch.setattr("codellm.engine.PREFILL_CHUNK", PREFILL_CHUNK)
    engine = Engine(load_bundle(bundle_path), "cpu", threads=1, precision="fp32")
    prefix = "#!/bin/bash\n" + "".join(f"cp /var/log/app{i}.log /backup/app{i}.log\n" for i in range(60))
    polls = []

    def newer_request() -> bool:
        polls.append(engine.cache.position)
        return True

    stopped = engine.complete_detailed(prefix, "\nexit 0\n", "line", should_stop=newer_request)
    assert stopped.stop_reason == "cancelled" and stopped.text == "" and stopped.new_tokens == 0
    assert stopped.prompt_tokens > PREFILL_CHUNK + 1  # a prompt of two pieces or more ...
    assert polls == [PREFILL_CHUNK]  # ... of which one was read before the newer request was seen
    again = engine.complete_detailed(prefix, "\nexit 0\n", "line", should_stop=lambda: False)
    assert again.reused_tokens == PREFILL_CHUNK and again.stop_reason != "cancelled"
    fresh = Engine(load_bundle(bundle_path), "cpu", threads=1, precision="fp32")
    assert again.text == fresh.complete_detailed(prefix, "\nexit 0\n", "line").text


def test_an_answer_on_a_line_of_nothing_but_indentation_starts_with_code(engine):
    table = engine.tokenizer.token_bytes
    comment_first = [i for i, t in enumerate(table) if t.lstrip().startswith(b"#")]
    assert comment_first
    heal = b"\n    "
    for out in (heal, heal + b"\n  "):  # nothing yet, or only whitespace: no token that starts a comment
        masked = engine.mask_logits(torch.zeros(len(table)), bytearray(out), heal, "block", False, code_first=True)
        assert all(masked[i] == float("-inf") for i in comment_first)
        assert masked[table.index(b" echo")] == 0
    after_code = engine.mask_logits(torch.zeros(len(table)), bytearray(heal + b"echo\n"), heal, "block", False,
                                    code_first=True)
    assert all(after_code[i] == 0 for i in comment_first)  # a comment later in the answer is fine
    assert code_expected("set -e\n# clean up\n", "\nexit 0\n") and code_expected("ls\n    ", "  \n")
    assert not code_expected("", "")  # a file's start: a shebang (`#!`) is the answer to expect
    assert not code_expected("set -e\n# clean", "")  # a comment being typed is completed
    assert not code_expected("set -e\n", "echo hi\n")  # text after the cursor: not an answer's start
    # inside a comment block (a comment right above and right below) a comment may come
    assert not code_expected("# Backs up /srv\n# every night\n", "\n# Usage: backup.sh\nset -e\n")
    assert code_expected("# Backs up /srv\n", "\n\n# Step two\n")  # a blank line below: not one block
    assert not code_expected("ls\n\u00a0\u00a0", "\n")  # a no-break space is a character to bash, not indentation
    # a heredoc body or a quoted string holds text: a `#` line there is data, not a comment to avoid
    assert not code_expected("cat <<EOF\n# line 1\n", "\nEOF\n")
    assert not code_expected("help='\n# line 1\n", "\n'\n")
    assert code_expected("cat <<EOF\n# line 1\nEOF\n", "\nexit 0\n")  # after the body: code again
    assert code_expected('x="$(\n', '\n)"\n')  # inside a command substitution: commands


def test_a_lone_surrogate_in_the_text_is_read_as_a_replacement_character(engine):
    """A bad JSON escape or an argv read with surrogateescape leaves lone surrogates, which no UTF-8
    holds: the engine answers instead of raising from the tokenizer."""
    for prefix, suffix in (("#!/bin/bash\necho \ud800\n", "\n"), ("#!/bin/bash\n", "\necho \udcff\n")):
        for mode in ("line", "block"):
            assert isinstance(engine.complete_detailed(prefix, suffix, mode).text, str)
    assert engine.tokenizer.encode("a\udc80b") == engine.tokenizer.encode("a\ufffdb")


def test_an_answer_cut_unsure_at_a_bare_comment_start_drops_it():
    assert without_a_bare_comment_start("#", "") == "" and without_a_bare_comment_start("#", "    ") == ""
    assert without_a_bare_comment_start("\n\n#", "#!/bin/bash") == ""
    assert without_a_bare_comment_start("fi\n\n  #", "") == "fi"
    assert without_a_bare_comment_start("# Clean", "") == "# Clean"  # words the model was sure of stay
    assert without_a_bare_comment_start("#", "echo ${file") == "#"  # ${file#...}: no comment start
    assert without_a_bare_comment_start("exit 1", "") == "exit 1"


def test_a_block_cut_unsure_inside_a_later_line_keeps_its_whole_lines():
    from codellm.completion import Decoded, shown_part

    def shown(text, turned_down, line_prefix=""):
        return shown_part(text, Decoded(stop="unsure", turned_down=turned_down), line_prefix, "block")

    assert shown("echo hi\n  if [ -", b"z") == ("echo hi", False)
    assert shown("echo hi\n  ls", b"\n") == ("echo hi\n  ls", False)
    assert shown("echo hi", b" there") == ("echo hi", True)  # the cursor's own line stays, cut short
    # the line kept ended where a newline followed: its last word is whole
    assert shown('    curl -fsSL "$url" | tar -xzf -\n    cd ', b"build", "    ") == \
        ('    curl -fsSL "$url" | tar -xzf -', False)
    assert shown_part("cat -", Decoded(stop="unsure", turned_down=b";"), "", "line") == ("cat -", True)  # `;` ends a word
    # out of tokens, the last line is as unfinished as the model left it
    assert shown_part("    rm -f", Decoded(stop="max_tokens"), "", "block") == ("    rm -f", True)
    assert shown_part("    rm -f x\n", Decoded(stop="max_tokens"), "", "block") == ("    rm -f x\n", False)


def test_out_of_time_an_answer_leaves_no_operator_without_its_right_side_nor_a_test_open():
    from codellm.completion import Decoded, shown_part

    def at_deadline(text, line_prefix=""):
        return shown_part(text, Decoded(stop="deadline"), line_prefix, "line")[0]

    # bash joins a line ending in `|` or `&&` to the next one, which would then run in the pipeline
    assert at_deadline("cat /etc/passwd | ") == "cat /etc/passwd"
    assert at_deadline("make -j4 && ") == "make -j4" and at_deadline("make -j4 && make ") == "make -j4 && make"
    assert at_deadline("git push origin main 2>&1 | ") == "git push origin main 2>&1"
    # a test cut short goes whole: `[[ -n "$x" && -d` swallows the next line, `[ $N -gt 0` lacks its `]`
    assert at_deadline('if [[ -d "${rootfs}" ') == "if"
    assert at_deadline("if [ $N -gt 0 ") == "if"
    assert at_deadline('[ -f "$x" ] && [ -d ') == '[ -f "$x" ]'
    assert at_deadline("]]; then echo ", 'if [[ -f "$x" ') == "]]; then echo"  # closing one begun before
    assert at_deadline('echo "[ a" b ') == 'echo "[ a" b'  # quoted, no test


def test_out_of_time_an_escaped_blank_before_a_dropped_operator_stays():
    from codellm.completion import Decoded, shown_part
    assert shown_part("cd My\\ && ", Decoded(stop="deadline"), "", "line")[0] == "cd My\\ "
