"""Model configuration and named presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

DEFAULT_VOCAB = 8192


@dataclass
class ModelConfig:
    vocab_size: int = DEFAULT_VOCAB
    n_layer: int = 6
    n_head: int = 4
    d_model: int = 256
    context_length: int = 512
    mlp_ratio: int = 4
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = True
    tie_embeddings: bool = True
    preset: str = "custom"

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError("head dimension must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], "preset": name, **overrides})

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once), without building the model."""
        d, hidden = self.d_model, self.mlp_ratio * self.d_model
        per_layer = 4 * d * d + 2 * d * hidden + 2 * d + (2 * self.head_dim if self.qk_norm else 0)
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return embeddings + self.n_layer * per_layer + d


# test: for unit tests; nano: what a 2-core CPU can train in about an hour; tiny/small/medium: GPU sizes.
PRESETS: dict[str, dict] = {
    "test": dict(n_layer=2, n_head=2, d_model=64, context_length=256),
    "nano": dict(n_layer=6, n_head=4, d_model=256, context_length=512),
    "tiny": dict(n_layer=11, n_head=4, d_model=256, context_length=1024),
    "small": dict(n_layer=14, n_head=8, d_model=512, context_length=1024),
    "medium": dict(n_layer=12, n_head=16, d_model=1024, context_length=2048),
}
