"""Inference over folded weights: decode steps written for few kernel launches and few bytes of weights,
and prompt reading that computes only the keys and values the cache needs.

A decode step moves one token (or a few, to check a guessed continuation) through the model: every
tensor is tiny, so the time goes into launching operations and reading weights, not into arithmetic.
`Decoder` computes what `GPT.forward(tokens, cache, start=pos)` computes with a fraction of the operations, from
weights prepared once:

- each RMSNorm's weight is folded into the matrix that reads its output; the norm itself becomes one
  scalar per row;
- the QK-norm weights and the attention scale are folded into per-position rotary tables;
- optionally (`int8=True`) the matrices are stored as int8 with one scale per output row and multiplied
  with bf16 activations: a quarter of the bytes to read per token. The residual stream, norms, attention
  and KV cache stay fp32.

The step is one TorchScript function (`decode_tokens`), so that the Python interpreter is out of the loop
between its ~200 operations; where scripting is unavailable it runs as plain Python, with the same result.
With int8 weights on CPU, the step runs as one C call where that is built (codellm.kernel).
Prompts (`Decoder.read`) go through the same folded matrices, in bf16 where the CPU has bf16 units.
Everything reads and writes the KVCache (codellm.kvcache) it is given, in the layout `GPT.forward` uses,
so `GPT.forward` can serve as the reference in tests. Rebuild the decoder after the model's weights change.
"""
from __future__ import annotations

import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F

from . import kernel
from .kvcache import KVCache
from .model import GPT, RMSNorm


def int8_matmul_available(device: torch.device) -> bool:
    """Whether this torch build multiplies bf16 rows by int8 weights on `device`."""
    try:
        w = torch.ones(8, 32, dtype=torch.int8, device=device)
        out = torch._weight_int8pack_mm(torch.ones(1, 32, dtype=torch.bfloat16, device=device), w,
                                        torch.ones(8, dtype=torch.bfloat16, device=device))
        return bool(out.float().eq(32).all())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def project(x: torch.Tensor, row_scale: Optional[torch.Tensor], matrices: List[torch.Tensor],
            scales: List[torch.Tensor], i: int) -> torch.Tensor:
    """(x * row_scale) @ matrix i; `scales` is empty for float matrices (in, out) and holds the per-row
    scales of int8 matrices (out, in)."""
    if row_scale is not None:
        x = x * row_scale
    if len(scales) == 0:
        return torch.mm(x, matrices[i])
    return torch._weight_int8pack_mm(x.to(torch.bfloat16), matrices[i], scales[i])


