"""A small decoder-only transformer: pre-norm RMSNorm, rotary positions, QK-norm, ReLU² MLP, no biases.

One `forward(idx, cache, start)` serves training (no cache: full causal attention) and, as the reference
the fast inference path (codellm.decode) is tested against, cached inference (keys/values are written to
a codellm.kvcache.KVCache at positions start..).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .kvcache import KVCache


class Linear(nn.Linear):
    """nn.Linear without its own random init: GPT.reset_parameters sets every weight, and a loaded model
    gets its weights from the bundle (drawing numbers only to overwrite them cost a tenth of a second
    at each load)."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding without its own random init (as Linear)."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    """RMSNorm written out: on CPU this is several times faster per call than the library's composite
    kernel for the small tensors of a decode step, and it keeps the input's dtype under autocast."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_normalize(x, self.weight, self.eps)


def rms_normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)


def rope_tables(head_dim: int, max_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin per position, laid out so that rope(x) = x * cos + swap_halves(x) * sin."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D). Rotates pairs (x[i], x[i + D/2]) of each head."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.layer = layer  # where its keys and values go in a KVCache
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = Linear(cfg.d_model, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, mask, cache: KVCache | None, start: int):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        qk, v = qkv[:2], qkv[2]
        if isinstance(self.q_norm, RMSNorm):  # q and k normalised and rotated together: fewer ops per step
            weight = torch.stack((self.q_norm.weight, self.k_norm.weight)).view(2, 1, 1, 1, self.head_dim)
            qk = rms_normalize(qk, weight, self.q_norm.eps)
        q, k = apply_rope(qk, cos, sin).unbind(0)
        if cache is not None:
            k, v = cache.update(self.layer, start, k, v)
        if cache is not None and T == 1:  # one query: three plain ops beat the fused kernel's setup cost on CPU
            y = torch.softmax((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5, dim=-1) @ v
        else:  # mask None: the sequence starts at position 0, plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class ReluSquared(torch.autograd.Function):
    """relu(x)² with a one-operation backward (2·relu(x)·grad): the autograd of relu().square() takes
    several passes over the largest activations of a block."""

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r.square()

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return grad * r * 2


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.down = Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down(ReluSquared.apply(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, start):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """init: set the weights at random (GPT.reset_parameters); False leaves them unset, for a model whose
    every weight is loaded next (codellm.bundle checks that a bundle holds them all). Built under
    `torch.device("meta")` with init False, it holds shapes only and computes nothing."""

    def __init__(self, cfg: ModelConfig, init: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if torch.empty(0).is_meta:  # built for its shapes only (codellm.bundle): no values to compute
            cos = sin = torch.empty(cfg.context_length, cfg.head_dim)
        else:
            cos, sin = rope_tables(cfg.head_dim, cfg.context_length, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if init:
            self.reset_parameters()

    def reset_parameters(self):
        std = 0.5 / math.sqrt(self.cfg.d_model)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)
            elif name.endswith(("proj.weight", "down.weight")):
                nn.init.zeros_(p)  # each block starts as the identity
            else:
                nn.init.normal_(p, std=0.02 if name.startswith("embed") else std)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                hidden: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids idx (B, T). cache None: training over the whole sequence.
        With a cache (of batch B): the ids sit at positions start..start+T-1, their keys and values are
        written to the cache and they attend to those of the positions before. hidden: return the final
        normalised hidden states (B, T, d_model) instead of the logits (the training loss multiplies them
        by `lm_head` itself, a piece at a time). Raises ValueError past the context length."""
        T = idx.shape[1]
        offset = start if cache is not None else 0
        if offset + T > self.cfg.context_length:
            raise ValueError(f"sequence of {offset + T} tokens exceeds the context length {self.cfg.context_length}")
        cos, sin = self.rope_cos[offset:offset + T], self.rope_sin[offset:offset + T]
        mask = None
        if offset > 0 and T > 1:  # prefill after cached positions: causal within the new tokens
            key_pos = torch.arange(offset + T, device=idx.device)
            mask = key_pos[None, :] <= (offset + torch.arange(T, device=idx.device))[:, None]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache, offset)
        x = self.norm(x)
        return x if hidden else self.lm_head(x)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
