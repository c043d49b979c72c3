"""Byte-level BPE tokenizer (HF `tokenizers`) with the special tokens of the prompt format."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

ENDOFTEXT = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_MIDDLE = "<|fim_middle|>"
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # what a bad JSON escape or a surrogateescape'd argv leaves
SPECIAL_TOKENS = [ENDOFTEXT, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE]


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE's printable stand-in character for each byte, inverted: char -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class Tokenizer:
    """Wraps a HF tokenizer; exposes the special token ids and each token's raw bytes."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        hf.encode_special_tokens = True  # "<|endoftext|>" typed in a script is text, not a control token
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        self.eot_id = hf.token_to_id(ENDOFTEXT)
        self.fim_prefix_id = hf.token_to_id(FIM_PREFIX)
        self.fim_suffix_id = hf.token_to_id(FIM_SUFFIX)
        self.fim_middle_id = hf.token_to_id(FIM_MIDDLE)
        self.special_ids = {self.eot_id, self.fim_prefix_id, self.fim_suffix_id, self.fim_middle_id}
        self._token_bytes: list[bytes] | None = None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> "Tokenizer":
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """The tokenizer saved at `path` (tokenizers' JSON). Raises ValueError naming the file when it is
        missing, not a file, or not a tokenizer."""
        if not Path(path).is_file():
            raise ValueError(f"{path}: no tokenizer file there")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:  # the tokenizers library raises plain Exception
            raise ValueError(f"{path}: not a tokenizer file ({exc})") from None

    @classmethod
    def from_str(cls, text: str) -> "Tokenizer":
        return cls(HFTokenizer.from_str(text))

    def save(self, path: str | Path) -> None:
        """tokenizer.json without indentation: less than half the size of the indented file."""
        self.hf.save(str(path), pretty=False)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Text to ids; special-token strings inside user text are encoded as ordinary text, a lone
        surrogate as U+FFFD."""
        return self.hf.encode(clean_text(text), add_special_tokens=False).ids if text else []

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch([clean_text(t) for t in texts], add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self.token_bytes
        return b"".join(table[i] for i in ids)

    @property
    def token_bytes(self) -> list[bytes]:
        """Raw bytes of every token id (special tokens map to their literal text)."""
        if self._token_bytes is None:
            alphabet = _byte_level_alphabet()
            table = [b""] * self.vocab_size
            for piece, idx in self.hf.get_vocab().items():
                if idx in self.special_ids or piece in SPECIAL_TOKENS:
                    table[idx] = piece.encode()
                else:
                    table[idx] = bytes(alphabet[c] for c in piece)
            self._token_bytes = table
        return self._token_bytes

    def to_str(self) -> str:
        return self.hf.to_str()


def token_pieces(tok: Tokenizer, text: str) -> list[tuple[int, str]]:
    """(id, text) per token, where the texts join back to `text` exactly: a character split over
    several byte-level tokens is given to the token that completes it."""
    pieces, pending = [], b""
    for i in tok.encode(text):
        pending += tok.token_bytes[i]
        complete = len(pending)
        while complete:
            try:
                piece = pending[:complete].decode("utf-8")
                break
            except UnicodeDecodeError:
                complete -= 1
        else:
            piece = ""
        pieces.append((i, piece))
        pending = pending[complete:]
    return pieces


def clean_text(text: str) -> str:
    """`text` with each lone surrogate (which no UTF-8 holds, so neither the tokenizer nor bash can take
    it) replaced by U+FFFD; the length in UTF-16 units, which editors count positions in, is kept."""
    return LONE_SURROGATE.sub("\ufffd", text) if LONE_SURROGATE.search(text) else text
