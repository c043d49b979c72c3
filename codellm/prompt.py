"""The prompt format: fill-in-the-middle (PSM / SPM) and plain prompts, for training and serving alike.

PSM: <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle <endoftext>
SPM: <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle <endoftext>

With SPM the prompt only grows at its end while a person types, so its KV cache is reused between
keystrokes. The prompt window lives here, for the engine, the CLI and the server alike: of a long buffer
only a stable tail of the prefix and the head of the suffix are read; the prefix window's start stays put
and jumps in line-aligned steps of half the window (a line too long to skip whole is cut), so that it
does not shift on every keystroke; room is kept for the answer (ANSWER_RESERVE). With a blank suffix the
prompt is plain text, and a prefix that reaches the start of the file follows <endoftext>, as a training
document does.

Context from other files (what a script sources, other open documents) is shell text placed before the
file's own prefix, each file introduced by a comment naming it (format_context), so a model reads it as
code above the cursor that it may call, with no new token:

SPM with context: <fim_prefix> <fim_suffix> suffix <fim_middle> context prefix middle <endoftext>

It sits before the prefix and changes only when the chosen chunks do, so the prompt still only grows
at its end while a person types.
"""
from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass

from .tokenizer import Tokenizer

FORMATS = ("spm", "psm", "plain")
FIM_FORMATS = ("spm", "psm")  # what a model bundle may be trained for (bundle.py checks its config)
DEFAULT_FORMAT = "spm"  # keeps the prompt's start fixed while a person types (module docstring)
# room kept for the answer when the prompt is windowed: the same for line and block requests, so that
# both see one window and share the KV cache (a block answer may then stop short of 160 in a full window)
ANSWER_RESERVE = 96
BUFFER_TAIL_CHARS = 16384  # of a long prefix, at most this much is read; cut at a stable point
SUFFIX_CHARS = 8192  # of a long suffix, at most this much is read
CHARS_PER_TOKEN_GUESS = 2.5  # conservative for shell text (measured ~3.2): windows are cut in characters first
SUFFIX_SHARE = 0.25  # at most this share of the prompt budget goes to the suffix
# context from other files fills the room the prefix and suffix leave, up to CONTEXT_SHARE of the budget.
# It takes room from the prefix only down to CONTEXT_MIN_SHARE: for the shipped model, the file's own
# lines just above the cursor were worth more than another file's definitions (train/evaluate.py cross_file)
CONTEXT_SHARE = 0.3
CONTEXT_MIN_SHARE = 0.0
CONTEXT_STEP = 32  # the room for context is counted in steps of this many tokens


@dataclass(frozen=True)
class ContextChunk:
    """A piece of another file shown before the prefix: the file's name as shown, the line it starts
    at (chunks of one file are shown in line order), and its text (whole lines)."""
    path: str
    line: int
    text: str


@dataclass
class Prompt:
    ids: list[int]  # what the model reads
    heal: bytes = b""  # bytes backed off from the end of the prefix; the completion must start with them


def choose_format(suffix: str, trained: str) -> str:
    """The format of a serving prompt: the model's FIM format `trained`, or "plain" when the suffix is
    blank as far as it is read (there is nothing to fill in before, and plain text is what the model saw
    most)."""
    return trained if suffix[:SUFFIX_CHARS].strip() else "plain"


