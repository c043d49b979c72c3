"""Byte-level BPE: exact round trips, special tokens, save/load."""
import pytest

from codellm.tokenizer import ENDOFTEXT, SPECIAL_TOKENS, Tokenizer


TRICKY = [
    "\tindented\twith\ttabs\n\t\tdouble\n",
    "windows\r\nline\r\nendings\r\n",
    "unicode: héllo wörld ✓ 日本語 emoji 😀 and a lone combining e\u0301\n",
    "long runs:" + " " * 300 + "x" + "\t" * 50 + "\n" * 20 + "end",
    'echo "$HOME" | sed -e \'s/\\\\/\\//g\' && exit 0',
    "",
    "<|endoftext|> typed as text <|fim_prefix|>",
]


@pytest.mark.parametrize("text", TRICKY)
def test_exact_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_have_ids_and_typed_specials_stay_text(tokenizer):
    ids = {tokenizer.eot_id, tokenizer.fim_prefix_id, tokenizer.fim_suffix_id, tokenizer.fim_middle_id}
    assert len(ids) == 4
    encoded = tokenizer.encode(ENDOFTEXT)
    assert tokenizer.eot_id not in encoded and len(encoded) > 1


def test_save_load_same_encoding(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    for text in TRICKY:
        assert again.encode(text) == tokenizer.encode(text)
    assert again.vocab_size == tokenizer.vocab_size


def test_token_bytes_cover_every_id(tokenizer):
    table = tokenizer.token_bytes
    assert len(table) == tokenizer.vocab_size
    text = "for x in a b c; do echo $x; done\n"
    assert b"".join(table[i] for i in tokenizer.encode(text)) == text.encode()
    assert [table[tokenizer.hf.token_to_id(t)] for t in SPECIAL_TOKENS] == [t.encode() for t in SPECIAL_TOKENS]


def test_indentation_runs_become_single_tokens():
    tok = Tokenizer.train(["if true; then\n        echo a\n    fi\n"] * 50, vocab_size=300)
    assert len(tok.encode("\n        echo")) <= 3
