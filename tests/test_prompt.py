"""The prompt format module: FIM layouts, windowing that stays put while typing, training examples."""
import random

from codellm.prompt import (ANSWER_RESERVE, SUFFIX_CHARS, assemble, build_prompt, choose_format, fim_training_ids,
                            heal_split, join_line_endings, prompt_budget, split_line_endings, stable_tail_start,
                            window_start)

SCRIPT = "".join(f"echo line {i} with some words\n" for i in range(400))


def split_ids(ids, tok):
    return tok.decode([i for i in ids if i not in tok.special_ids])


def test_psm_and_spm_layouts(tokenizer):
    p, s = tokenizer.encode("if [ -f x ]; then\n"), tokenizer.encode("\nfi\n")
    T = tokenizer
    assert assemble(T, "psm", p, s) == [T.fim_prefix_id, *p, T.fim_suffix_id, *s, T.fim_middle_id]
    assert assemble(T, "spm", p, s) == [T.fim_prefix_id, T.fim_suffix_id, *s, T.fim_middle_id, *p]
    assert assemble(T, "plain", p, s) == p


def test_window_start_is_line_aligned_and_stable_while_typing():
    max_chars = 1000
    starts = set()
    for n in range(3000, 3400):
        start = window_start(SCRIPT[:n], max_chars)
        assert start == 0 or SCRIPT[start - 1] == "\n"
        assert n - start <= max_chars
        starts.add(start)
    assert len(starts) <= 2  # 400 keystrokes move the window at most once


def test_build_prompt_fits_budget_and_keeps_the_end_of_the_prefix(tokenizer):
    for fmt in ("spm", "psm", "plain"):
        prompt = build_prompt(tokenizer, SCRIPT[:5000] + "ec", SCRIPT[5000:], fmt, budget=200)
        assert len(prompt.ids) <= 200
        ids = prompt.ids
        if fmt == "psm":
            ids = ids[1:ids.index(tokenizer.fim_suffix_id)]
        assert (tokenizer.decode_bytes(ids[ids.index(tokenizer.fim_middle_id) + 1:] if fmt == "spm" else ids)
                + prompt.heal).endswith(SCRIPT[4970:5000].encode() + b"ec")


def test_a_line_too_long_to_skip_whole_is_cut_not_dropped(tokenizer):
    """A line longer than the window above the cursor (a payload, a long array) leaves its tail in the
    window, not the cursor's line alone; the window's start still stays put while a person types."""
    long_line = "#!/bin/bash\n# " + "long comment " * 400 + "\n"
    for fmt, suffix in (("plain", ""), ("spm", "\nfi\n")):
        prompts = [build_prompt(tokenizer, long_line + typed, suffix, fmt, budget=512).ids
                   for typed in ("e", "ec", "ech", "echo")]
        assert all(len(ids) <= 512 for ids in prompts)
        text = tokenizer.decode_bytes([i for i in prompts[-1] if i not in tokenizer.special_ids])
        assert text.count(b"long comment") >= 10, text[:200]
        for before, after in zip(prompts, prompts[1:]):
            assert after[:len(before) - 2] == before[:-2]


def test_a_plain_prompt_is_never_empty_however_small_its_budget(tokenizer):
    for prefix in (SCRIPT[:3000] + "ech", "x" * 50 + "\U0001F600", "echo 日本語", "", "  "):
        for budget in (1, 2, 4, 8):
            prompt = build_prompt(tokenizer, prefix, fmt="plain", budget=budget)
            assert 1 <= len(prompt.ids) <= budget, (prefix, budget)
            text = tokenizer.decode_bytes([i for i in prompt.ids if i not in tokenizer.special_ids])
            assert prefix.encode().endswith(text + prompt.heal)


def test_spm_prompt_grows_only_at_its_end_while_typing(tokenizer):
    suffix = "\nfi\n"
    before = build_prompt(tokenizer, SCRIPT[:2000] + "if [ -z", suffix, "spm", budget=300, heal=False).ids
    after = build_prompt(tokenizer, SCRIPT[:2000] + "if [ -z \"$1", suffix, "spm", budget=300, heal=False).ids
    shared = next(i for i, (a, b) in enumerate(zip(before + [None], after)) if a != b)
    assert shared >= len(before) - 2


def test_heal_split_backs_off_a_partial_word(tokenizer):
    ids = tokenizer.encode("for f in *.txt; do\n    ech")
    kept, heal = heal_split(tokenizer, ids)
    assert heal.endswith(b"ech")
    assert tokenizer.decode_bytes(kept) + heal == "for f in *.txt; do\n    ech".encode()
    kept, heal = heal_split(tokenizer, tokenizer.encode("done\n"))
    assert tokenizer.decode_bytes(kept) + heal == b"done\n" and heal.endswith(b"\n")


