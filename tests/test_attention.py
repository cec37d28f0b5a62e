import torch

from lmforge.attention import (
    KVCache,
    MultiHeadAttention,
    attention,
    attention_reference,
)
from lmforge.config import ModelConfig
from lmforge.model import GPT


def _qkv(b=2, nh=4, nkv=4, t=16, hs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, t, hs, generator=g, requires_grad=True) for n in (nh, nkv, nkv)]


def test_fast_path_equals_reference_outputs_and_gradients():
    for nkv in (4, 2, 1):  # multi-head, grouped-query, multi-query
        q, k, v = _qkv(nkv=nkv)
        ref = attention_reference(q, k, v)
        ref.square().sum().backward()
        grads = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        fast = attention(q, k, v)
        fast.square().sum().backward()
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
        for g, t in zip(grads, (q, k, v)):
            torch.testing.assert_close(t.grad, g, atol=1e-5, rtol=1e-5)


def test_module_paths_agree_with_gqa():
    cfg = ModelConfig(vocab_size=50, context_length=32, d_model=32, n_layer=1, n_head=4, n_kv_head=2)
    attn = MultiHeadAttention(cfg)
    x = torch.randn(2, 10, 32)
    fast = attn(x)
    attn.fast = False
    torch.testing.assert_close(fast, attn(x), atol=1e-5, rtol=1e-5)


def test_causality():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, context_length=32, d_model=32, n_layer=2, n_head=4)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 50, (1, 20))
    base = model(idx)
    for t in (0, 7, 18):
        changed = idx.clone()
        changed[0, t + 1] = (changed[0, t + 1] + 1) % 50
        out = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1])  # positions <= t untouched
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, context_length=32, d_model=32, n_layer=2, n_head=4, n_kv_head=2)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 50, (2, 12))
    full = model(idx)
    cache = KVCache(cfg, batch_size=2)
    parts = [model(idx[:, :5], cache)] + [model(idx[:, i:i + 1], cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
