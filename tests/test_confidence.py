"""A confidence for every suggestion, the cut where it drops, hiding unsure suggestions, and the
keystroke evaluation's counting."""
import asyncio
import math

import pytest
import torch

import codellm
from codellm.server.keystrokes import Region, Typist, next_word, pick_regions, type_region
from codellm.server.service import Settings

from lsp_session import Session

NEG_INF = float("-inf")
# text below the cursor, so that the answer at the file's start is not held to a shebang (an empty file's is)
FILE_BELOW = "\n\nexit 0\n"


@pytest.fixture
def engine(bundle_path):
    return codellm.load(str(bundle_path), device="cpu")


class ScriptedDecoder:
    """Stands in for the model: after each token fed, the logits given in `script` (token -> row)."""

    def __init__(self, script: dict[int, torch.Tensor], first: torch.Tensor):
        self.script, self.first = script, first

    def run(self, tokens, pos, cache):
        return torch.stack([self.script.get(t, self.first) for t in tokens])

    def step(self, token, pos, cache):
        return self.run([token], pos, cache)[0]

    def read(self, tokens, pos, cache):
        pass


def row(vocab: int, token: int, p: float, rest: list[int]) -> torch.Tensor:
    """Logits giving `token` probability p and the tokens in `rest` the remainder, evenly."""
    logits = torch.full((vocab,), NEG_INF)
    logits[rest] = math.log((1 - p) / len(rest))
    logits[token] = math.log(p)
    return logits


def test_the_cut_stops_before_a_low_probability_token(engine, tokenizer):
    ids = tokenizer.encode("echo hello world")
    assert len(set(ids)) >= 3
    a, b, c = ids[:3]
    eot, vocab = tokenizer.eot_id, tokenizer.vocab_size
    # the remainder goes to tokens no stop rule masks (specials, line ends, and at a file's start tokens
    # that begin with whitespace), so the probabilities are exact
    rest = [i for i, t in enumerate(tokenizer.token_bytes) if i not in ids and i not in tokenizer.special_ids
            and t and not t.lstrip(b" \t").startswith((b"\n", b"\r")) and not t.decode("utf-8", "ignore")[:1].isspace()]
    engine.decoder = ScriptedDecoder({a: row(vocab, b, 0.8, rest), b: row(vocab, c, 0.1, rest),
                                      c: row(vocab, eot, 0.9, rest)}, first=row(vocab, a, 0.9, rest))
    engine.guess_tokens = 0
    engine.cache.reset()
    whole = engine.complete_detailed("", FILE_BELOW, "line", clean=False)
    assert whole.text == tokenizer.decode([a, b, c]) and whole.stop_reason == "eot"
    assert whole.confidence == pytest.approx(0.9 * 0.8 * 0.1, rel=1e-4)
    cut = engine.complete_detailed("", FILE_BELOW, "line", clean=False, cut=0.5)
    assert cut.text == tokenizer.decode([a, b]) and cut.stop_reason == "unsure"
    assert cut.confidence == pytest.approx(0.72, rel=1e-4)
    assert [p for _, _, p in cut.token_probs] == pytest.approx([0.9, 0.8], rel=1e-4)
    first = len(tokenizer.decode([a]))
    assert cut.confidence_of(first) == pytest.approx(0.9, rel=1e-4)  # a shortened text keeps its own odds
    assert engine.complete_detailed("", FILE_BELOW, "line", clean=False, cut=0.95).text == ""


def test_confidence_is_the_same_with_guessed_tokens_and_counts_the_healed_word(engine):
    prefix = "for f in *.txt; do\n    cp \"$f\" /tmp/backup/\ndone\nfor f in *.txt; do\n    cp \"$f\" /tm"
    guessing = engine.complete_detailed(prefix, "", "block", clean=False)
    engine.guess_tokens = 0
    engine.cache.reset()
    stepping = engine.complete_detailed(prefix, "", "block", clean=False)
    assert guessing.text == stepping.text
    assert [p for *_, p in guessing.token_probs] == pytest.approx([p for *_, p in stepping.token_probs], abs=1e-3)
    assert 0 < guessing.confidence <= 1
    # the token that re-types the backed-off "tm" is chosen, and counted, before any inserted text
    assert guessing.token_probs[0][0] == 0


def test_settings_take_the_thresholds_and_refuse_nonsense():
    settings = Settings()
    assert settings.update({"minConfidence": 0.25, "cutConfidence": "0.4"}) == ["min_confidence", "cut_confidence"]
    assert (settings.min_confidence, settings.cut_confidence) == (0.25, 0.4)
    settings.update({"minConfidence": 2})
    assert settings.min_confidence == 0.25 and settings.problems


