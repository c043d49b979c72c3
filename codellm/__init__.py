"""codellm: offline, private AI completion for shell scripts.

    import codellm
    engine = codellm.load()                      # the default bundle shipped with the package
    engine.complete(prefix, suffix="", mode="line")
    engine.generate(prompt, max_new_tokens=200, temperature=0.8, top_k=50, top_p=0.95, seed=None)
"""
from .bundle import Bundle, BundleError, load_bundle, save_bundle
from .config import PRESETS, ModelConfig
from .engine import Completion, Engine, load
from .model import GPT
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["load", "Engine", "Completion", "Bundle", "BundleError", "load_bundle", "save_bundle", "ModelConfig",
           "PRESETS", "GPT", "Tokenizer", "__version__"]
