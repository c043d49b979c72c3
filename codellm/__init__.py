"""codellm: offline, private AI completion for shell scripts.

    import codellm
    engine = codellm.load()                      # the default bundle shipped with the package
    engine.complete(prefix, suffix="", mode="line")
    engine.generate(prompt, max_new_tokens=200, temperature=0.8, top_k=50, top_p=0.95, seed=None)
"""
import importlib
import warnings

# torch warns on import when NumPy is missing (safetensors needs it only to write files; an older install may lack it)
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

# the names below load on first use (PEP 562), so that `import codellm` and its light modules (the
# server's start, the command line's help) do not wait for torch
_LAZY = {"Bundle": "bundle", "BundleError": "bundle", "load_bundle": "bundle", "save_bundle": "bundle",
         "PRESETS": "config", "ModelConfig": "config", "Completion": "engine", "Engine": "engine",
         "load": "engine", "GPT": "model", "Tokenizer": "tokenizer"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["load", "Engine", "Completion", "Bundle", "BundleError", "load_bundle", "save_bundle", "ModelConfig",
           "PRESETS", "GPT", "Tokenizer", "__version__"]
