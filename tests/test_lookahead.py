"""Prompt lookup: guesses come from the latest earlier occurrence of the last tokens, and checking them
changes how many model calls an answer takes, not the answer."""
import pytest

import codellm
from codellm.lookahead import PromptLookup


def test_guess_continues_the_latest_earlier_match():
    lookup = PromptLookup([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3])
    assert lookup.guess(3) == [7, 8, 6]  # "2 3" last seen before 7 8 6, not before 4 5 9
    assert lookup.guess(1) == [7]


def test_a_longer_match_wins_over_a_later_shorter_one():
    lookup = PromptLookup([5, 2, 3, 4, 4, 1, 2, 3, 8, 8, 5, 2, 3])
    assert lookup.guess(2) == [4, 4]  # "5 2 3" matches at the start; only "2 3" matches before 8 8


def test_no_guess_without_a_match_of_two_tokens():
    lookup = PromptLookup([1, 2, 3, 4, 3])
    assert lookup.guess(3) == []  # the last token alone occurs earlier: not enough
    lookup.append(4)
    assert lookup.guess(3) == [3, 4]  # now "3 4" matches, and what followed it is known up to here
    assert PromptLookup([]).guess(3) == [] and PromptLookup([1, 2]).guess(0) == []


@pytest.fixture(scope="module")
def exact_engine():
    return codellm.load(device="cpu", precision="fp32")


REPETITIVE = """#!/bin/bash
mkdir -p "$BUILD_DIR/logs"
cp "$SRC_DIR/config/app.conf" "$BUILD_DIR/config/app.conf"
cp "$SRC_DIR/config/db.conf" "$BUILD_DIR/config/db.conf"
cp "$SRC_DIR/config/"""


@pytest.mark.parametrize("mode", ["line", "block"])
def test_checked_guesses_give_the_same_answer_in_fewer_calls(exact_engine, mode):
    answers = {}
    for guess_tokens in (0, 3):
        exact_engine.guess_tokens = guess_tokens
        exact_engine.cache.reset()
        answers[guess_tokens] = exact_engine.complete_detailed(REPETITIVE, "", mode, clean=False)
    exact_engine.guess_tokens = 3
    one_by_one, guessed = answers[0], answers[3]
    assert guessed.text == one_by_one.text and guessed.new_tokens == one_by_one.new_tokens
    assert one_by_one.model_calls == one_by_one.new_tokens  # one call per token (the first reads the prompt)
    assert guessed.new_tokens >= 6, guessed
    assert guessed.model_calls < guessed.new_tokens, guessed
