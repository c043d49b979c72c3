"""Shared fixtures: tiny bundles built on the fly (no downloads, a few seconds on CPU)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
# start files (codellm.kernel_engine) of the tests' bundles go to a folder of this run, not the user's cache
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="codellm-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

from codellm.bundle import save_bundle  # noqa: E402
from codellm.config import ModelConfig  # noqa: E402
from codellm.model import GPT  # noqa: E402
from codellm.tokenizer import Tokenizer  # noqa: E402

SHELL_SAMPLES = [
    '#!/bin/bash\nset -euo pipefail\n\nif [ -z "$1" ]; then\n    echo "usage: $0 FILE" >&2\n    exit 1\nfi\n',
    '#!/bin/sh\nfor f in *.txt; do\n\techo "found $f"\n\tcp "$f" /tmp/backup/\ndone\n',
    'backup() {\n  local src="$1" dest="$2"\n  tar -czf "$dest/$(date +%F).tar.gz" "$src"\n}\n',
    'case "$1" in\n  start) start_service ;;\n  stop) stop_service ;;\n  *) echo "unknown" ;;\nesac\n',
    'while read -r line; do\n    printf "%s\\n" "$line"\ndone < "${INPUT:-/dev/stdin}"\n',
    'export PATH="/usr/local/bin:$PATH"\nLOG_DIR=/var/log/app\nmkdir -p "$LOG_DIR"\r\n',
    "# héllo wörld ✓ 日本語\nmsg='tabs\there   and   spaces'\n",
]
ENGLISH_SAMPLES = ["The quick brown fox jumps over the lazy dog. " * 5,
                   "A shell is a program that reads commands and runs them.\n" * 4]


def make_tokenizer(vocab_size: int = 600) -> Tokenizer:
    return Tokenizer.train((SHELL_SAMPLES + ENGLISH_SAMPLES) * 4, vocab_size=vocab_size)


def make_model(tok: Tokenizer, seed: int = 0, **overrides) -> GPT:
    """A 'test' preset model with every weight random (zero-initialised projections would hide bugs)."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("test", vocab_size=tok.vocab_size, **overrides)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return make_tokenizer()


@pytest.fixture(scope="session")
def bundle_path(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("bundles") / "tiny"
    save_bundle(path, make_model(tokenizer), tokenizer, {"note": "test bundle"})
    return path