def prompt_budget(context_length: int, max_new_tokens: int | None = None) -> int:
    """Tokens a prompt may take: the context less the room kept for the answer (ANSWER_RESERVE, or
    max_new_tokens if larger, but at most half the context)."""
    return context_length - min(context_length // 2, max(ANSWER_RESERVE, max_new_tokens or 0))


def file_start(tok: Tokenizer, ids: list[int]) -> list[int]:
    """`ids` of text that starts a file, after <endoftext>: how a document starts in training."""
    return [tok.eot_id, *ids]


def stable_tail_start(prefix: str, keep: int = BUFFER_TAIL_CHARS) -> int:
    """Where the part of a long prefix that is read starts: 0 for a prefix of up to `keep` characters,
    else a multiple of `keep // 2`, so that the cut stays put while a person types."""
    step = keep // 2
    return max(0, len(prefix) - keep) // step * step


def assemble(tok: Tokenizer, fmt: str, prefix_ids: list[int], suffix_ids: list[int]) -> list[int]:
    """The token sequence up to where the middle starts."""
    if fmt == "psm":
        return [tok.fim_prefix_id, *prefix_ids, tok.fim_suffix_id, *suffix_ids, tok.fim_middle_id]
    if fmt == "spm":
        return [tok.fim_prefix_id, tok.fim_suffix_id, *suffix_ids, tok.fim_middle_id, *prefix_ids]
    if fmt == "plain":
        return list(prefix_ids)
    raise ValueError(f"unknown prompt format {fmt!r}; known: {FORMATS}")


def window_start(prefix: str, max_chars: int) -> int:
    """Where the prefix window starts: 0 if it fits, else the first line start after a point that only
    moves in jumps of half the window as the prefix grows (line_after), so the same start is kept across
    many keystrokes."""
    if len(prefix) <= max_chars:
        return 0
    step = max(1, max_chars // 2)
    overflow = len(prefix) - max_chars
    start = -(-overflow // step) * step  # round up to a multiple of step
    return line_after(prefix, start - 1, max(1, max_chars // 4))


def line_after(prefix: str, start: int, within: int) -> int:
    """The start of the first line that begins after `start` and at most `within` characters past it,
    else `start + within`: a line too long to skip whole (a base64 payload, a long array) is cut, so that
    the window does not lose everything above the cursor's line. Never the prefix's end."""
    newline = prefix.find("\n", max(0, start), start + within)
    return newline + 1 if 0 <= newline < len(prefix) - 1 else min(start + within, len(prefix) - 1)


def suffix_window(suffix: str, max_chars: int) -> str:
    """The first whole lines of the suffix that fit in max_chars."""
    if len(suffix) <= max_chars:
        return suffix
    cut = suffix.rfind("\n", 0, max_chars)
    return suffix[: cut + 1] if cut > 0 else suffix[:max_chars]


MAX_HEAL_TOKENS = 4  # a partial word is backed off whole up to this many tokens


def last_word_tokens(tok: Tokenizer, ids: list[int]) -> int:
    """How many tokens at the end of `ids` (1 to MAX_HEAL_TOKENS) hold the tokenizer's last pre-token
    (the word, number, punctuation run or blank run the text ends in). BPE merges only inside a
    pre-token, so these are the tokens that more typing may re-split; the ones before it stay."""
    tail = list(itertools.takewhile(lambda i: i not in tok.special_ids, reversed(ids[-MAX_HEAL_TOKENS:])))[::-1]
    text = ""
    while tail and not text:  # drop leading tokens that hold the end of a character split across tokens
        try:
            text = b"".join(tok.token_bytes[i] for i in tail).decode()
        except UnicodeDecodeError:
            tail = tail[1:]
    pre_tokenizer = tok.hf.pre_tokenizer
    if pre_tokenizer is None or not text:  # the last token is part of a character: back it off alone
        return 1
    word_start = len(text[: pre_tokenizer.pre_tokenize_str(text)[-1][1][0]].encode())
    n, end = 0, len(text.encode())
    for token in reversed(tail):  # the tokens that lie wholly at or after the word's start
        end -= len(tok.token_bytes[token])
        if end < word_start:
            break
        n += 1
    return max(1, n)


def heal_split(tok: Tokenizer, ids: list[int]) -> tuple[list[int], bytes]:
    """Back off the end of the text when it may be a partial token ("token healing"): the tokens of the
    word (the tokenizer's pre-token) the text ends in. BPE splits a word nobody finished oddly: "esa" of
    "esac" is " es" + "a", a pair the model never saw before "c", and "    ech" ends in " " + "ech"
    where "    echo" ends in " echo". The completion must then start with the backed-off bytes, so the
    model may pick the tokens the finished word is made of (or, after a newline and indentation, the
    usual split of "\n    echo" into "\n   " + " echo"). Backing off several tokens of a word follows
    Athiwaratkun et al., "Token Alignment via Character Matching for Subword Completion" (Findings of
    ACL 2024).

    Returns (the ids kept, the backed-off bytes); no bytes after a special token."""
    if not ids or ids[-1] in tok.special_ids:
        return ids, b""
    n = last_word_tokens(tok, ids)
    return ids[:-n], b"".join(tok.token_bytes[i] for i in ids[-n:])


def build_prompt(tok: Tokenizer, prefix: str, suffix: str = "", fmt: str = "spm", budget: int = 512,
                 heal: bool = True) -> Prompt:
    """A serving prompt of at most `budget` tokens for a cursor between prefix and suffix (of any length:
    only a stable tail of the prefix and the head of the suffix are read)."""
    if fmt == "plain":
        suffix = ""
    suffix_ids: list[int] = []
    if suffix:
        suffix_budget = int(budget * SUFFIX_SHARE)
        suffix_chars = int(suffix_budget * CHARS_PER_TOKEN_GUESS)
        suffix_ids = tok.encode(suffix_window(suffix[:SUFFIX_CHARS], suffix_chars))[:suffix_budget]
    overhead = len(assemble(tok, fmt, [], suffix_ids)) + (fmt == "plain")
    prefix_budget = max(1, budget - overhead)
    tail = stable_tail_start(prefix)
    start = tail + window_start(prefix[tail:], int(prefix_budget * CHARS_PER_TOKEN_GUESS))
    prefix_ids = tok.encode(prefix[start:])
    step = max(1, int(prefix_budget * CHARS_PER_TOKEN_GUESS) // 8)
    while len(prefix_ids) > prefix_budget:  # denser text than guessed: drop lines (or steps of a long one)
        start = line_after(prefix, start + 1, step) if start < len(prefix) - 1 else len(prefix)
        prefix_ids = tok.encode(prefix[start:])
    if fmt == "plain" and start == 0:
        prefix_ids = file_start(tok, prefix_ids)
    heal_bytes = b""
    if heal:
        prefix_ids, heal_bytes = heal_split(tok, prefix_ids)
    if fmt == "plain" and not prefix_ids:  # a budget under one word or character: read its last token whole
        prefix_ids, heal_bytes = tok.encode(prefix[-8:])[-1:] or [tok.eot_id], b""
    return Prompt(assemble(tok, fmt, prefix_ids, suffix_ids), heal_bytes)


# ------------------------------------------------------------------ context from other files

def format_context(chunks: list[ContextChunk]) -> str:
    """Chunks as shell text: grouped by file in the order the files first appear, each group introduced
    by `# <path>` and in line order, a blank line after each group."""
    groups: dict[str, list[ContextChunk]] = {}
    for chunk in chunks:
        groups.setdefault(chunk.path, []).append(chunk)
    parts = []
    for path, group in groups.items():
        body = "".join(c.text if c.text.endswith("\n") else c.text + "\n" for c in sorted(group, key=lambda c: c.line))
        parts.append(f"# {path}\n{body}\n")
    return "".join(parts)


def fit_context(tok: Tokenizer, ranked: list[ContextChunk], max_tokens: int) -> list[ContextChunk]:
    """The best-ranked chunks whose formatted text fits in `max_tokens`, in a stable order (files
    sorted by name, chunks by line), so the same chosen chunks always give the same text."""
    picked: list[ContextChunk] = []
    used = 0
    paths: set[str] = set()
    for chunk in ranked:
        cost = _token_count(tok, chunk.text) + 1 + (0 if chunk.path in paths else _token_count(tok, f"# {chunk.path}\n") + 1)
        if used + cost > max_tokens:
            continue
        picked.append(chunk)
        paths.add(chunk.path)
        used += cost
    picked.sort(key=lambda c: (c.path, c.line))
    while picked and len(encoded_context(tok, tuple(picked))) > max_tokens:  # the estimate was short
        picked.pop()
    return picked


# The same chunks come back keystroke after keystroke: their tokens are counted and encoded once.
@functools.lru_cache(maxsize=4096)
def _token_count(tok: Tokenizer, text: str) -> int:
    return len(tok.encode(text))


@functools.lru_cache(maxsize=64)
def encoded_context(tok: Tokenizer, chunks: tuple[ContextChunk, ...]) -> tuple[int, ...]:
    """The token ids of format_context(chunks)."""
    return tuple(tok.encode(format_context(list(chunks))))


def insert_context(tok: Tokenizer, fmt: str, ids: list[int], context_ids: list[int]) -> list[int]:
    """A prompt or training example (`assemble` order) with context ids placed where the prefix starts."""
    if not context_ids:
        return ids
    if fmt == "spm":
        at = ids.index(tok.fim_middle_id) + 1
    elif fmt == "psm":
        at = 1
    else:
        at = 1 if ids[:1] == [tok.eot_id] else 0
    return ids[:at] + context_ids + ids[at:]


def build_prompt_with_context(tok: Tokenizer, context: list[ContextChunk], prefix: str, suffix: str = "",
                              fmt: str = "spm", budget: int = 512, heal: bool = True,
                              share: float = CONTEXT_SHARE, min_share: float = CONTEXT_MIN_SHARE) -> Prompt:
    """build_prompt with context from other files before the prefix: the best-ranked `context` chunks
    that fit in the room the prefix and suffix leave (counted in steps of CONTEXT_STEP tokens, so it
    changes seldom while typing), at least `min_share` and at most `share` of the budget."""
    prompt = build_prompt(tok, prefix, suffix, fmt, budget, heal)
    room = (budget - len(prompt.ids)) // CONTEXT_STEP * CONTEXT_STEP
    limit = min(int(budget * share), max(room, int(budget * min_share)))
    chosen = fit_context(tok, context, limit) if context and limit >= CONTEXT_STEP else []
    if not chosen:
        return prompt
    ids = list(encoded_context(tok, tuple(chosen)))
    if len(ids) > budget - len(prompt.ids):  # taken from the prefix's room (min_share)
        prompt = build_prompt(tok, prefix, suffix, fmt, budget - len(ids), heal)
    prompt.ids = insert_context(tok, fmt, prompt.ids, ids)
    return prompt


# ------------------------------------------------------------------ line endings

def split_line_endings(prefix: str, suffix: str) -> tuple[str, str, str]:
    """(prefix, suffix, newline): the text around the cursor with LF line endings, which is what the
    model was trained on, and the document's own line ending ("\r\n" when most of its lines end so),
    in which an answer is given back (join_line_endings). A cursor between a `\r` and its `\n` counts
    as before the `\r`."""
    crlf = prefix.count("\r\n") + suffix.count("\r\n") + (prefix.endswith("\r") and suffix.startswith("\n"))
    if not crlf:
        return prefix, suffix, "\n"
    newline = "\r\n" if 2 * crlf > prefix.count("\n") + suffix.count("\n") else "\n"
    if prefix.endswith("\r") and suffix.startswith("\n"):
        prefix = prefix[:-1]
    return prefix.replace("\r\n", "\n"), suffix.replace("\r\n", "\n"), newline


def join_line_endings(text: str, newline: str) -> str:
    """An answer written with LF line endings, in the document's line ending."""
    return text.replace("\n", newline) if newline != "\n" else text


# ------------------------------------------------------------------ training examples

def fim_split_points(text: str, rng: random.Random, line_span_rate: float = 0.3) -> tuple[int, int]:
    """Character positions (a, b) of the middle span. A share of spans end at a newline (rest of the
    line or whole lines), which is how people complete shell; the rest are character-level."""
    n = len(text)
    a, b = sorted((rng.randint(0, n), rng.randint(0, n)))
    if rng.random() < line_span_rate:
        end = text.find("\n", max(a, b - 1))
        if end != -1:
            b = end + 1
    return a, b


def fim_training_pieces(text: str, rng: random.Random, fim_rate: float = 0.5,
                        spm_rate: float = 0.5) -> tuple[str | None, list[str]]:
    """How one training document is laid out, drawn from `rng`: (None, [text]) for a plain document,
    or ("psm" | "spm", [prefix, middle, suffix]) for a FIM-transformed one (probability fim_rate, half
    PSM and half SPM by default). The pieces are tokenised separately (fim_training_assemble)."""
    if not text or rng.random() >= fim_rate:
        return None, [text]
    a, b = fim_split_points(text, rng)
    fmt = "spm" if rng.random() < spm_rate else "psm"
    return fmt, [text[:a], text[a:b], text[b:]]


def fim_training_assemble(tok: Tokenizer, fmt: str | None, piece_ids: list[list[int]],
                          context_ids: list[int]) -> list[int]:
    """The ids of a training document laid out by fim_training_pieces, from the ids of its pieces,
    ending with <endoftext>; `context_ids` (format_context text of other files) go before the prefix,
    where serving puts them."""
    if fmt is None:
        return context_ids + piece_ids[0] + [tok.eot_id]
    prefix_ids, middle_ids, suffix_ids = piece_ids
    return insert_context(tok, fmt, assemble(tok, fmt, prefix_ids, suffix_ids), context_ids) + middle_ids + [tok.eot_id]


def fim_training_ids(tok: Tokenizer, text: str, rng: random.Random, fim_rate: float = 0.5,
                     spm_rate: float = 0.5, context: str = "") -> list[int]:
    """One training document (a chunk of a file) as ids, ending with <endoftext>; FIM-transformed with
    probability fim_rate, half PSM and half SPM by default. `context` (format_context text of other
    files) goes before the prefix, where serving puts it."""
    fmt, pieces = fim_training_pieces(text, rng, fim_rate, spm_rate)
    return fim_training_assemble(tok, fmt, tok.encode_batch(pieces), tok.encode(context) if context else [])
