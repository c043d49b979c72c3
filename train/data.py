"""Training data: documents -> chunks -> (FIM) token examples -> packed windows, deterministic per epoch.

A share of shell chunks get context from sibling files of their package before them (with_context),
in the prompt format serving uses (codellm.prompt.format_context).

An epoch is rebuilt from (seed, epoch) alone, so a resumed run regenerates exactly the windows it
was reading and skips to its batch.
"""
from __future__ import annotations

import posixpath
import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from codellm import crossfile
from codellm.prompt import CONTEXT_SHARE, fim_training_assemble, fim_training_pieces, fit_context, format_context
from codellm.tokenizer import Tokenizer

from .corpus import read_records

IGNORE = -1
CHARS_PER_TOKEN = 3.0  # chunk length in characters per token of context (shell ~3.2 bytes/token)


def read_texts_with_places(path, split: str | None = None) -> tuple[list[str], list[str]]:
    """Texts of a corpus file and their places ("source:/path in the package"), for context from sibling
    files (corpus.read_records reads them)."""
    records = list(read_records(path, split))
    return [r["text"] for r in records], [f"{r.get('source', '')}:/{r.get('path', '').lstrip('/')}" for r in records]


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Cut a document into pieces of at most max_chars, at line ends where possible."""
    chunks, start = [], 0
    while start < len(text):
        end = min(len(text), start + max_chars)
        if end < len(text):
            cut = text.rfind("\n", start + max_chars // 2, end)
            end = cut + 1 if cut != -1 else end
        chunks.append(text[start:end])
        start = end
    return chunks


@dataclass
class Mixture:
    """What one epoch reads: main documents, plus a share of other documents (English kept in stage 2)."""
    texts: list[str]
    fim_rate: float = 0.0
    extra_texts: list[str] | None = None
    extra_share: float = 0.0
    # with `paths` ("source:/path", one per text; "" for none), this share of the main documents' chunks
    # get context from files of the same package and folder before them, as serving shows it
    paths: list[str] | None = None
    context_rate: float = 0.0
    # comment-to-command scripts, drawn to make up this share of an epoch's characters
    pair_texts: list[str] | None = None
    pair_share: float = 0.0
    # which main documents come from user-style sources (is_user_style); drawn again until they make up
    # this share of the main documents' characters, when they are fewer
    user_style: list[bool] | None = None
    user_share: float = 0.0


USER_STYLE_KINDS = ("npm", "pypi", "user")  # sources of scripts as people write them, not distribution packages
# share of the shell characters from user-style sources, those drawn again when fewer: 0 trains on the
# corpus as it comes
USER_SHARE_IN_CODE_STAGE = 0.0
MAX_USER_SHARE = 0.9


def is_user_style(source: str) -> bool:
    """Whether a record source ("npm:NAME", "pypi:NAME", "user:FOLDER", "debian:NAME", ...) is user-style:
    the installers, entrypoints and CI scripts of npm and PyPI packages, and the user's own --code-data."""
    return source.split(":", 1)[0] in USER_STYLE_KINDS


MAX_SIBLINGS = 8  # sibling files whose definitions a training example's context is chosen from


def sourced_files(text: str, path: str, package: dict[str, str]) -> list[tuple[str, str]]:
    """The files of its package that the file at `path` sources (codellm.crossfile.read_sourced)."""
    return crossfile.read_sourced(text, path, package.get, ["/"]) if crossfile.SOURCE_LINE.search(text) else []


def folder_files(path: str, package: dict[str, str], folders: dict[str, list[str]],
                 rng: random.Random) -> list[tuple[str, str]]:
    """Up to MAX_SIBLINGS other files of the folder of `path`; `folders` lists the package's paths by
    folder (by_folder), so that a package of thousands of files is not scanned once per file."""
    siblings = [(p, package[p]) for p in folders[posixpath.dirname(path)] if p != path]
    return rng.sample(siblings, min(MAX_SIBLINGS, len(siblings)))


def by_folder(paths) -> dict[str, list[str]]:
    """The paths of a package grouped by folder, each group in the order given."""
    folders: dict[str, list[str]] = {}
    for path in paths:
        folders.setdefault(posixpath.dirname(path), []).append(path)
    return folders


def sibling_context(piece: str, path: str, files: list[tuple[str, str]], budget: int, tok: Tokenizer) -> str:
    """Context for a training chunk `piece` of the file at `path`: definitions from `files`, chosen and
    formatted as the server does (codellm.crossfile, codellm.prompt.format_context)."""
    chosen = fit_context(tok, crossfile.choose_context(piece, "", files, [], path), budget) if files else []
    return format_context(chosen) if chosen else ""


