"""The KV cache gives the same logits as a full forward pass."""
import torch

from codellm.bundle import Bundle
from codellm.engine import Engine

from conftest import make_model

TOL = dict(atol=2e-5, rtol=1e-4)


def full_last_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1]


def test_incremental_forward_matches_full(tokenizer):
    model = make_model(tokenizer)
    ids = torch.randint(4, tokenizer.vocab_size, (1, 40))
    with torch.no_grad():
        full = model(ids)
        model.setup_cache()
        parts = [model(ids[:, :23], start=0), model(ids[:, 23:24], start=23), model(ids[:, 24:], start=24)]
    torch.testing.assert_close(torch.cat(parts, 1), full, **TOL)


def make_engine(tokenizer):
    model = make_model(tokenizer)
    return Engine(Bundle(model.cfg, tokenizer, model), "cpu", threads=1), model


def test_engine_reuses_cache_for_fresh_extended_and_diverging_prompts(tokenizer):
    engine, model = make_engine(tokenizer)
    g = torch.Generator().manual_seed(1)
    base = torch.randint(4, tokenizer.vocab_size, (60,), generator=g).tolist()
    cases = [
        (base, 0),  # fresh
        (base + [7, 8, 9], len(base)),  # extended: only the new tokens are computed
        (base[:30] + [11, 12, 13, 14], 30),  # diverges mid-way: the shared 30 are reused
        (base[:30] + [11, 12], 31),  # a prefix of what is cached: recompute only the last token
    ]
    with torch.inference_mode():
        for ids, expect_reused in cases:
            logits, reused = engine._forward_from_cache(ids)
            assert reused == expect_reused
            torch.testing.assert_close(logits, full_last_logits(model, ids), **TOL)


def test_greedy_decode_with_cache_matches_recomputing_everything(tokenizer):
    engine, model = make_engine(tokenizer)
    prompt = tokenizer.encode("#!/bin/bash\nfor f in *.txt; do\n")
    fast = engine.greedy_ids(prompt, 12)
    slow, ids = [], list(prompt)
    for _ in range(12):
        slow.append(int(torch.argmax(full_last_logits(model, ids))))
        ids.append(slow[-1])
    assert fast == slow
