"""Where each attention head looks: a model's attention maps for a prompt, and a PNG grid of them
(`codellm attention`)."""
from __future__ import annotations

import torch

from .model import GPT, apply_rope


@torch.no_grad()
def attention_maps(model: GPT, ids: list[int]) -> torch.Tensor:
    """Attention weights of every layer and head for one sequence: shape (layers, heads, T, T); each
    row (one query position) sums to 1 over the positions it may see."""
    model.eval()
    x = model.embed(torch.tensor([ids], device=model.embed.weight.device))
    T = x.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    maps = []
    for block in model.blocks:
        attn = block.attn
        h = block.attn_norm(x)
        q, k, v = attn.qkv(h).view(1, T, 3, attn.n_head, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(attn.q_norm(q), cos, sin), apply_rope(attn.k_norm(k), cos, sin)
        scores = (q @ k.transpose(-2, -1)) * attn.head_dim ** -0.5
        weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        maps.append(weights[0])
        y = (weights @ v).transpose(1, 2).reshape(1, T, -1)
        x = x + attn.proj(y)
        x = x + block.mlp(block.mlp_norm(x))
    return torch.stack(maps)


def plot_attention(maps: torch.Tensor, labels: list[str], out, layer: int | None = None,
                   head: int | None = None) -> tuple[int, int]:
    """A PNG grid of attention maps: one layer's heads (or every layer for one head, or one map).
    Returns the grid's (rows, columns). Raises ValueError where matplotlib is not installed."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ValueError("drawing attention maps needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, H = maps.shape[:2]
    layers = [layer] if layer is not None else list(range(L))
    heads = [head] if head is not None else list(range(H))
    if layer is None and head is None:
        layers = [L - 1]  # all heads of the last layer by default
    cells = [(l, h) for l in layers for h in heads]
    cols = min(4, len(cells))
    rows = -(-len(cells) // cols)
    size = max(3.0, 0.22 * len(labels))
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False, dpi=80)
    shown = [l.replace("\n", "\\n").replace("\t", "\\t") or "·" for l in labels]
    for ax in axes.flat:
        ax.axis("off")
    for ax, (l, h) in zip(axes.flat, cells):
        ax.axis("on")
        ax.imshow(maps[l, h].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {l} head {h}", fontsize=9)
        ax.set_xticks(range(len(shown)), shown, rotation=90, fontsize=7)
        ax.set_yticks(range(len(shown)), shown, fontsize=7)
        ax.set_xlabel("attends to (key)", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return rows, cols
