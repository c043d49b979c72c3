"""The training loss: cross-entropy of the next token, computed from the final hidden states in chunks of
rows, so the (tokens x vocab) logits never exist whole in float32.

With an 8k vocabulary the logits are the largest tensors of a step; `F.cross_entropy(logits.float())`
streams them through memory several times (upcast, log-softmax, its backward, the one-hot fill). Here
each chunk of rows is multiplied out, turned into its loss and its gradient (softmax minus one-hot)
while it is still in cache, and only that gradient is kept for the backward pass, which is then two
matrix products.
"""
from __future__ import annotations

import torch

from .data import IGNORE

CHUNK_ROWS = 128


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), rows whose target is IGNORE left out.
    Matrix products run in the autocast dtype when autocast is on; softmax and the loss in float32."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
        w = weight.to(dtype)
        t = targets.reshape(-1)
        logit_grads = torch.empty((h.shape[0], w.shape[0]), dtype=dtype, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(device, enabled=False):
            for start in range(0, h.shape[0], CHUNK_ROWS):
                rows = slice(start, start + CHUNK_ROWS)
                logits = (h[rows] @ w.t()).float()
                chunk_targets = t[rows]
                valid = (chunk_targets != IGNORE).to(torch.float32)
                index = chunk_targets.clamp(min=0)[:, None]
                log_total = torch.logsumexp(logits, dim=-1)
                total += ((log_total - logits.gather(1, index)[:, 0]) * valid).sum()
                probs = logits.sub_(log_total[:, None]).exp_()
                probs.scatter_add_(1, index, -valid[:, None]).mul_(valid[:, None])
                logit_grads[rows] = probs
        ctx.save_for_backward(h, w, logit_grads)
        ctx.dtypes, ctx.hidden_shape = (hidden.dtype, weight.dtype), hidden.shape
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        h, w, logit_grads = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        scale = grad_total.float()
        grad_hidden = (logit_grads @ w).float().mul_(scale)
        grad_weight = (logit_grads.t() @ h).float().mul_(scale)
        return grad_hidden.to(hidden_dtype).view(ctx.hidden_shape), grad_weight.to(weight_dtype), None


def next_token_loss(model, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                    forward=None) -> torch.Tensor:
    """Cross-entropy of `targets` given `inputs` (IGNORE targets left out): "mean" per counted target
    or "sum". forward: what to call for the hidden states if not `model` itself (a DDP wrapper, a
    compiled module)."""
    hidden = (model if forward is None else forward)(inputs, hidden=True)
    total = LinearCrossEntropy.apply(hidden, model.lm_head.weight, targets)
    if reduction == "sum":
        return total
    return total / (targets != IGNORE).sum().clamp(min=1)
