"""The decode step as one C call on CPU (codellm/_decode_kernel.c), for decoders with int8 weights.

The PyTorch step (codellm.decode.decode_tokens) launches ~200 operations on tensors of a few hundred
numbers; on CPU that costs more than its arithmetic. The C step computes the same thing from the same
folded weights, tables and KV cache in one call: about a third of the time per token. It is built when
codellm is installed where a C compiler with OpenMP is found (setup.py); without it, decoding runs
through PyTorch as before.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with the engine: this module is read without it too (codellm.kernel_engine)
    import torch

    from .kvcache import KVCache

try:
    from . import _decode_kernel
except ImportError:  # not built: no C compiler at install time, or a platform it does not build on
    _decode_kernel = None

MAX_TOKENS = 16  # tokens per call (the C side's limit)
# Decode steps of a model with fewer weights than this run on one thread, with no OpenMP team: the
# matrices of a step are too small for the split to pay (measured with `codellm bench --background`),
# and a team whose threads wait for each other falls apart when another process holds a core.
ONE_THREAD_BELOW = 16_000_000
BLOCK = 16  # matrix rows per packed block (the C side's layout)
START_FORMAT = "1"  # the layout of the start file codellm.fold writes; codellm.kernel_engine reads no other
# the variant of the int8 products picked for this CPU when the module loaded
LOADED_INSTRUCTIONS = _decode_kernel.instructions() if _decode_kernel else None


def built() -> bool:
    return _decode_kernel is not None


def available() -> bool:
    """Whether decode steps run as C here: built, and this CPU has AVX2 or AVX-512 (the plain C version,
    kept as the reference the vector ones are tested against, is slower than the PyTorch step)."""
    return built() and LOADED_INSTRUCTIONS != "plain C"


def instructions() -> str:
    """The vector instructions the C step's int8 products use on this CPU, or why there is no C step."""
    return _decode_kernel.instructions() if _decode_kernel else "not built"


def cpu_decoding() -> str:
    """How `precision="auto"` decodes on this CPU, in words."""
    if available():
        return f"C step ({LOADED_INSTRUCTIONS})"
    why = "needs AVX2 or AVX-512" if built() else "not built: no C compiler with OpenMP at install"
    return f"PyTorch (C step {why})"


class KernelStep:
    """`run(tokens, pos, cache)` for a `codellm.decode.Decoder` with int8 weights on CPU. Holds the packed weights
    and the tensors whose addresses the C side uses, so that they live as long as it does."""

    def __init__(self, decoder):
        import torch

        from .fold import pack_rows

        if not built():
            raise RuntimeError("the C decode step is not built (a C compiler with OpenMP is needed at install)")
        model, cfg = decoder.model, decoder.model.cfg
        self.model = model
        self.vocab_size = cfg.vocab_size
        self.embed = decoder.embed.float().contiguous()
        self.matrices = [(torch.from_numpy(pack_rows(weight.numpy())), scale.float().contiguous())
                         for weight, scale in zip(decoder.matrices, decoder.scales)]
        self.rotary = [table.contiguous() for table in decoder.rotary]
        C, D = cfg.d_model, cfg.head_dim
        if self.embed.shape != (cfg.vocab_size, C) or any(t.shape != (cfg.context_length, 2, 1, D) for t in self.rotary):
            raise ValueError("the C decode step needs the embedding and rotary tables in the decoder's layout")
        self._sizes = (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.mlp_ratio * cfg.d_model, cfg.vocab_size,
                       cfg.context_length, int(cfg.qk_norm))
        self._eps = (cfg.d_model * cfg.norm_eps, cfg.head_dim * cfg.norm_eps)
        self.caches: list[torch.Tensor] = []
        self._model = None
        # the OpenMP team of a decode call: 1 for small models, else 0 (the threads PyTorch was given)
        self.threads = 1 if sum(weight.numel() for weight, _ in self.matrices) < ONE_THREAD_BELOW else 0

    def _bind_cache(self, cache: KVCache):
        """Point the C side at the storage of `cache` (the one it last ran on, until another comes)."""
        import torch

        cfg = self.model.cfg
        want = (cfg.n_layer, 1, cfg.n_head, cfg.context_length, cfg.head_dim)
        for c in (cache.k, cache.v):
            if c.dtype != torch.float32 or c.device.type != "cpu" or c.shape != want or not c.is_contiguous():
                raise ValueError("the C decode step needs a contiguous float32 CPU KV cache of batch 1 "
                                 "and the model's context length")
        caches = cache.layers
        shapes = [(weight.data_ptr(), scale.data_ptr(), scale.numel(), weight.shape[1])
                  for weight, scale in self.matrices]
        self._model = _decode_kernel.new_model(
            self._sizes, self._eps, self.embed.data_ptr(), shapes, [t.data_ptr() for t in self.rotary],
            [c.data_ptr() for c in caches])
        self.caches = caches

    def run(self, tokens: list[int], pos: int, cache: KVCache) -> torch.Tensor:
        """Logits (len(tokens), vocab) for `tokens` at positions pos, pos+1, ...; keys/values of positions
        < pos come from `cache`, and those of `tokens` are written to it. Raises ValueError for a cache
        of another layout, tokens outside the vocabulary or positions outside the context."""
        import torch

        if not self.caches or cache.k.data_ptr() != self.caches[0].data_ptr():
            self._bind_cache(cache)
        logits = torch.empty(len(tokens), self.vocab_size)
        _decode_kernel.decode(self._model, tokens, pos, logits.data_ptr(), self.threads)
        return logits
