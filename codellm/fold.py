"""A bundle's weights folded into the C decode step's start file with NumPy, without torch.

The start file (codellm.kernel_engine) holds what the C step reads: the embedding, every matrix with its
norm weights folded into its columns, quantised to int8 per row and packed in blocks of rows, and the
rotary tables with the QK-norm weights folded in. Here it is computed from model.safetensors with the
same float32 operations as codellm.decode.Decoder (the int8 weights and scales come out identical), so
that the very first start of a bundle answers without waiting for `import torch` (1.5-2 s).
"""
from __future__ import annotations

import json

import numpy as np

from .bundle_files import SCALE_SUFFIX, quantised_fault
from .config import ModelConfig
from .kernel import BLOCK, START_FORMAT

STORED = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8"), "BF16": np.dtype("<u2"),
          "I8": np.dtype("i1")}


def read_weights(data: bytes, config: ModelConfig) -> dict[str, np.ndarray]:
    """The float32 tensors, by name, of model.safetensors bytes whose header agrees with `config`
    (codellm.bundle_files.check_weights_header, which read_bundle_files runs). Read by the safetensors
    library, as codellm.bundle reads them (int8 matrices times their row scales, as
    codellm.bundle.dequantise_rows computes them): raises safetensors.SafetensorError for a header it
    refuses, and ValueError for a weight that is not finite."""
    from safetensors import deserialize

    stored = {}
    for name, tensor in deserialize(data):
        raw = np.frombuffer(tensor["data"], STORED[tensor["dtype"]])
        # bfloat16 is the top half of a float32
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, by name
            values = (raw.astype(np.uint32) << 16).view(np.float32) if tensor["dtype"] == "BF16" else raw.astype(np.float32)
        stored[name] = (values.reshape(tensor["shape"]), tensor["dtype"] == "I8")
    weights = {}
    for name, (values, int8) in stored.items():
        if name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in stored:
            continue
        scale = stored[name + SCALE_SUFFIX][0] if int8 else None
        fault = int8 and values.size and quantised_fault(int(values.min()), float(scale.min()))
        if fault:
            raise ValueError(f"int8 tensor {name} {fault}")
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below, by name
            weights[name] = values * scale[:, None] if int8 else values
        if not np.isfinite(weights[name]).all():
            raise ValueError(f"tensor {name} holds NaN or infinite values")
    return weights


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 rounded to the nearest bfloat16 (ties to even), as float32 again."""
    bits = x.astype(np.float32).view(np.uint32)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


def int8_rows(weight: np.ndarray, input_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`weight` (rows, in) with `input_scale` (in,) folded into its columns, quantised per row:
    (int8 packed as pack_rows lays it out, float32 scales (rows,) rounded through bfloat16)."""
    if input_scale is not None:
        weight = weight * input_scale
    scale = np.maximum(np.abs(weight).max(axis=1), np.float32(1e-12)) / np.float32(127)
    quantised = np.clip(np.rint(weight / scale[:, None]), -127, 127).astype(np.int8)
    return pack_rows(quantised), to_bfloat16(scale)


def pack_rows(weight: np.ndarray) -> np.ndarray:
    """int8 (rows, in) -> (blocks, in, BLOCK): the weights of BLOCK consecutive rows side by side for each
    input, rows padded with zeros to a multiple of BLOCK."""
    rows, columns = weight.shape
    padded = np.zeros((rows + -rows % BLOCK, columns), np.int8)
    padded[:rows] = weight
    return np.ascontiguousarray(padded.reshape(-1, BLOCK, columns).transpose(0, 2, 1))


def rope_tables(head_dim: int, context: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and signed sin (context, head_dim) as codellm.model.rope_tables lays them out; the float32
    angles' cos and sin are taken in float64 and rounded (torch's float32 ones may differ by an ulp)."""
    inv_freq = (np.float32(1.0) / (np.float64(base) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                                        / np.float32(head_dim))).astype(np.float32))
    angles = np.outer(np.arange(context, dtype=np.float32), inv_freq).astype(np.float64)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    return np.concatenate((cos, cos), axis=-1), np.concatenate((-sin, sin), axis=-1)


def rotary_tables(config: ModelConfig, weights: dict, layer: int, cos: np.ndarray, sin: np.ndarray) -> list:
    """The two tables (context, 2, 1, head_dim) of a layer, for q and k stacked, with the QK-norm weights
    (and for q the attention scale) folded in, as codellm.decode.Decoder._rotary_tables computes them."""
    D = config.head_dim
    if config.qk_norm:
        q, k = (weights[f"blocks.{layer}.attn.{name}_norm.weight"] for name in "qk")
        weight = np.stack((q * np.float32(D ** -0.5), k)) * np.float32(D ** 0.5)
    else:
        weight = np.stack((np.full(D, D ** -0.5, np.float32), np.ones(D, np.float32)))
    swapped = np.roll(weight, D // 2, axis=-1)
    return [np.ascontiguousarray(cos[:, None, None, :] * weight[None, :, None, :]),
            np.ascontiguousarray(sin[:, None, None, :] * swapped[None, :, None, :])]


def fold(data: bytes, config: ModelConfig, digest: str) -> bytes:
    """The start file's bytes (safetensors) of the bundle whose model.safetensors bytes are `data` and
    whose content digest is `digest` (its header checked: read_weights). Raises ValueError for a weight
    that is not finite."""
    from safetensors.numpy import save

    weights = read_weights(data, config)
    root_c = np.float32(config.d_model ** 0.5)
    matrices = []
    for i in range(config.n_layer):
        w = {name: weights[f"blocks.{i}.{name}.weight"] for name in
             ("attn.qkv", "attn.proj", "attn_norm", "mlp.up", "mlp.down", "mlp_norm")}
        matrices += [int8_rows(w["attn.qkv"], w["attn_norm"] * root_c), int8_rows(w["attn.proj"]),
                     int8_rows(w["mlp.up"], w["mlp_norm"] * root_c), int8_rows(w["mlp.down"])]
    head = weights["embed.weight" if config.tie_embeddings else "lm_head.weight"]
    matrices.append(int8_rows(head, weights["norm.weight"] * root_c))
    tensors = {"embed": np.ascontiguousarray(weights["embed.weight"])}
    for i, (weight, scale) in enumerate(matrices):
        tensors[f"matrix.{i}.weight"], tensors[f"matrix.{i}.scale"] = weight, scale
    cos, sin = rope_tables(config.head_dim, config.context_length, config.rope_base)
    for layer in range(config.n_layer):
        tensors[f"rotary.{2 * layer}"], tensors[f"rotary.{2 * layer + 1}"] = rotary_tables(config, weights, layer, cos, sin)
    sizes = (config.n_layer, config.n_head, config.d_model, config.mlp_ratio * config.d_model, config.vocab_size,
             config.context_length, int(config.qk_norm))
    meta = {"format": START_FORMAT, "digest": digest, "sizes": json.dumps(sizes),
            "eps": json.dumps((config.d_model * config.norm_eps, config.head_dim * config.norm_eps)),
            "parameters": str(config.num_params())}
    return save(tensors, metadata=meta)
