"""Model configuration and named presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# the engine's precisions (codellm.engine.Engine); here, where the command lines read them without torch
PRECISIONS = ("auto", "fp32")
PRECISION_HELP = ("auto: bf16 prompt reading on CPUs with bf16 units and int8 weights for CPU decode steps "
                  "(faster, same accuracy in our evaluation); fp32: float32 throughout")

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
        """A configuration read from a file: every field's type and range is checked first (sizes against
        the largest preset, with headroom), so nothing is allocated for a corrupt or hostile file."""
        return cls(**check_config_dict(data))

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


# test: for unit tests; nano: what a 2-core CPU can train in about an hour; mini: the next size measured
# against nano at equal CPU time (docs/how-it-works.md); tiny/small/medium: GPU sizes.
PRESETS: dict[str, dict] = {
    "test": dict(n_layer=2, n_head=2, d_model=64, context_length=256),
    "nano": dict(n_layer=6, n_head=4, d_model=256, context_length=1024),  # the shipped model's shape
    "mini": dict(n_layer=8, n_head=5, d_model=320, context_length=1024),
    "tiny": dict(n_layer=11, n_head=4, d_model=256, context_length=1024),
    "small": dict(n_layer=14, n_head=8, d_model=512, context_length=1024),
    "medium": dict(n_layer=12, n_head=16, d_model=1024, context_length=2048),
}


def _largest(field: str) -> int:
    return max(p[field] for p in PRESETS.values())


# Sanity bounds for configurations read from files: well above every preset, far below what would
# exhaust memory. context_length allows models with much longer contexts than today's presets.
LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (2, 1 << 18),
    "n_layer": (1, 8 * _largest("n_layer")),
    "n_head": (1, 8 * _largest("n_head")),
    "d_model": (2, 8 * _largest("d_model")),
    "context_length": (1, max(32768, 16 * _largest("context_length"))),
    "mlp_ratio": (1, 16),
}
MAX_PARAMETERS = 4_000_000_000
MAX_KV_ELEMENTS = 1 << 31  # n_layer * context_length * d_model: the KV cache an engine preallocates


def check_config_dict(data) -> dict:
    """The fields of a model configuration, checked; ValueError names the first bad field."""
    if not isinstance(data, dict):
        raise ValueError(f"'model' must be an object, got {type(data).__name__}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(map(str, unknown))}")
    out = dict(data)
    for name, (low, high) in LIMITS.items():
        if name not in data:
            continue
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"model.{name} must be an integer from {low} to {high}, got {value!r}")
    for name, low, high in (("rope_base", 1.0, 1e12), ("norm_eps", 1e-12, 0.1)):
        if name in data:
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"model.{name} must be a number from {low:g} to {high:g}, got {value!r}")
            out[name] = float(value)
    for name in ("qk_norm", "tie_embeddings"):
        if name in data and not isinstance(data[name], bool):
            raise ValueError(f"model.{name} must be true or false, got {data[name]!r}")
    if "preset" in data and not (isinstance(data["preset"], str) and len(data["preset"]) <= 64):
        raise ValueError(f"model.preset must be a short string, got {data['preset']!r}")
    defaults = ModelConfig.__dataclass_fields__
    get = lambda name: out.get(name, defaults[name].default)  # noqa: E731
    if get("d_model") % get("n_head"):
        raise ValueError(f"model.d_model {get('d_model')} is not divisible by model.n_head {get('n_head')}")
    if (get("d_model") // get("n_head")) % 2:
        raise ValueError(f"model.d_model / model.n_head must be even for rotary embeddings, "
                         f"got {get('d_model') // get('n_head')}")
    d, hidden, layers = get("d_model"), get("mlp_ratio") * get("d_model"), get("n_layer")
    params = get("vocab_size") * d * (1 if get("tie_embeddings") else 2) + layers * (4 * d * d + 2 * d * hidden)
    if params > MAX_PARAMETERS:
        raise ValueError(f"model sizes give {params / 1e9:.1f}B parameters, more than the {MAX_PARAMETERS / 1e9:g}B "
                         "a codellm model may have (check model.n_layer, model.d_model, model.vocab_size)")
    if layers * get("context_length") * d > MAX_KV_ELEMENTS:
        raise ValueError(f"model.context_length {get('context_length')} with {layers} layers of width {d} needs a "
                         "KV cache larger than a codellm model may have")
    return out
