"""The KV cache gives the same logits as a full forward pass."""
import pytest
import torch

from codellm import kernel
from codellm.bundle import Bundle
from codellm.decode import FEW_TOKENS, Decoder, int8_matmul_available
from codellm.engine import Engine
from codellm.kvcache import KVCache

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
        cache = KVCache.for_model(model)
        parts = [model(ids[:, :23], cache, 0), model(ids[:, 23:24], cache, 23), model(ids[:, 24:], cache, 24)]
    torch.testing.assert_close(torch.cat(parts, 1), full, **TOL)


def make_engine(tokenizer, precision="fp32", **overrides):
    model = make_model(tokenizer, **overrides)
    return Engine(Bundle(model.cfg, tokenizer, model), "cpu", threads=1, precision=precision), model


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
            logits, reused = engine.prefill(ids)
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


def prompt_read_to_20_of_30(model, tokenizer, seed: int):
    """30 random ids, the full forward's logits for them, and a KV cache holding the first 20."""
    ids = torch.randint(4, tokenizer.vocab_size, (1, 30), generator=torch.Generator().manual_seed(seed))
    cache = KVCache.for_model(model)
    with torch.inference_mode():
        full = model(ids)[0]
        model(ids[:, :20], cache, 0)
    return ids, full, cache


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("script", [True, False])
def test_decoder_steps_match_the_full_forward(tokenizer, qk_norm, script):
    """The folded one-token decoder, compiled or as Python, computes the model's logits and writes the
    same keys and values."""
    model = make_model(tokenizer, qk_norm=qk_norm)
    decoder = Decoder(model, script=script)
    ids, full, cache = prompt_read_to_20_of_30(model, tokenizer, seed=3)
    with torch.inference_mode():
        for pos in range(20, 30):
            torch.testing.assert_close(decoder.step(int(ids[0, pos]), pos, cache), full[pos], **TOL)
        keys = cache.k[-1][:, :, :30].clone()
        cache = KVCache.for_model(model)
        model(ids, cache, 0)
        torch.testing.assert_close(keys, cache.k[-1][:, :, :30], **TOL)


def test_decoder_reads_several_tokens_at_once(tokenizer):
    """Several tokens in one call (each attending to the cache and to those before it) give the logits
    the full forward gives, and leave the cache as one-token steps do."""
    model = make_model(tokenizer)
    decoder = Decoder(model)
    ids, full, cache = prompt_read_to_20_of_30(model, tokenizer, seed=5)
    with torch.inference_mode():
        torch.testing.assert_close(decoder.run(ids[0, 20:25].tolist(), 20, cache), full[20:25], **TOL)
        torch.testing.assert_close(decoder.run(ids[0, 25:30].tolist(), 25, cache), full[25:30], **TOL)
        keys = cache.k[0][:, :, :30].clone()
        model(ids, cache, 0)
        torch.testing.assert_close(keys, cache.k[0][:, :, :30], **TOL)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_decoder_reads_prompts_into_the_cache(tokenizer, qk_norm):
    """`read` writes the keys and values the full forward computes, from position 0 and after cached ones
    (more tokens than FEW_TOKENS, so that the prompt path is the one tested)."""
    assert FEW_TOKENS < 10
    model = make_model(tokenizer, qk_norm=qk_norm)
    decoder = Decoder(model)
    ids, full, reference = prompt_read_to_20_of_30(model, tokenizer, seed=6)
    with torch.inference_mode():
        want = [(reference.k[layer][:, :, :20], reference.v[layer][:, :, :20]) for layer in range(len(model.blocks))]
        cache = KVCache.for_model(model)
        decoder.read(ids[0, :10].tolist(), 0, cache)  # from position 0: plain causal attention
        decoder.read(ids[0, 10:20].tolist(), 10, cache)  # after cached positions: masked attention
        for layer, (keys, values) in enumerate(want):
            torch.testing.assert_close(cache.k[layer][:, :, :20], keys, **TOL)
            torch.testing.assert_close(cache.v[layer][:, :, :20], values, **TOL)
        torch.testing.assert_close(decoder.step(int(ids[0, 20]), 20, cache), full[20], **TOL)


@pytest.mark.parametrize("use_kernel", [True, False], ids=["c-step", "pytorch-step"])
def test_int8_decoder_stays_close_to_the_model(tokenizer, use_kernel):
    if not int8_matmul_available(torch.device("cpu")):
        pytest.skip("this torch build has no int8 weight matmul on CPU")
    model = make_model(tokenizer)
    decoder = Decoder(model, int8=True, use_kernel=use_kernel)
    assert (decoder.c_step is not None) == (use_kernel and kernel.available())
    ids, full, cache = prompt_read_to_20_of_30(model, tokenizer, seed=4)
    with torch.inference_mode():
        for pos in range(20, 30):
            got = decoder.step(int(ids[0, pos]), pos, cache)
            error = (got - full[pos]).norm() / full[pos].norm()
            assert error < 0.05, f"position {pos}: relative error {error:.3f}"


def test_fast_engine_agrees_with_the_exact_one(tokenizer):
    """precision 'auto' (bf16 prompt reading where the CPU has bf16 units, int8 decode steps) only
    perturbs the logits slightly."""
    fast, model = make_engine(tokenizer, precision="auto")
    exact, _ = make_engine(tokenizer, precision="fp32")
    prompt = tokenizer.encode("#!/bin/bash\nfor f in *.txt; do\n  echo")
    with torch.inference_mode():
        for engine in (fast, exact):
            engine.greedy_ids(prompt, 1)
        steps = [(fast.decode_one_token(t), exact.decode_one_token(t)) for t in prompt[-8:]]
    for got, want in steps:
        assert (got - want).norm() / want.norm() < 0.05
