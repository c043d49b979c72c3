"""The C decode step computes what the PyTorch step computes from the same int8 weights."""
import shutil
import sysconfig

import pytest
import torch

from codellm import kernel
from codellm.decode import Decoder
from codellm.kvcache import KVCache

from conftest import make_model

needs_kernel = pytest.mark.skipif(not kernel.available(), reason="no C decode step here (not built, or no AVX2)")


def test_the_c_step_is_built_where_a_c_compiler_is():
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if not shutil.which(compiler):
        pytest.skip(f"no C compiler ({compiler}) here")
    assert kernel.built(), "a C compiler is here but codellm/_decode_kernel.c was not built (pip install -e .)"


def instruction_sets():
    """Every variant of the int8 products this CPU runs."""
    if not kernel.available():
        return []
    usable = []
    for name in ("avx512", "avx2", "plain C"):
        try:
            kernel._decode_kernel.use_instructions(name)
            usable.append(name)
        except ValueError:
            pass
    kernel._decode_kernel.use_instructions(usable[0])
    return usable


@pytest.fixture(params=instruction_sets() or ["none"])
def instructions(request):
    """Run a test with each variant of the int8 products, then go back to the default one."""
    if request.param == "none":
        pytest.skip("the C decode step is not built here")
    default = kernel.instructions()
    kernel._decode_kernel.use_instructions(request.param)
    yield request.param
    kernel._decode_kernel.use_instructions(default)


def torch_step_on_the_same_weights(decoder: Decoder) -> Decoder:
    """A float32 PyTorch decoder of the same model whose matrices are the int8 decoder's, dequantised:
    what the C step computes, up to float rounding."""
    reference = Decoder(decoder.model, int8=False)
    reference.matrices = [(weight.float() * scale.float()[:, None]).t().contiguous()
                          for weight, scale in zip(decoder.matrices, decoder.scales)]
    return reference


def read_prompt(model, ids) -> KVCache:
    """A new KV cache holding the keys and values of `ids`, as the model computes them."""
    cache = KVCache.for_model(model)
    with torch.inference_mode():
        model(torch.tensor([ids]), cache, 0)
    return cache


SHAPES = [dict(), dict(qk_norm=False), dict(d_model=40, n_head=2)]  # d_model 40: rows and inputs with remainders


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=["default", "no-qk-norm", "odd-sizes"])
@pytest.mark.parametrize("threads", [1, 2, 0], ids=["one-thread", "team-of-2", "pytorch-threads"])
def test_c_step_matches_the_pytorch_step(tokenizer, instructions, shape, threads):
    """Logits and the keys/values written agree for one token at a time and for several at once (each
    attending to the ones before it), up to the 16 a call takes; with no OpenMP team and with one."""
    model = make_model(tokenizer, **shape)
    c_decoder = Decoder(model, int8=True)
    assert c_decoder.c_step is not None
    assert c_decoder.c_step.threads == 1  # a small model's steps run on one thread by default
    c_decoder.c_step.threads = threads
    reference = torch_step_on_the_same_weights(c_decoder)
    ids = torch.randint(4, tokenizer.vocab_size, (60,), generator=torch.Generator().manual_seed(7)).tolist()
    runs = [(20, 1), (21, 1), (22, 4), (26, 3), (29, 16), (45, 2)]
    results = {}
    for name, decoder in (("c", c_decoder), ("torch", reference)):
        cache = read_prompt(model, ids[:20])
        with torch.inference_mode():
            logits = [decoder.run(ids[pos:pos + n], pos, cache) for pos, n in runs]
        caches = [(cache.k[layer][0, :, :47].clone(), cache.v[layer][0, :, :47].clone())
                  for layer in range(len(model.blocks))]
        results[name] = logits, caches
    for got, want in zip(results["c"][0], results["torch"][0]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for got, want in zip(results["c"][1], results["torch"][1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@needs_kernel
def test_c_step_follows_a_new_kv_cache(tokenizer):
    """A new KVCache has new tensors: the C step writes to and reads from those."""
    model = make_model(tokenizer)
    decoder = Decoder(model, int8=True)
    reference = torch_step_on_the_same_weights(decoder)
    ids = tokenizer.encode("#!/bin/bash\nfor f in *.log; do\n  gzip \"$f\"\ndone\n")
    cache = read_prompt(model, ids[:-1])
    with torch.inference_mode():
        decoder.step(ids[-1], len(ids) - 1, cache)
        cache = read_prompt(model, ids[:-1])  # a new cache, as when the engine starts over
        got = decoder.step(ids[-1], len(ids) - 1, cache)
        want = reference.step(ids[-1], len(ids) - 1, cache)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@needs_kernel
def test_c_step_refuses_what_it_cannot_compute(tokenizer):
    model = make_model(tokenizer)
    cache = KVCache.for_model(model)
    step = Decoder(model, int8=True).c_step
    context, vocab = model.cfg.context_length, model.cfg.vocab_size
    for tokens, pos in [([], 0), ([vocab], 0), ([-1], 0), ([5] * 17, 0), ([5, 6], context - 1), ([5], -1)]:
        with pytest.raises(ValueError, match="decode kernel"):
            step.run(tokens, pos, cache)
    with pytest.raises(TypeError):
        step.run(["echo"], 0, cache)


@needs_kernel
def test_decoder_takes_more_tokens_than_a_c_call_through_pytorch(tokenizer):
    model = make_model(tokenizer)
    decoder = Decoder(model, int8=True)
    ids = list(range(4, 4 + kernel.MAX_TOKENS + 4))
    cache = KVCache.for_model(model)
    with torch.inference_mode():
        assert decoder.run(ids, 0, cache).shape == (len(ids), model.cfg.vocab_size)


@needs_kernel
def test_engine_decodes_with_the_c_step_under_auto_precision_on_cpu(tokenizer):
    from codellm.bundle import Bundle
    from codellm.engine import Engine

    model = make_model(tokenizer)
    bundle = Bundle(model.cfg, tokenizer, model)
    fast = Engine(bundle, "cpu", threads=1, precision="auto")
    assert fast.decoder.step_name == f"C ({kernel.instructions()})"
    assert Engine(bundle, "cpu", threads=1, precision="fp32").decoder.step_name == "TorchScript"
    answer = fast.complete_detailed("#!/bin/bash\nfor f in *.txt; do\n", "", mode="line", clean=False)
    assert answer.new_tokens > 0


@needs_kernel
def test_c_step_refuses_a_kv_cache_or_matrices_of_another_shape(tokenizer):
    model = make_model(tokenizer)
    decoder = Decoder(model, int8=True)
    with pytest.raises(ValueError, match="KV cache"):
        decoder.run([5], 0, KVCache.for_model(model, max_len=model.cfg.context_length // 2))
    step = decoder.c_step
    step.matrices[1] = step.matrices[2]  # the MLP's up matrix where the attention output's should be
    with pytest.raises(ValueError, match="matrix 1 is"):
        step.run([5], 0, KVCache.for_model(model))
