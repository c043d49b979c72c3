"""`codellm tokenize` and `codellm attention`."""
import struct
import subprocess
import sys

import pytest
import torch

from codellm.bundle import load_bundle
from codellm.attention import attention_maps
from codellm.tokenizer import token_pieces

TEXTS = ['if [ -z "$1" ]; then\n\techo "usage"   # note\nfi\n', "héllo wörld ✓ 😀 日本語\r\n", "", " " * 40]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_back_to_the_input(tokenizer, text):
    pieces = token_pieces(tokenizer, text)
    assert "".join(p for _, p in pieces) == text
    assert [i for i, _ in pieces] == tokenizer.encode(text)


def test_tokenize_command_plain_when_piped(bundle_path):
    r = subprocess.run([sys.executable, "-m", "codellm.cli", "tokenize", "--model", str(bundle_path),
                        "for f in *; do echo ✓; done"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().split("\n")
    assert "\x1b[" not in r.stdout
    pieces = [eval(line.split(None, 1)[1]) for line in lines[:-1]]  # each line: id and repr(piece)
    assert "".join(pieces) == "for f in *; do echo ✓; done"
    assert lines[-1].startswith(f"{len(pieces)} tokens")


def test_attention_rows_sum_to_one(bundle_path, tokenizer):
    model = load_bundle(bundle_path).model
    ids = tokenizer.encode("for f in *.txt; do\n    echo \"$f\"\ndone\n")
    maps = attention_maps(model, ids)
    assert maps.shape == (model.cfg.n_layer, model.cfg.n_head, len(ids), len(ids))
    torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]), atol=1e-5, rtol=0)
    assert torch.all(maps.triu(1) == 0)  # no query sees the future


def test_attention_maps_agree_with_the_model(bundle_path, tokenizer):
    """The explicit softmax path must be the model's attention: recompute the logits from it."""
    model = load_bundle(bundle_path).model
    ids = tokenizer.encode("while read -r line; do\n  printf '%s' \"$line\"\ndone\n")
    maps = attention_maps(model, ids)
    x = torch.tensor([ids])
    with torch.no_grad():
        reference = model(x)
        # an independent check: replacing SDPA by the maps gives the same logits
        h = model.embed(x)
        T = len(ids)
        for layer, block in enumerate(model.blocks):
            a = block.attn
            q, k, v = a.qkv(block.attn_norm(h)).view(1, T, 3, a.n_head, a.head_dim).permute(2, 0, 3, 1, 4)
            y = (maps[layer].unsqueeze(0) @ v).transpose(1, 2).reshape(1, T, -1)
            h = h + a.proj(y)
            h = h + block.mlp(block.mlp_norm(h))
        logits = model.lm_head(model.norm(h))
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_attention_command_writes_a_png_of_the_expected_size(bundle_path, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "attn.png"
    prompt = r"for f in *; do\n  echo $f\ndone"
    r = subprocess.run([sys.executable, "-m", "codellm.cli", "attention", "--model", str(bundle_path), "--prompt",
                        prompt, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    n_tokens = int(r.stdout.split(" over ")[1].split()[0])
    model_heads = load_bundle(bundle_path).config.n_head
    cell = max(3.0, 0.22 * n_tokens) * 80  # inches per map * dpi
    assert png_size(out) == (round(cell * min(4, model_heads)), round(cell * -(-model_heads // 4)))
    r = subprocess.run([sys.executable, "-m", "codellm.cli", "attention", "--model", str(bundle_path), "--prompt",
                        prompt, "--layer", "9", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--layer must be in" in r.stderr
