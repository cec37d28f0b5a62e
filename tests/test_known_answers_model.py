"""Known answers for the model's formulas: tiny cases worked out by hand (or with plain
math/numpy written out here), never by comparing two lmforge code paths with each other.

A bug shared by the reference and the fast path (a wrong scale, a wrong grouped-query head
order) passes every "fast == reference" test; these catch it without ``transformers``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmforge.attention import (
    KVCache,
    MultiHeadAttention,
    RotaryEmbedding,
    apply_rotary,
    attention,
    attention_reference,
    causal_mask,
    repeat_kv,
)
from lmforge.config import ConfigError, ModelConfig
from lmforge.model import GPT, MLP, RMSNorm, SwiGLU, make_norm

BOTH_PATHS = pytest.mark.parametrize("attend", [attention, attention_reference], ids=["fast", "reference"])


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------- attention
@BOTH_PATHS
def test_attention_scale_is_one_over_sqrt_head_dim(attend):
    # One head, head size 4, two positions. Position 1 scores k0 at 0 and k1 at q·k1/√4 = 4/2 = 2.
    q = _t([[0, 0, 0, 0], [2, 0, 0, 0]])[None, None]
    k = _t([[0, 0, 0, 0], [2, 0, 0, 0]])[None, None]
    v = _t([[1, 0, 0, 0], [0, 1, 0, 0]])[None, None]
    out = attend(q, k, v)[0, 0]
    w1 = math.exp(2) / (1 + math.exp(2))  # softmax([0, 2])[1]
    expected = _t([[1, 0, 0, 0],           # position 0 sees only itself
                   [1 - w1, w1, 0, 0]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@BOTH_PATHS
def test_attention_weights_are_a_softmax_over_visible_keys(attend):
    # Three positions, head size 1: scores q_i·k_j / 1. Values are the key index, so the
    # output is the softmax-weighted mean index the query attends to.
    q = _t([[1.0], [1.0], [1.0]])[None, None]
    k = _t([[0.0], [1.0], [2.0]])[None, None]
    v = _t([[0.0], [1.0], [2.0]])[None, None]
    out = attend(q, k, v)[0, 0, :, 0]
    e0, e1, e2 = 1.0, math.e, math.e ** 2
    expected = [0.0, e1 / (e0 + e1), (e1 + 2 * e2) / (e0 + e1 + e2)]
    torch.testing.assert_close(out, torch.tensor(expected), atol=1e-6, rtol=0)


def test_causal_mask_values():
    T, F = True, False
    assert causal_mask(3, 3).tolist() == [[T, F, F], [T, T, F], [T, T, T]]
    # Two new queries after one cached key: they are positions 1 and 2 of 3.
    assert causal_mask(2, 3).tolist() == [[T, T, F], [T, T, T]]
    assert causal_mask(1, 4).tolist() == [[T, T, T, T]]


@BOTH_PATHS
def test_queries_after_a_cache_do_not_see_later_keys(attend):
    # Keys 0..3, queries are positions 2 and 3 (t_q=2 < t_k=4). Zero scores: uniform weights
    # over the visible keys, so the output is the mean of the visible values.
    q = torch.zeros(1, 1, 2, 1)
    k = torch.zeros(1, 1, 4, 1)
    v = _t([[1.0], [2.0], [4.0], [8.0]])[None, None]
    out = attend(q, k, v)[0, 0, :, 0]
    torch.testing.assert_close(out, torch.tensor([(1 + 2 + 4) / 3, (1 + 2 + 4 + 8) / 4]))
    one = attend(q[:, :, :1], k, v)[0, 0, 0, 0]  # a single new token sees every key
    assert one.item() == pytest.approx(15 / 4)


def test_repeat_kv_is_hf_repeat_interleave():
    """Hugging Face Llama: query head h uses KV head h // n_rep (repeat_interleave, not tile)."""
    kv = torch.arange(2.0).view(1, 2, 1, 1)          # KV head j holds the value j
    out = repeat_kv(kv, 3)
    assert out.flatten().tolist() == [0, 0, 0, 1, 1, 1]
    x = torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(repeat_kv(x, 2), torch.repeat_interleave(x, 2, dim=1), atol=0, rtol=0)
    assert repeat_kv(x, 1) is x


@BOTH_PATHS
def test_grouped_query_head_order(attend):
    # 4 query heads, 2 KV heads: query heads 0, 1 read KV head 0; heads 2, 3 read KV head 1.
    q = torch.randn(1, 4, 3, 2)
    k = torch.zeros(1, 2, 3, 2)
    v = torch.stack([torch.full((3, 2), 1.0), torch.full((3, 2), 2.0)])[None]
    out = attend(q, k, v)
    heads = out[0, :, -1, 0].tolist()
    assert heads == pytest.approx([1.0, 1.0, 2.0, 2.0])


