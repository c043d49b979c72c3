"""Growing a trained model's depth for a stage: `codellm-train code --from BUNDLE --layers N`.

Block expansion (LLaMA Pro, Wu et al. 2024, arXiv:2401.02415): after the blocks of the trained model,
spread evenly, come copies of the block before them whose output projections (attention's `proj`,
the MLP's `down`) are zero. In a pre-norm residual network such a block adds nothing, so the grown
model computes exactly what the trained one did; training then gives the new blocks their own job,
with more parameters than the trained model had, without starting over from random weights.
"""
from __future__ import annotations

from codellm.config import PRESETS, ModelConfig
from codellm.model import GPT

# the projections whose output a block adds to the residual stream: zero in a new block
OUTPUT_PROJECTIONS = ("attn.proj.weight", "mlp.down.weight")


def expansion(old: int, new: int) -> list[tuple[int, bool]]:
    """(source block, is a new copy) for each block of a model grown from `old` to `new` blocks: every
    old block in its order, each followed by its share of the `new - old` copies (spread evenly, the
    last old block always followed by one; several where `new` > 2 * `old`). Raises ValueError where
    `new` < `old`."""
    if not 1 <= old <= new:
        raise ValueError(f"--layers {new}: a model can only grow, and this one has {old} layers")
    added = new - old
    order = []
    for i in range(old):
        order.append((i, False))
        order += [(i, True)] * ((i + 1) * added // old - i * added // old)
    return order


def preset_of(cfg: dict) -> str:
    """The name of the preset with this shape (its every field equal but the context length, which a
    preset takes as an override: `--model-size nano --context-length 512` is still nano), else "custom":
    a model grown into a preset's shape is rebuilt from scratch by that preset."""
    return next((name for name, shape in PRESETS.items()
                 if all(cfg[k] == v for k, v in shape.items() if k != "context_length")), "custom")


def grown(model: GPT, n_layer: int) -> GPT:
    """`model` with `n_layer` blocks (block expansion, see the module docstring): the same function,
    each new block a copy of the one before it with zero output projections. `model` itself is
    unchanged. Raises ValueError for fewer blocks than it has."""
    order = expansion(model.cfg.n_layer, n_layer)
    cfg = {**model.cfg.to_dict(), "n_layer": n_layer}
    cfg["preset"] = preset_of(cfg)
    bigger = GPT(ModelConfig.from_dict(cfg))
    old = model.state_dict()
    state = {k: v.clone() for k, v in old.items() if not k.startswith("blocks.")}
    for j, (i, copy) in enumerate(order):
        for name, tensor in old.items():
            if name.startswith(f"blocks.{i}."):
                part = name[len(f"blocks.{i}."):]
                zero = copy and part in OUTPUT_PROJECTIONS
                state[f"blocks.{j}.{part}"] = tensor.detach().clone().zero_() if zero else tensor.detach().clone()
    bigger.load_state_dict(state)
    return bigger.to(next(model.parameters()).device)