def build_epoch(tok: Tokenizer, mix: Mixture, context_length: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (inputs, targets) windows of shape (N, context_length) for one epoch."""
    rng = random.Random(f"{seed}:{epoch}")
    max_chars = int(context_length * CHARS_PER_TOKEN)
    chunks = [(c, mix.fim_rate) for t in mix.texts for c in chunk_text(t, max_chars)]
    contexts = with_context(tok, mix, context_length, seed, epoch) if mix.paths and mix.context_rate > 0 else []
    chunks += [(c, mix.fim_rate, context) for c, context in contexts]
    if mix.user_style and mix.user_share > 0:
        chunks += [(c, mix.fim_rate) for t in user_style_repeats(mix, rng) for c in chunk_text(t, max_chars)]
    if mix.pair_texts and mix.pair_share > 0:
        main_chars = sum(len(item[0]) for item in chunks)
        want = main_chars * mix.pair_share / (1 - mix.pair_share)
        chunks += [(c, mix.fim_rate) for t in drawn_to(mix.pair_texts, want, rng) for c in chunk_text(t, max_chars)]
    if mix.extra_texts and mix.extra_share > 0:
        extra = [c for t in mix.extra_texts for c in chunk_text(t, max_chars)]
        want = int(len(chunks) * mix.extra_share / (1 - mix.extra_share))
        chunks += [(c, 0.0) for c in rng.sample(extra, min(want, len(extra)))]
    rng.shuffle(chunks)
    layouts = [fim_training_pieces(item[0], rng, item[1]) for item in chunks]  # rng drawn in example order
    examples = []
    for start in range(0, len(chunks), ENCODE_BATCH):
        examples += encoded_examples(tok, chunks[start:start + ENCODE_BATCH], layouts[start:start + ENCODE_BATCH])
    return pack(examples, context_length, tok.eot_id)


ENCODE_BATCH = 4096  # examples tokenised per call: tokenizers spreads a call over its threads


def encoded_examples(tok: Tokenizer, chunks: list[tuple], layouts: list[tuple[str | None, list[str]]]) -> list[array]:
    """The ids of training examples (what fim_training_ids gives for each), with all their pieces and
    contexts tokenised in one call."""
    texts = []
    for item, (_fmt, pieces) in zip(chunks, layouts):
        texts += pieces
        texts.append(item[2] if len(item) > 2 else "")
    ids = tok.encode_batch(texts)
    examples, at = [], 0
    for fmt, pieces in layouts:
        n = len(pieces)
        # 4 bytes a token: an epoch of a 200 MB corpus as lists of Python ints took several GB
        examples.append(array("i", fim_training_assemble(tok, fmt, ids[at:at + n], ids[at + n])))
        at += n + 1
    return examples


def user_style_repeats(mix: Mixture, rng: random.Random) -> list[str]:
    """User-style documents drawn again (drawn_to) so that they make up `mix.user_share` of the main
    documents' characters; none when they already do or there are none."""
    user = [t for t, flag in zip(mix.texts, mix.user_style) if flag]
    user_chars = sum(map(len, user))
    other_chars = sum(map(len, mix.texts)) - user_chars
    want = mix.user_share * other_chars / (1 - mix.user_share) - user_chars
    return drawn_to(user, want, rng) if user and want > 0 else []


def drawn_to(texts: list[str], chars: float, rng: random.Random) -> list[str]:
    """Texts in shuffled rounds, each once per round, until they add up to `chars` characters."""
    texts = [t for t in texts if t]
    drawn, total = [], 0
    while texts and total < chars:
        for t in rng.sample(texts, len(texts)):
            if total >= chars:
                break
            drawn.append(t)
            total += len(t)
    return drawn


def with_context(tok: Tokenizer, mix: Mixture, context_length: int, seed: int, epoch: int) -> list[tuple[str, str]]:
    """(chunk, context) examples added to an epoch: a shorter chunk (room left for the context) with
    context from its siblings, for every main document that sources a file of its package (where
    serving's context matters most) and for a `context_rate` share of the others."""
    rng = random.Random(f"{seed}:{epoch}:context")
    budget = int(context_length * CONTEXT_SHARE)
    max_chars = int((context_length - budget) * CHARS_PER_TOKEN)
    packages: dict[str, dict[str, str]] = {}
    for text, place in zip(mix.texts, mix.paths):
        if place:
            source, path = place.split(":", 1)
            packages.setdefault(source, {})[path] = text
    folders = {source: by_folder(package) for source, package in packages.items()}
    examples = []
    for text, place in zip(mix.texts, mix.paths):
        if not place:
            continue
        source, path = place.split(":", 1)
        files = sourced_files(text, path, packages[source])
        if not files:
            if rng.random() >= mix.context_rate:
                continue
            files = folder_files(path, packages[source], folders[source], rng)
        pieces = chunk_text(text, max_chars)
        piece = pieces[rng.randrange(len(pieces))]
        context = sibling_context(piece, path, files, budget, tok)
        if context:
            examples.append((piece, context))
    return examples


def pack(examples: list[Sequence[int]], context_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill windows of context_length+1 tokens with whole examples; an example that does not fit starts
    the next window (a too-long one is cut); the leftover tail of a window is padding with no loss, and a
    window of fewer than 2 tokens is dropped. Returns (inputs, targets), each (windows, context_length)."""
    width = context_length + 1
    placed: list[tuple[int, int, int]] = []  # (example, window, offset) of every example kept
    row: list[tuple[int, int]] = []  # (example, offset) in the window being filled
    used = windows = 0
    for k, ex in enumerate(examples):
        n = min(len(ex), width)
        if used + n > width:
            if used >= 2:
                placed += [(i, windows, offset) for i, offset in row]
                windows += 1
            row, used = [], 0
        row.append((k, used))
        used += n
    if used >= 2:
        placed += [(i, windows, offset) for i, offset in row]
        windows += 1
    if not windows:
        raise ValueError("no training text: the corpus is empty")
    data = torch.full((windows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((windows, width), dtype=torch.bool)
    for k, window, offset in placed:
        ids = examples[k][:width]
        data[window, offset:offset + len(ids)] = torch.frombuffer(ids, dtype=torch.int32) \
            if isinstance(ids, array) and ids.itemsize == 4 else torch.as_tensor(list(ids), dtype=torch.long)
        mask[window, offset:offset + len(ids)] = True
    inputs, targets = data[:, :-1].contiguous(), data[:, 1:].clone()
    targets[~mask[:, 1:]] = IGNORE
    return inputs, targets