@pytest.mark.parametrize("fast", [True, False])
def test_attention_module_layout_of_the_fused_projection(fast):
    """c_attn rows: n_head query heads, then n_kv key heads, then n_kv value heads; the
    output concatenates the heads in order before c_proj."""
    cfg = ModelConfig(vocab_size=8, context_length=4, d_model=4, n_layer=1, n_head=4, n_kv_head=2, bias=False,
                      qkv_bias=False)
    attn = MultiHeadAttention(cfg).eval()
    attn.fast = fast
    with torch.no_grad():
        w = torch.zeros(8, 4)        # head size 1: rows 0-3 queries, 4-5 keys, 6-7 values
        w[6, 0] = 1.0                # value head 0 reads x[0]
        w[7, 1] = 1.0                # value head 1 reads x[1]
        attn.c_attn.weight.copy_(w)
        attn.c_proj.weight.copy_(torch.eye(4))
    x = _t([[[1.0, 2.0, 0.0, 0.0], [3.0, 6.0, 0.0, 0.0]]])
    out = attn(x)
    # Zero queries and keys: uniform attention, so position t averages the values of 0..t.
    expected = _t([[[1, 1, 2, 2], [2, 2, 4, 4]]])
    torch.testing.assert_close(out, expected)


# ----------------------------------------------------------------------------- rotary
def test_rotary_rotates_each_pair_by_position_times_frequency():
    # head_dim 4, theta 10000: frequencies 1 and 10000^(-2/4) = 0.01; pairs (x0, x2) and (x1, x3).
    rope = RotaryEmbedding(head_dim=4, max_len=8)
    cos, sin = rope(0, 8, torch.device("cpu"))
    x = torch.zeros(1, 1, 8, 4)
    x[..., 0] = 1.0  # e0 at every position
    y = apply_rotary(x, cos, sin)[0, 0]
    for p in (0, 1, 3, 7):
        assert y[p].tolist() == pytest.approx([math.cos(p), 0, math.sin(p), 0], abs=1e-6)
    x = torch.zeros(1, 1, 8, 4)
    x[..., 3] = 1.0  # e3 pairs with e1 at frequency 0.01: (x1, x3) -> (-x3 sin, x3 cos)
    y = apply_rotary(x, cos, sin)[0, 0]
    assert y[5].tolist() == pytest.approx([0, -math.sin(0.05), 0, math.cos(0.05)], abs=1e-6)


def test_rotary_offset_and_theta():
    rope = RotaryEmbedding(head_dim=4, max_len=16, theta=100.0)  # frequencies 1 and 100^(-1/2) = 0.1
    cos, sin = rope(5, 2, torch.device("cpu"))                    # positions 5 and 6
    assert cos.shape == (2, 4)
    assert cos[0].tolist() == pytest.approx([math.cos(5), math.cos(0.5), math.cos(5), math.cos(0.5)], abs=1e-6)
    assert sin[1].tolist() == pytest.approx([math.sin(6), math.sin(0.6), math.sin(6), math.sin(0.6)], abs=1e-6)


def test_rotary_scores_depend_on_distance_only():
    rope = RotaryEmbedding(head_dim=4, max_len=32)
    cos, sin = rope(0, 32, torch.device("cpu"))
    q = torch.tensor([0.3, -1.0, 0.7, 0.2]).expand(1, 1, 32, 4)
    k = torch.tensor([1.0, 0.5, -0.4, 0.9]).expand(1, 1, 32, 4)
    rq, rk = apply_rotary(q, cos, sin)[0, 0], apply_rotary(k, cos, sin)[0, 0]
    assert (rq[10] @ rk[7]).item() == pytest.approx((rq[25] @ rk[22]).item(), abs=1e-5)
    assert (rq[3] @ rk[3]).item() == pytest.approx((q[0, 0, 0] @ k[0, 0, 0]).item(), abs=1e-5)


def test_rotary_config_validation():
    with pytest.raises(ConfigError, match=r"^invalid model config: rotary embeddings need an even head size, got 3$"):
        ModelConfig(d_model=6, n_head=2, positions="rope")
    ModelConfig(d_model=6, n_head=3, positions="rope")       # head size 2 is fine
    ModelConfig(d_model=6, n_head=2, positions="learned")    # odd head size without rotary is fine
    with pytest.raises(ConfigError, match=r"rope_theta must be > 0, got 0"):
        ModelConfig(positions="rope", rope_theta=0)
    with pytest.raises(ConfigError, match=r"positions must be 'learned' or 'rope', got 'alibi'"):
        ModelConfig(positions="alibi")