def test_a_huge_setting_is_quoted_short_in_the_message():
    settings = Settings()
    settings.update({"lineMs": 1e308, "modelPath": 12345678901234567890 ** 4})
    assert settings.line_ms == Settings().line_ms
    assert len(settings.problems) == 2 and all(len(p) < 160 for p in settings.problems), settings.problems
    assert "got 1e+308" in settings.problems[0]


def test_a_suggestion_under_min_confidence_is_not_shown_by_the_real_server(bundle_path):
    uri = "file:///tmp/work/unsure.sh"
    text = "#!/bin/bash\nset -e\nmkdir -p /tmp/backup\ncp "

    async def ask(options):
        async with Session("--model", str(bundle_path), init_options=options) as s:
            s.open(uri, text)
            items = (await s.inline(uri, 3, 3)).items
            return items, await s.status()

    async def main():
        shown, status = await ask({"cutConfidence": 0, "minConfidence": 0, "maxTokens": 3})
        assert shown and shown[0].insert_text
        confidence = status.confidence.p50
        assert 0 < confidence < 1 and status.hidden_unsure == 0 and status.shown == 1
        hidden, status = await ask({"cutConfidence": 0, "minConfidence": min(1.0, confidence * 1.01),
                                    "maxTokens": 3})
        assert not hidden and status.hidden_unsure == 1 and status.shown == 0

    asyncio.run(asyncio.wait_for(main(), 240))


def scripted(answers: dict[str, str]):
    """An `ask` that types into a string and answers from `answers` by what has been typed."""
    typed = []

    async def ask(inserted):
        typed.append(inserted)
        return answers.get("".join(typed), "")
    return ask


def test_typing_counts_keystrokes_exactly_on_a_hand_made_case():
    text = "echo hello world\n"  # 17 characters
    answers = {"": "ech", "ech": "o hi", "echo": " hi", "echo ": "hello world"}
    tally = asyncio.run(type_region(text, scripted(answers), "whole"))
    # Tab "ech", type "o" (" hi" stays on screen: not a new suggestion), type " ", Tab "hello world", type "\n"
    assert (tally.characters, tally.keystrokes, tally.requests) == (17, 5, 5)
    assert (tally.shown, tally.taken, tally.answers) == (3, 2, 4)
    assert tally.figures()["keystrokes_saved"] == round(100 * (1 - 5 / 17), 1)
    assert tally.figures()["taken_of_shown"] == round(100 * 2 / 3, 1)


def test_typing_with_next_word_acceptance():
    text = "ls -la /tmp\n"  # 12 characters
    answers = {"": "ls -la /var", "ls": " -la /var", "ls -": "la /var", "ls -la": " /var"}
    assert [next_word(s) for s in ("ls -la", " -la", "\n    echo x", "   ")] == ["ls", " -", "\n    echo", "   "]
    whole = asyncio.run(type_region(text, scripted(answers), "whole"))
    # typed one by one, the scripted answers come and go: each that returns is a new suggestion shown
    assert (whole.keystrokes, whole.shown, whole.taken) == (12, 4, 0)
    word = asyncio.run(type_region(text, scripted(answers), "word"))
    # "ls", " -", "la", " /" taken a word at a time; "var" is wrong: t, m, p, newline typed
    assert (word.keystrokes, word.words, word.shown, word.used, word.taken) == (8, 4, 1, 1, 0)


def test_regions_are_whole_lines_from_the_scripts():
    script = "".join(f"echo line {i}\n" for i in range(30))
    regions = pick_regions([script, script], 40)
    assert regions and all(r.before + r.text + r.after == script for r in regions)
    assert all(r.before.endswith("\n") and r.after.startswith("\n") for r in regions)


def test_typing_into_the_real_server(bundle_path):
    script = "#!/bin/bash\nset -e\n" + "".join(f"cp \"$f\" /tmp/backup/{i}\n" for i in range(12))
    region = Region("\n".join(script.split("\n")[:4]) + "\n", "\n".join(script.split("\n")[4:6]),
                    "\n" + "\n".join(script.split("\n")[6:]))

    async def main():
        async with Typist(["--model", str(bundle_path)], {"cutConfidence": 0, "minConfidence": 0}) as typist:
            tally = await typist.type_regions([region], "whole")
            status = await typist.status()
        return tally, status

    tally, status = asyncio.run(asyncio.wait_for(main(), 240))
    assert tally.characters == len(region.text)
    assert tally.requests == tally.keystrokes <= tally.characters == len(region.text)
    assert status.requests == tally.requests


