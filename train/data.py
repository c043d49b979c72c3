"""Training data: documents -> chunks -> (FIM) token examples -> packed windows, deterministic per epoch.

An epoch is rebuilt from (seed, epoch) alone, so a resumed run regenerates exactly the windows it
was reading and skips to its batch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from codellm.prompt import fim_training_ids
from codellm.tokenizer import Tokenizer

IGNORE = -1
CHARS_PER_TOKEN = 3.0  # chunk length in characters per token of context (shell ~3.2 bytes/token)


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


def build_epoch(tok: Tokenizer, mix: Mixture, context_length: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (inputs, targets) windows of shape (N, context_length) for one epoch."""
    rng = random.Random(f"{seed}:{epoch}")
    max_chars = int(context_length * CHARS_PER_TOKEN)
    chunks = [(c, mix.fim_rate) for t in mix.texts for c in chunk_text(t, max_chars)]
    if mix.extra_texts and mix.extra_share > 0:
        extra = [c for t in mix.extra_texts for c in chunk_text(t, max_chars)]
        want = int(len(chunks) * mix.extra_share / (1 - mix.extra_share))
        chunks += [(c, 0.0) for c in rng.sample(extra, min(want, len(extra)))]
    rng.shuffle(chunks)
    examples = [fim_training_ids(tok, text, rng, fim_rate) for text, fim_rate in chunks]
    return pack(examples, context_length, tok.eot_id)


def pack(examples: list[list[int]], context_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill windows of context_length+1 tokens with whole examples; an example that does not fit starts
    the next window (a too-long one is cut); the leftover tail of a window is padding with no loss."""
    width = context_length + 1
    windows, masks = [], []
    row, row_mask = [], []
    for ex in examples:
        ex = ex[:width]
        if len(row) + len(ex) > width:
            if len(row) >= 2:
                windows.append(row + [pad_id] * (width - len(row)))
                masks.append(row_mask + [0] * (width - len(row)))
            row, row_mask = [], []
        row += ex
        row_mask += [1] * len(ex)
    if len(row) >= 2:
        windows.append(row + [pad_id] * (width - len(row)))
        masks.append(row_mask + [0] * (width - len(row)))
    if not windows:
        raise ValueError("no training text: the corpus is empty")
    data = torch.tensor(windows, dtype=torch.long)
    mask = torch.tensor(masks, dtype=torch.bool)
    inputs, targets = data[:, :-1].contiguous(), data[:, 1:].clone()
    targets[~mask[:, 1:]] = IGNORE
    return inputs, targets