# ----------------------------------------------------------------------------- norms and MLPs
def test_rmsnorm_known_answer():
    norm = RMSNorm(2, eps=1.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    out = norm(torch.tensor([[3.0, 4.0]]))
    rms = math.sqrt((9 + 16) / 2 + 1.0)  # eps inside the square root
    assert out[0].tolist() == pytest.approx([3 / rms, 2 * 4 / rms], abs=1e-6)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_make_norm_uses_the_configured_kind_and_eps(kind):
    cfg = ModelConfig(d_model=4, n_head=1, norm=kind, norm_eps=0.5)
    norm = make_norm(cfg)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    if kind == "layernorm":
        expected = [(v - 2.5) / math.sqrt(1.25 + 0.5) for v in (1, 2, 3, 4)]  # mean 2.5, variance 1.25
    else:
        expected = [v / math.sqrt(30 / 4 + 0.5) for v in (1, 2, 3, 4)]
    assert norm(x)[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_swiglu_known_answer():
    cfg = ModelConfig(d_model=2, n_head=1, d_ff=1, bias=False, mlp="swiglu")
    mlp = SwiGLU(cfg)
    with torch.no_grad():
        mlp.c_gate.weight.copy_(torch.tensor([[1.0, 0.0]]))   # gate reads x0
        mlp.c_fc.weight.copy_(torch.tensor([[0.0, 1.0]]))     # up reads x1
        mlp.c_proj.weight.copy_(torch.tensor([[1.0], [0.0]]))
    out = mlp(torch.tensor([[2.0, 3.0]]))
    silu2 = 2.0 / (1.0 + math.exp(-2.0))
    assert out[0].tolist() == pytest.approx([silu2 * 3.0, 0.0], abs=1e-6)


def test_gelu_mlp_uses_the_tanh_approximation():
    cfg = ModelConfig(d_model=2, n_head=1, d_ff=1, bias=False)
    mlp = MLP(cfg)
    with torch.no_grad():
        mlp.c_fc.weight.copy_(torch.tensor([[1.0, 0.0]]))
        mlp.c_proj.weight.copy_(torch.tensor([[1.0], [2.0]]))
    gelu_tanh = 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (1 + 0.044715)))   # x = 1
    out = mlp(torch.tensor([[1.0, 5.0]]))
    assert out[0].tolist() == pytest.approx([gelu_tanh, 2 * gelu_tanh], abs=1e-7)
    assert abs(gelu_tanh - 0.8413447) > 1e-4  # the exact (erf) GELU would differ measurably


# ----------------------------------------------------------------------------- the whole model
def test_gpt_forward_known_answer_with_empty_blocks():
    """With every residual branch zeroed, logits = LayerNorm(wte[idx] + wpe[pos]) · wteᵀ."""
    cfg = ModelConfig(vocab_size=5, context_length=4, d_model=4, n_layer=2, n_head=2)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for block in model.h:
            block.attn.c_proj.weight.zero_()
            block.attn.c_proj.bias.zero_()
            block.mlp.c_proj.weight.zero_()
            block.mlp.c_proj.bias.zero_()
    wte = model.wte.weight.detach().numpy().astype(np.float64)
    wpe = model.wpe.weight.detach().numpy().astype(np.float64)
    idx = [3, 0, 4]
    x = wte[idx] + wpe[:3]
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    expected = x @ wte.T
    out = model(torch.tensor([idx]))[0].detach().double().numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # With a cache, the second chunk's positions continue where the first stopped.
    cache = KVCache(cfg, batch_size=1)
    model(torch.tensor([idx[:2]]), cache)
    np.testing.assert_allclose(model(torch.tensor([idx[2:]]), cache)[0].detach().double().numpy(), expected[2:], atol=1e-5)


def test_gpt_init_values():
    cfg = ModelConfig(vocab_size=1000, context_length=64, d_model=128, n_layer=4, n_head=4)
    model = GPT(cfg)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert model.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.h[1].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    resid = 0.02 / math.sqrt(2 * 4)
    assert model.h[2].mlp.c_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert model.h[3].attn.c_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert abs(model.wte.weight.mean().item()) < 1e-3
    for name, p in model.named_parameters():
        if p.dim() == 1:
            target = 1.0 if (".ln_" in name or name.startswith("ln_f")) and name.endswith("weight") else 0.0
            assert torch.all(p == target), name
    a, b = GPT(cfg), GPT(cfg)
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    assert torch.equal(a.wte.weight, b.wte.weight)


def test_context_length_is_enforced_with_a_clear_message():
    cfg = ModelConfig(vocab_size=5, context_length=4, d_model=4, n_layer=1, n_head=1)
    model = GPT(cfg)
    model(torch.zeros(1, 4, dtype=torch.long))  # exactly the context is fine
    with pytest.raises(ValueError, match=r"sequence of 5 tokens is longer than the model's context length \(4\)"):
        model(torch.zeros(1, 5, dtype=torch.long))
    cache = KVCache(cfg, batch_size=1)
    model(torch.zeros(1, 3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="sequence of 5 tokens"):
        model(torch.zeros(1, 2, dtype=torch.long), cache)


def test_num_params_known_answer():
    cfg = ModelConfig.from_preset("gpt-nano")  # vocab 512, context 64, d 64, 2 layers, tied head
    d, v, t = 64, 512, 64
    per_layer = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    total = v * d + t * d + 2 * per_layer + 2 * d
    model = GPT(cfg)
    assert model.num_params() == total == 136_960
    assert model.num_params(non_embedding=True) == total - v * d - t * d
    untied = GPT(cfg.replace(tie_embeddings=False, positions="rope"))  # no wpe; a head of its own
    assert untied.num_params() == total - t * d + v * d
    assert untied.num_params(non_embedding=True) == total - t * d + v * d - v * d
