"""One-token decode step for inference, written for few kernel launches and few bytes of weights.

A decode step moves one token through the model: every tensor is tiny, so the time goes into launching
operations and into reading the weights, not into arithmetic. `Decoder` computes what
`GPT.forward(token, start=pos)` computes with about a fifth of the operations, from weights prepared once:

- each RMSNorm's weight is folded into the matrix that reads its output; the norm itself becomes one
  scalar per row, applied after the matrix product;
- the QK-norm weights and the attention scale are folded into per-position rotary tables;
- residual additions ride on `addmm`;
- optionally (`int8=True`) the matrices are stored as int8 with one scale per output row and multiplied
  with bf16 activations: a quarter of the bytes to read per token. The residual stream, norms, attention
  and KV cache stay fp32.

It reads and writes the model's own KV cache, so prefill (`GPT.forward`) and decode steps mix freely.
Rebuild it after the model's weights change.
"""
from __future__ import annotations

import torch

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


class Decoder:
    def __init__(self, model: GPT, int8: bool = False):
        cfg = model.cfg
        self.model = model
        self.int8 = int8
        self.eps = cfg.norm_eps
        self.d_model, self.n_head, self.head_dim = cfg.d_model, cfg.n_head, cfg.head_dim
        root_c = cfg.d_model ** 0.5
        with torch.no_grad():
            self.embed = model.embed.weight.detach()
            self.layers = []
            for block in model.blocks:
                attn, mlp = block.attn, block.mlp
                self.layers.append((
                    self._matrix(attn.qkv.weight, block.attn_norm.weight * root_c),
                    *self._rotary_tables(model, attn),
                    self._matrix(attn.proj.weight),
                    self._matrix(mlp.up.weight, block.mlp_norm.weight * root_c),
                    self._matrix(mlp.down.weight),
                ))
            self.lm_head = self._matrix(model.lm_head.weight, model.norm.weight * root_c)

    def _matrix(self, weight: torch.Tensor, input_scale: torch.Tensor | None = None):
        """`weight` (out, in), with `input_scale` folded into its columns, ready for `_project`."""
        weight = weight.detach().float()
        if input_scale is not None:
            weight = weight * input_scale.detach().float()
        if not self.int8:
            return weight.t().contiguous()  # (in, out) for mm / addmm
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        quantized = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        return quantized, scale.to(torch.bfloat16)

    def _project(self, x: torch.Tensor, matrix) -> torch.Tensor:
        if self.int8:
            return torch._weight_int8pack_mm(x.to(torch.bfloat16), *matrix)
        return torch.mm(x, matrix)

    def _add_projection(self, x: torch.Tensor, y: torch.Tensor, matrix) -> torch.Tensor:
        """x + y @ matrix"""
        if self.int8:
            return x + self._project(y, matrix)
        return torch.addmm(x, y, matrix)

    def _rotary_tables(self, model: GPT, attn) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position, for q and k stacked: cos and signed-sin tables with the QK-norm weights (and for
        q the attention scale) folded in, so that rope(qk_norm(x)) = u * cos + swap_halves(u) * sin where
        u = x / sqrt(sum(x²) + D·eps). Shapes (context, 2, 1, head_dim)."""
        D = self.head_dim
        cos, sin = model.rope_cos[:, None, None, :], model.rope_sin[:, None, None, :]
        ones = torch.ones(D, device=cos.device)
        if isinstance(attn.q_norm, RMSNorm):
            weight = torch.stack((attn.q_norm.weight.detach().float() * D ** -0.5,
                                  attn.k_norm.weight.detach().float())) * D ** 0.5
        else:  # no QK-norm: u is the raw q/k (the normalisation in `step` is skipped)
            weight = torch.stack((ones * D ** -0.5, ones))
        swapped = weight.roll(D // 2, dims=-1)
        return (cos * weight[None, :, None, :]).contiguous(), (sin * swapped[None, :, None, :]).contiguous()

    def _norm_scale(self, x: torch.Tensor) -> torch.Tensor:
        """1 / (sqrt(d_model) * rms(x)) for a (1, d_model) row: the folded weights carry sqrt(d_model)."""
        return torch.mm(x, x.t()).add_(self.d_model * self.eps).rsqrt_()

    def step(self, token: int, pos: int) -> torch.Tensor:
        """Logits (vocab,) for `token` at position `pos`; keys/values of positions < pos come from the cache."""
        H, D = self.n_head, self.head_dim
        qk_norm = self.model.cfg.qk_norm
        x = self.embed[token:token + 1]
        for (w_qkv, cos, sin, w_proj, w_up, w_down), block in zip(self.layers, self.model.blocks):
            qkv = (self._project(x, w_qkv) * self._norm_scale(x)).view(3, H, D)
            qk, v = qkv[:2], qkv[2]
            if qk_norm:
                qk = qk * torch.rsqrt(qk.square().sum(-1, keepdim=True).add_(D * self.eps))
            qk = torch.addcmul(qk * cos[pos], qk.view(2, H, 2, D // 2).flip(2).view(2, H, D), sin[pos])
            cache = block.attn.cache
            keys, values = cache.k[0], cache.v[0]  # (H, context, D)
            keys.select(1, pos).copy_(qk[1])
            values.select(1, pos).copy_(v)
            keys, values = keys[:, :pos + 1], values[:, :pos + 1]
            scores = torch.bmm(qk[0].view(H, 1, D), keys.transpose(1, 2))
            y = torch.bmm(torch.softmax(scores, dim=-1), values)
            x = self._add_projection(x, y.view(1, H * D), w_proj)
            hidden = (self._project(x, w_up) * self._norm_scale(x)).relu_().square_()
            x = self._add_projection(x, hidden, w_down)
        return (self._project(x, self.lm_head) * self._norm_scale(x))[0]
