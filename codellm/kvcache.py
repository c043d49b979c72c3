"""The KV cache: the keys and values of the tokens a model has read, and which tokens those are.

One object owns the storage, the token ids whose keys and values it holds and so the position where
the next token goes. The model's cached forward (`GPT.forward(idx, cache, start)`), the decoder's
prompt reading and decode steps (codellm.decode) and the C step (codellm.kernel) write keys and values
into it at the positions they are given; the engine records the ids it wrote (`append`) and, for a
new request, keeps the longest prefix the request shares with what is cached (`reuse`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """How many leading items `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class TokenCache:
    """Which tokens a KV cache holds: `ids`, the token ids of the one sequence the engine serves whose keys
    and values sit at positions 0..len(ids)-1; `position` = len(ids) is where the next token goes. Keys
    and values past `position` are stale and get overwritten. The storage is a subclass's (no torch here:
    codellm.kernel_engine keeps its keys and values in a plain buffer)."""

    def __init__(self):
        self.ids: list[int] = []

    @property
    def position(self) -> int:
        """Where the next token's keys and values go: the number of cached tokens."""
        return len(self.ids)

    def reuse(self, ids: list[int]) -> int:
        """Keep the longest start of `ids` whose keys and values are cached and forget the rest; returns
        how many tokens that is (the caller computes ids[returned:] only)."""
        reused = common_prefix_len(self.ids, ids)
        del self.ids[reused:]
        return reused

    def reset(self) -> None:
        """Forget every cached token (the storage stays allocated and is overwritten)."""
        self.ids = []

    def append(self, ids: list[int]) -> None:
        """Record that the keys and values of `ids` were written at positions position, position+1, ..."""
        self.ids += ids

    def truncate(self, length: int) -> None:
        """Forget the tokens at positions `length` and after (a rejected guess, a window moved)."""
        del self.ids[length:]


class KVCache(TokenCache):
    """Preallocated keys and values for positions 0..max_len-1: k, v tensors (n_layer, batch, n_head,
    max_len, head_dim), float32 unless `dtype` says otherwise."""

    def __init__(self, n_layer: int, n_head: int, max_len: int, head_dim: int, batch: int = 1,
                 dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
        import torch

        super().__init__()
        dtype = dtype or torch.float32
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # keys then values of each layer for sequence 0, each (n_head, max_len, head_dim): what a decode step
        # takes; views made once, not on every step
        self.layers = [t for layer in range(n_layer) for t in (self.k[layer, 0], self.v[layer, 0])]

    @classmethod
    def for_model(cls, model, batch: int = 1, max_len: int | None = None) -> "KVCache":
        """A cache for `model` (a codellm.model.GPT) in its weights' dtype and device; max_len defaults
        to the context length."""
        cfg, weight = model.cfg, model.embed.weight
        return cls(cfg.n_layer, cfg.n_head, max_len or cfg.context_length, cfg.head_dim, batch,
                   weight.dtype, weight.device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys and values k, v (batch, n_head, T, head_dim) of `layer` at positions start..start+T-1;
        returns that layer's keys and values of positions 0..start+T-1. Raises ValueError past max_len."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"positions up to {end} do not fit a KV cache of {self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