def norm_scale(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """(T, 1): 1 / sqrt(sum(x²) + eps) per row (the folded weights carry the norm's sqrt(d_model))."""
    T, C = x.shape
    return torch.baddbmm(eps, x.view(T, 1, C), x.view(T, C, 1)).rsqrt_().view(T, 1)


def decode_tokens(x: torch.Tensor, pos: int, matrices: List[torch.Tensor], scales: List[torch.Tensor],
                  rotary: List[torch.Tensor], caches: List[torch.Tensor], causal: torch.Tensor,
                  norm_eps: torch.Tensor, head_eps: torch.Tensor, n_head: int, qk_norm: bool) -> torch.Tensor:
    """Logits (T, vocab) for the embedded tokens x (T, d_model) at positions pos..pos+T-1.

    Per layer l: matrices[4l:4l+4] = qkv, proj, up, down; rotary[2l:2l+2] = cos, sin tables (context, 2, 1,
    head_dim); caches[2l:2l+2] = keys, values (n_head, context, head_dim). The last matrix is the lm_head."""
    T, C = x.shape
    H = n_head
    D = C // H
    end = pos + T
    for layer in range(len(caches) // 2):
        qkv = project(x, norm_scale(x, norm_eps), matrices, scales, 4 * layer).float().view(T, 3, H, D)
        qk, v = qkv[:, :2], qkv[:, 2]
        swapped = qk.reshape(T, 2, H, 2, D // 2).flip(3).view(T, 2, H, D)
        qk = torch.addcmul(qk * rotary[2 * layer][pos:end], swapped, rotary[2 * layer + 1][pos:end])
        if qk_norm:  # rope(u * r) = rope(u) * r: the norm's scalar goes on after the rotation
            qk = qk * norm_scale(qkv[:, :2].reshape(T * 2 * H, D), head_eps).view(T, 2, H, 1)
        keys, values = caches[2 * layer], caches[2 * layer + 1]
        keys[:, pos:end] = qk[:, 1].transpose(0, 1)
        values[:, pos:end] = v.transpose(0, 1)
        scores = torch.baddbmm(causal[pos:end, :end], qk[:, 0].transpose(0, 1), keys[:, :end].transpose(1, 2))
        y = torch.bmm(torch.softmax(scores, dim=-1), values[:, :end]).transpose(0, 1).reshape(T, C)
        x = x + project(y, None, matrices, scales, 4 * layer + 1)
        hidden = project(x, norm_scale(x, norm_eps), matrices, scales, 4 * layer + 2).relu_().square_()
        x = x + project(hidden, None, matrices, scales, 4 * layer + 3)
    return project(x, norm_scale(x, norm_eps), matrices, scales, len(matrices) - 1).float()


_scripted = None
FEW_TOKENS = 8  # up to this many tokens, a decode call reads them faster than the prompt path (PyTorch step)


def compiled_decode_tokens():
    """`decode_tokens` compiled by TorchScript, or the Python function where that is unavailable."""
    global _scripted
    if _scripted is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                _scripted = torch.jit.script(decode_tokens)
        except Exception:  # noqa: BLE001 - any failure to compile leaves the same code running as Python
            _scripted = decode_tokens
    return _scripted


class Decoder:
    """Decode steps (`run`, `step`) and prompt reading (`read`) over folded weights.

    int8: decode steps multiply by int8 weights (CPU). prompt_dtype: the dtype of the matrices that read
    prompts (bf16 where the CPU has bf16 matrix units); activations between them stay float32.
    use_kernel: with int8 weights on CPU, decode steps run as one C call where that is built."""

    def __init__(self, model: GPT, int8: bool = False, script: bool = True,
                 prompt_dtype: torch.dtype = torch.float32, use_kernel: bool = True):
        cfg = model.cfg
        self.model = model
        self.int8 = int8
        self.prompt_dtype = prompt_dtype
        root_c = cfg.d_model ** 0.5
        self.matrices: list[torch.Tensor] = []
        self.scales: list[torch.Tensor] = []
        self.prompt_matrices: list[torch.Tensor] = []
        self.rotary: list[torch.Tensor] = []
        with torch.no_grad():
            self.embed = model.embed.weight.detach()
            for block in model.blocks:
                attn, mlp = block.attn, block.mlp
                self._add_matrix(attn.qkv.weight, block.attn_norm.weight * root_c)
                self._add_matrix(attn.proj.weight)
                self._add_matrix(mlp.up.weight, block.mlp_norm.weight * root_c)
                self._add_matrix(mlp.down.weight)
                self.rotary += self._rotary_tables(model, attn)
            self._add_matrix(model.lm_head.weight, model.norm.weight * root_c)
        self.prompt_rotary = [table.to(prompt_dtype) for table in self.rotary]
        device = self.embed.device
        context = cfg.context_length
        self.causal = torch.full((context, context), float("-inf"), device=device).triu_(1)
        self.norm_eps = torch.full((1, 1, 1), cfg.d_model * cfg.norm_eps, device=device)
        self.head_eps = torch.full((1, 1, 1), cfg.head_dim * cfg.norm_eps, device=device)
        self.run_layers = compiled_decode_tokens() if script else decode_tokens
        self.c_step = None
        if use_kernel and int8 and device.type == "cpu" and kernel.available():
            try:
                self.c_step = kernel.KernelStep(self)
            except ValueError:  # a model shape the C step does not take: the PyTorch step serves
                pass
        # up to this many tokens, prompts are read by a decode call (the C step: all it takes in one call)
        self.few_tokens = kernel.MAX_TOKENS if self.c_step is not None else FEW_TOKENS

    def _add_matrix(self, weight: torch.Tensor, input_scale: torch.Tensor | None = None):
        """`weight` (out, in), with `input_scale` folded into its columns, stored for `project`."""
        weight = weight.detach().float()
        if input_scale is not None:
            weight = weight * input_scale.detach().float()
        transposed = weight.t().contiguous()  # (in, out) for mm
        self.prompt_matrices.append(transposed.to(self.prompt_dtype))  # the same tensor in float32
        if not self.int8:
            self.matrices.append(transposed)
            return
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.matrices.append(torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.scales.append(scale.to(torch.bfloat16))

    def _rotary_tables(self, model: GPT, attn) -> list[torch.Tensor]:
        """Per position, for q and k stacked: cos and signed-sin tables with the QK-norm weights (and for
        q the attention scale) folded in, so that rope(qk_norm(x)) = rope'(x) * r where
        rope'(x) = x * cos + swap_halves(x) * sin and r = 1 / sqrt(sum(x²) + D·eps).
        Shapes (context, 2, 1, head_dim)."""
        D = model.cfg.head_dim
        cos, sin = model.rope_cos[:, None, None, :], model.rope_sin[:, None, None, :]
        ones = torch.ones(D, device=cos.device)
        if isinstance(attn.q_norm, RMSNorm):
            weight = torch.stack((attn.q_norm.weight.detach().float() * D ** -0.5,
                                  attn.k_norm.weight.detach().float())) * D ** 0.5
        else:  # no QK-norm: q and k are used as they come
            weight = torch.stack((ones * D ** -0.5, ones))
        swapped = weight.roll(D // 2, dims=-1)
        return [(cos * weight[None, :, None, :]).contiguous(), (sin * swapped[None, :, None, :]).contiguous()]

    def run(self, tokens: list[int], pos: int, cache: KVCache) -> torch.Tensor:
        """Logits (len(tokens), vocab) for `tokens` at positions pos, pos+1, ...; keys/values of positions
        < pos come from `cache`, and those of `tokens` are written to it (its ids are the caller's to
        record)."""
        if self.c_step is not None and len(tokens) <= kernel.MAX_TOKENS:
            return self.c_step.run(tokens, pos, cache)
        x = self.embed[torch.tensor(tokens, device=self.embed.device)]
        return self.run_layers(x, pos, self.matrices, self.scales, self.rotary, cache.layers, self.causal,
                               self.norm_eps, self.head_eps, self.model.cfg.n_head, self.model.cfg.qk_norm)

    @property
    def step_name(self) -> str:
        """How decode steps run here: "C (<vector instructions>)", "TorchScript" or "Python"."""
        if self.c_step is not None:
            return f"C ({kernel.instructions()})"
        return "Python" if self.run_layers is decode_tokens else "TorchScript"

    def step(self, token: int, pos: int, cache: KVCache) -> torch.Tensor:
        """Logits (vocab,) for `token` at position `pos`."""
        return self.run([token], pos, cache)[0]

    def read(self, tokens: list[int], pos: int, cache: KVCache) -> None:
        """Write the keys and values of `tokens` at positions pos, pos+1, ... to `cache` (a prompt read
        before its last token goes through `step`). Nothing after the last layer's keys and values is
        computed: the logits of these positions are not wanted. A few tokens go through decode steps, which
        cost less than the prompt path's set-up for them."""
        if len(tokens) <= self.few_tokens:
            self.run(tokens, pos, cache)
            return
        C, H, D = self.model.cfg.d_model, self.model.cfg.n_head, self.model.cfg.head_dim
        T, end = len(tokens), pos + len(tokens)
        dtype = self.prompt_dtype
        x = self.embed[torch.tensor(tokens, device=self.embed.device)]
        for layer in range(len(self.model.blocks)):
            w_qkv, w_proj, w_up, w_down = self.prompt_matrices[4 * layer:4 * layer + 4]
            qkv = torch.mm((x * norm_scale(x, self.norm_eps)).to(dtype), w_qkv).view(T, 3, H, D)
            qk, v = qkv[:, :2], qkv[:, 2]  # rotated in the matrices' dtype: bf16 halves the bytes to move
            swapped = torch.cat((qk[..., D // 2:], qk[..., :D // 2]), dim=-1)
            cos, sin = self.prompt_rotary[2 * layer][pos:end], self.prompt_rotary[2 * layer + 1][pos:end]
            rotated = torch.addcmul(qk * cos, swapped, sin)
            if self.model.cfg.qk_norm:
                r = norm_scale(qk.float().reshape(T * 2 * H, D), self.head_eps)
                rotated.mul_(r.view(T, 2, H, 1).to(dtype))
            cache.k[layer, 0, :, pos:end] = rotated[:, 1].transpose(0, 1)
            cache.v[layer, 0, :, pos:end] = v.transpose(0, 1)
            if layer == len(self.model.blocks) - 1:
                break  # the last layer's keys and values are all that is wanted of it
            q = rotated[:, 0].transpose(0, 1)[None]
            if pos == 0:
                keys, values = rotated[:, 1].transpose(0, 1)[None], v.transpose(0, 1)[None]
                y = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=1.0)
            else:
                keys, values = cache.k[layer, :, :, :end].to(dtype), cache.v[layer, :, :, :end].to(dtype)
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.causal[pos:end, :end].to(dtype),
                                                   scale=1.0)
            x = x + torch.mm(y[0].transpose(0, 1).reshape(T, C), w_proj)
            hidden = torch.mm((x * norm_scale(x, self.norm_eps)).to(dtype), w_up).relu_().square_()
            x = x + torch.mm(hidden, w_down)
