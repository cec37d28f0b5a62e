"""Known answers for generation: what the sampler draws from (temperature, top-k, top-p),
its configuration's validation, and the KV cache fed a multi-token chunk after the prompt."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.attention import KVCache
from lmforge.config import ConfigError, ModelConfig, SampleConfig
from lmforge.generate import generate, sample_next
from lmforge.model import GPT

N = 20_000  # draws per frequency check: 4 standard deviations are below 0.015


def _frequencies(logits: list[float], seed: int = 0, **kw) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    draws = sample_next(torch.tensor([logits]).expand(N, -1), generator=g, **kw)
    return (torch.bincount(draws, minlength=len(logits)).float() / N).tolist()


def _softmax(row: list[float]) -> list[float]:
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_logits(temperature):
    logits = [1.0, 0.0, -1.0]
    expected = _softmax([v / temperature for v in logits])
    # By hand: T=0.5 -> softmax([2, 0, -2]) = [0.867, 0.117, 0.016]; T=2 -> softmax([.5, 0, -.5]) = [0.506, 0.307, 0.186]
    assert expected[0] == pytest.approx({0.5: 0.8668, 1.0: 0.6652, 2.0: 0.5065}[temperature], abs=1e-4)
    assert _frequencies(logits, temperature=temperature, top_k=None) == pytest.approx(expected, abs=0.015)


def test_temperature_zero_is_greedy():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    assert sample_next(logits, 0.0, top_k=1).tolist() == [1, 0]
    assert sample_next(logits, 0.0, top_p=0.01).tolist() == [1, 0]


def test_top_k_keeps_exactly_k_tokens_with_renormalised_probabilities():
    logits = [3.0, 2.0, 1.0, 0.0, -1.0]
    kept = _softmax([3.0, 2.0, 1.0])
    assert _frequencies(logits, temperature=1.0, top_k=3) == pytest.approx(kept + [0.0, 0.0], abs=0.015)
    assert _frequencies(logits, temperature=1.0, top_k=1) == [1.0, 0.0, 0.0, 0.0, 0.0]
    everything = _softmax(logits)
    assert _frequencies(logits, temperature=1.0, top_k=5) == pytest.approx(everything, abs=0.015)
    assert _frequencies(logits, temperature=1.0, top_k=9) == pytest.approx(everything, abs=0.015)


@pytest.mark.parametrize("top_p,kept", [(0.45, 1), (0.55, 2), (0.85, 3), (0.97, 4), (1.0, 4)])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = [math.log(p) for p in probs]
    z = sum(probs[:kept])
    expected = [p / z for p in probs[:kept]] + [0.0] * (4 - kept)
    assert _frequencies(logits, temperature=1.0, top_p=top_p) == pytest.approx(expected, abs=0.015)


def test_top_p_boundary_reached_exactly():
    # Four equal tokens: 0.25 each (exact in floating point). p = 0.5 is reached by two of them.
    draws = sample_next(torch.zeros(N, 4), 1.0, top_p=0.5, generator=torch.Generator().manual_seed(1))
    assert len(set(draws.tolist())) == 2


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-46])
def test_a_top_p_below_float32s_range_keeps_the_most_likely_token(top_p):
    # Such a p is 0 next to float32 probabilities: once every token was dropped and sampling raised.
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    draws = sample_next(logits.repeat(50, 1), 1.0, top_p=top_p, generator=torch.Generator().manual_seed(0))
    assert draws.tolist() == [1, 0] * 50


def test_temperature_applies_before_top_p():
    # HF order: temperature first. T=2 flattens [.5, .3, .15, .05] to about [.379, .294, .208, .120],
    # so p = 0.7 needs three tokens (cumulative .379, .673, .881) where T=1 needs two.
    logits = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    freq = _frequencies(logits, temperature=2.0, top_p=0.7)
    flat = _softmax([v / 2 for v in logits])[:3]
    assert freq == pytest.approx([p / sum(flat) for p in flat] + [0.0], abs=0.015)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
    (dict(top_k=0), "top_k must be >= 1 or None, got 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\] or None, got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\] or None, got 1.5"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0, got -1"),
])
def test_sample_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=r"^invalid sample config: " + message + "$"):
        SampleConfig(**kwargs)


def test_sample_config_accepts_its_boundaries():
    SampleConfig(temperature=0, top_k=1, top_p=1.0, max_new_tokens=0)
    with pytest.raises(ConfigError) as e:
        SampleConfig(temperature=-1, top_k=0)
    assert "temperature" in str(e.value) and "top_k" in str(e.value)  # every problem at once


# ----------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
@pytest.mark.parametrize("llama", [False, True], ids=["gpt", "llama"])
def test_kv_cache_with_multi_token_chunks_after_the_prefill(fast, llama):
    torch.manual_seed(0)
    extra = dict(n_kv_head=2, norm="rmsnorm", mlp="swiglu", positions="rope", bias=False) if llama else {}
    cfg = ModelConfig(vocab_size=50, context_length=32, d_model=32, n_layer=2, n_head=4, **extra)
    model = GPT(cfg).eval()
    for block in model.h:
        block.attn.fast = fast
    idx = torch.randint(0, 50, (2, 14))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(cfg, batch_size=2)
        parts = [model(idx[:, :5], cache), model(idx[:, 5:9], cache), model(idx[:, 9:10], cache),
                 model(idx[:, 10:14], cache)]
    assert cache.pos == 14
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_overflow_is_refused():
    cfg = ModelConfig(vocab_size=10, context_length=8, d_model=8, n_layer=1, n_head=2)
    cache = KVCache(cfg, batch_size=1, max_len=4)
    k = torch.zeros(1, 2, 3, 4)
    cache.update(0, k, k)
    cache.advance(3)
    with pytest.raises(ValueError, match=r"KV cache is full \(4 positions\)"):
        cache.update(0, k, k)


def test_sampled_generation_draws_from_the_model_distribution():
    """Sampling through generate at T=2 matches softmax(logits / 2) of the model's first step."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=6, context_length=8, d_model=8, n_layer=1, n_head=2)).eval()
    with torch.no_grad():
        model.wte.weight.mul_(40)  # a peaked distribution, so temperature matters measurably
    prompt = torch.tensor([[1, 2]])
    with torch.no_grad():
        logits = model(prompt)[0, -1].tolist()
    expected = _softmax([v / 2.0 for v in logits])
    out = generate(model, prompt.expand(4000, -1), SampleConfig(max_new_tokens=1, temperature=2.0, top_k=None))
    freq = (torch.bincount(out[:, 0], minlength=6).float() / 4000).tolist()
    assert freq == pytest.approx(expected, abs=0.03)
    assert max(abs(a - b) for a, b in zip(expected, _softmax(logits))) > 0.1  # T=1 would be told apart