def test_heal_split_takes_the_space_that_would_merge_with_the_word(tokenizer):
    T = tokenizer
    space, word = T.hf.token_to_id("Ġ"), T.encode("ech")
    kept, heal = heal_split(T, T.encode("x\n") + [space] + word)
    assert heal == b" ech" and kept == T.encode("x\n")


def test_heal_split_backs_off_every_token_of_a_partial_word(tokenizer):
    """A word split into several tokens is backed off whole, so the model may type it as it learned it."""
    T = tokenizer
    line = T.encode("x\n")
    kept, heal = heal_split(T, line + T.encode(" ca") + T.encode("se"))
    assert heal == b" case" and kept == line
    kept, heal = heal_split(T, line + T.encode("echo") + T.encode(" fo") + T.encode("o"))
    assert heal == b" foo" and kept == line + T.encode("echo")  # a blank ends the word
    kept, heal = heal_split(T, line + T.encode("$HOME/") + T.encode("bi"))
    assert heal == b"bi"  # so does punctuation
    kept, heal = heal_split(T, T.encode("日本語") + T.encode(" fo") + T.encode("o"))
    assert heal == b" foo"  # whatever splits a character before the word
    letters = [T.encode(c)[0] for c in "abcdef"]
    kept, heal = heal_split(T, line + letters)
    assert heal == b"cdef" and kept == line + letters[:2]  # at most MAX_HEAL_TOKENS


def test_fim_training_examples_reassemble_the_document(tokenizer):
    rng = random.Random(0)
    text = SCRIPT[:700]
    seen = set()
    for _ in range(60):
        ids = fim_training_ids(tokenizer, text, rng, fim_rate=0.9)
        T = tokenizer
        assert ids[-1] == T.eot_id
        body = ids[:-1]
        if body[:2] == [T.fim_prefix_id, T.fim_suffix_id]:  # SPM
            m = body.index(T.fim_middle_id)
            suffix, rest = body[2:m], body[m + 1:]
            assert (T.decode(rest) + T.decode(suffix)) == text
            seen.add("spm")
        elif body[:1] == [T.fim_prefix_id]:  # PSM
            s, m = body.index(T.fim_suffix_id), body.index(T.fim_middle_id)
            assert T.decode(body[1:s]) + T.decode(body[m + 1:]) + T.decode(body[s + 1:m]) == text
            seen.add("psm")
        else:
            assert T.decode(body) == text
            seen.add("plain")
    assert seen == {"spm", "psm", "plain"}


def test_crlf_text_is_read_as_lf_and_answered_in_crlf():
    assert split_line_endings("a\r\nb", "\r\nc\r\n") == ("a\nb", "\nc\n", "\r\n")
    assert split_line_endings("a\r", "\nb\r\n") == ("a", "\nb\n", "\r\n")  # the cursor sat before the \r
    assert split_line_endings("a\nb\nc", "\nd\r\n")[2] == "\n"  # mostly LF: LF
    assert join_line_endings("\n    echo\nfi", "\r\n") == "\r\n    echo\r\nfi"


def test_a_long_buffer_is_read_from_a_stable_tail_and_the_head_of_its_suffix(tokenizer):
    text = SCRIPT * (1 + 40000 // len(SCRIPT))
    starts = {stable_tail_start(text[:n]) for n in range(25000, 32000, 500)}
    assert starts == {8192}  # the cut stays put while a person types
    prefix, suffix = text[:30000], text[30000:]
    for fmt in ("spm", "plain"):
        whole = build_prompt(tokenizer, prefix, suffix, fmt, budget=300)
        tail = stable_tail_start(prefix)
        assert whole == build_prompt(tokenizer, prefix[tail:], suffix[:SUFFIX_CHARS], fmt, budget=300)
    assert choose_format(" \n", "spm") == "plain" and choose_format("fi\n", "spm") == "spm"
    assert prompt_budget(1024) == 1024 - ANSWER_RESERVE and prompt_budget(64, 1000) == 32


def test_a_tiny_budget_still_gives_a_prompt(tokenizer):
    """A bundle may have a context of a few tokens: the prompt is cut to it, without looping."""
    for budget in range(1, 14):
        prompt = build_prompt(tokenizer, "#!/bin/bash\necho hello world\nfor f in *; do\n\tec", "\ndone\n", "spm",
                              budget=budget)
        assert len(prompt.ids) <= budget + 4  # the FIM sentinels, whatever the budget