def test_a_measure_ended_by_an_error_or_a_signal_kills_its_server_at_once(bundle_path):
    """Leaving the typist on an exception (a KeyboardInterrupt, a cancelled task) does not ask the server to
    shut down (its answer may never be read: the loop is being torn down) but kills it; a normal end asks."""
    async def main(error):
        typist = Typist(["--model", str(bundle_path)])
        await typist.__aenter__()
        await typist.__aexit__(type(error) if error else None, error, None)
        return typist.client._server.returncode

    assert asyncio.run(asyncio.wait_for(main(None), 240)) == 0
    for error in (KeyboardInterrupt(), asyncio.CancelledError()):
        assert asyncio.run(asyncio.wait_for(main(error), 240)) == -9  # SIGKILL


def test_the_server_starts_from_a_folder_holding_a_folder_named_codellm(bundle_path, tmp_path, monkeypatch):
    """Run from where a clone of the project sits (`~/codellm`), the measuring client's server still
    imports the installed package; a server that cannot start says why."""
    (tmp_path / "codellm").mkdir()
    monkeypatch.chdir(tmp_path)

    async def status(args):
        async with Typist(args) as typist:
            return await typist.status()

    assert asyncio.run(asyncio.wait_for(status(["--model", str(bundle_path)]), 240)).requests == 0
    with pytest.raises(RuntimeError, match="(?s)codellm-serve did not start.*--threads"):
        asyncio.run(asyncio.wait_for(status(["--threads", "0"]), 240))


def test_settings_are_read_flat_or_under_a_codellm_key():
    assert Settings().file_context is True  # on unless turned off
    for options in ({"fileContext": False, "minConfidence": 0.4}, {"codellm": {"fileContext": False, "minConfidence": 0.4}}):
        settings = Settings()
        assert sorted(settings.update(options)) == ["file_context", "min_confidence"]
        assert settings.file_context is False and settings.min_confidence == 0.4


def test_an_answer_forced_where_the_model_would_end_keeps_the_models_doubt(engine, tokenizer):
    """Where the first token may not end the answer (allow_empty False), the token picked carries the
    probability the model gave it, not one raised by leaving the end out: at the end of a finished line
    a continuation the model doubts is cut, not shown at the odds it had among the rest."""
    a = tokenizer.encode("echo")[0]
    eot, vocab = tokenizer.eot_id, tokenizer.vocab_size
    rest = [i for i, t in enumerate(tokenizer.token_bytes) if i != a and i not in tokenizer.special_ids
            and t and not t.lstrip(b" \t").startswith((b"\n", b"\r")) and not t.decode("utf-8", "ignore")[:1].isspace()]
    first = torch.full((vocab,), NEG_INF)
    first[eot], first[a], first[rest] = math.log(0.6), math.log(0.3), math.log(0.1 / len(rest))
    engine.decoder = ScriptedDecoder({a: row(vocab, eot, 0.9, rest)}, first=first)
    engine.guess_tokens = 0
    engine.cache.reset()
    forced = engine.complete_detailed("", FILE_BELOW, "block", clean=False)
    assert forced.text == tokenizer.decode([a]) and forced.confidence == pytest.approx(0.3, rel=1e-4)
    assert engine.complete_detailed("", FILE_BELOW, "block", clean=False, cut=0.5).text == ""
    assert engine.complete_detailed("", FILE_BELOW, "block", clean=False, allow_empty=True).text == ""  # it ends


def test_an_empty_files_answer_begins_with_a_shebang_even_where_the_model_rates_another_start_higher(
        engine, tokenizer):
    colon, shebang = tokenizer.encode(":")[0], tokenizer.encode("#!/bin/bash")
    vocab, eot = tokenizer.vocab_size, tokenizer.eot_id
    rest = [i for i, t in enumerate(tokenizer.token_bytes) if i not in tokenizer.special_ids and t]
    first = row(vocab, colon, 0.9, rest)  # `:` first, as a model trained on scripts that begin so may rate it
    engine.decoder = ScriptedDecoder({colon: row(vocab, eot, 0.99, rest), shebang[-1]: row(vocab, eot, 0.99, rest)},
                                     first=first)
    engine.guess_tokens = 0
    engine.cache.reset()
    assert engine.complete_detailed("", "", "line", clean=False).text.startswith("#!")
    engine.cache.reset()  # with text below the cursor, the model's own start stands
    assert engine.complete_detailed("", FILE_BELOW, "line", clean=False).text.startswith(":")


def test_a_server_that_never_answers_is_killed_and_reported_in_its_own_words(bundle_path):
    """Started for TCP, the server listens on a port and says so, and never answers over stdio."""
    from pygls.lsp.client import LanguageClient

    from codellm.server.spawn import start_server

    client = LanguageClient("codellm-test", "1")
    with pytest.raises(RuntimeError, match=r"(?s)did not start \(no answer within 5 s\).*listening on 127\.0\.0\.1"):
        asyncio.run(start_server(client, ["--tcp", "0", "--model", str(bundle_path)], timeout=5))
    assert client._server.returncode is not None  # killed, not left running
