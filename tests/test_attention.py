import math

import pytest
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


def test_flash_kernel_path_equals_reference(monkeypatch):
    """With the chunked CPU path switched off, ``attention`` is PyTorch's fused kernel (what runs on a
    GPU and beyond ``CHUNKED_ATTENTION_MAX``): the same outputs and gradients as the formula."""
    import lmforge.attention as attn_mod

    monkeypatch.setattr(attn_mod, "CHUNKED_ATTENTION_MAX", 0)
    for nkv in (4, 2):
        q, k, v = _qkv(nkv=nkv)
        out = attention(q, k, v)
        assert "Chunked" not in type(out.grad_fn).__name__
        ref = attention_reference(*(t.detach().requires_grad_() for t in (q, k, v)))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,t,chunk", [(6, 2, 10, 4), (2, 2, 9, 3), (4, 1, 5, 8), (3, 3, 8, 8)],
                         ids=["gqa-uneven-chunks", "mha", "mqa-one-chunk", "chunk-equals-t"])
def test_chunked_causal_attention_gradients_are_exact(heads, kv_heads, t, chunk):
    """The hand-written backward against numerical differentiation (fp64), for chunks that do and
    do not divide the sequence and for every head grouping."""
    from lmforge.attention import ChunkedCausalAttention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, t, 4, generator=g, dtype=torch.float64, requires_grad=True)
               for n in (heads, kv_heads, kv_heads))
    assert torch.autograd.gradcheck(lambda q, k, v: ChunkedCausalAttention.apply(q, k, v, chunk), (q, k, v))
    frozen_k = k.detach()  # only some inputs need a gradient: the others get none, the rest stay exact
    assert torch.autograd.gradcheck(lambda q, v: ChunkedCausalAttention.apply(q, frozen_k, v, chunk), (q, v))
    with torch.no_grad():
        torch.testing.assert_close(ChunkedCausalAttention.apply(q, k, v, chunk),
                                   attention_reference(q, k, v), atol=1e-6, rtol=1e-6)


def test_cpu_attention_takes_the_chunked_path_up_to_its_limit(monkeypatch):
    """On the CPU, fp32 and bf16 causal attention without a mask or dropout runs chunked (several
    chunks here); masks, dropout, fp64 and longer sequences go to the fused kernel."""
    import lmforge.attention as attn_mod

    monkeypatch.setattr(attn_mod, "ATTENTION_CHUNK", 4)
    q, k, v = _qkv(nkv=2, t=10)

    def path(**kw):
        out = attention(*(kw.pop("qkv", (q, k, v))), **kw)
        return "chunked" if "Chunked" in type(out.grad_fn).__name__ else "fused"

    assert path() == "chunked"
    assert path(qkv=[t.bfloat16() for t in (q, k, v)]) == "chunked"
    assert path(qkv=[t.double() for t in (q, k, v)]) == "fused"
    assert path(dropout_p=0.1, training=True) == "fused"
    assert path(dropout_p=0.1) == "chunked"  # not training: no dropout
    assert path(mask=torch.ones(1, 1, 10, 10, dtype=torch.bool).tril()) == "fused"
    assert path(qkv=(q[:, :, -3:], k, v)) == "fused"  # queries after a cache
    monkeypatch.setattr(attn_mod, "CHUNKED_ATTENTION_MAX", 9)
    assert path() == "fused"


def test_chunked_attention_has_no_silent_second_derivative():
    """The hand-written backward is not differentiable: a second derivative (a gradient penalty, a
    Hessian-vector product) must fail loudly, not come out wrong."""
    from lmforge.attention import ChunkedCausalAttention

    q, k, v = _qkv(nkv=2, t=10)
    grad_q, = torch.autograd.grad(ChunkedCausalAttention.apply(q, k, v, 4).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|not have been used in the graph"):
        torch.autograd.grad(grad_q.square().sum(), q)


def test_chunked_attention_without_gradients_keeps_one_chunk_of_weights_at_a_time(monkeypatch):
    """Prefill and evaluation run without gradients: each chunk's attention weights are freed before
    the next chunk's are made (with gradients all of them stay, for backward)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    import lmforge.attention as attn_mod

    monkeypatch.setattr(attn_mod, "ATTENTION_CHUNK", 4)

    class MostAlive(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.weights, self.most = [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._softmax.default:
                self.weights.append(weakref.ref(out))
                self.most = max(self.most, sum(w() is not None for w in self.weights))
            return out

    q, k, v = _qkv(nkv=2, t=16)  # four chunks
    for grad, want in ((False, 1), (True, 4)):
        with torch.set_grad_enabled(grad), MostAlive() as seen:
            attention(q, k, v)
        assert seen.most == want


def test_chunked_attention_caches_only_full_chunks_biases(monkeypatch):
    """Prompts of every length must not fill the process with causal biases: only full chunks'
    (the same few at every layer of every training step) are kept."""
    import lmforge.attention as attn_mod

    monkeypatch.setattr(attn_mod, "ATTENTION_CHUNK", 4)
    attn_mod._full_chunk_bias.cache_clear()
    with torch.no_grad():
        for t in range(5, 13):  # partial last chunks of 1, 2, 3 positions, and full ones
            q, k, v = _qkv(b=1, nh=2, nkv=2, t=t)
            attention(q, k, v)
    assert attn_mod._full_chunk_bias.cache_info().currsize == 3  # chunks [0, 4), [4, 8), [8, 12)


def test_chunked_attention_in_bf16_is_as_close_to_exact_as_the_formula(monkeypatch):
    """bf16 rounds, so no path is exact. The chunked one rounds what the formula rounds under
    autocast (the products' outputs; its softmax and sums are fp32), so it must be about as close to
    the fp64 formula as the bf16 formula is, in outputs and in every gradient, and within twice the
    error of PyTorch's fused kernel (which keeps the scores in fp32)."""
    import lmforge.attention as attn_mod

    q, k, v = _qkv(b=2, nh=6, nkv=2, t=40, hs=16, seed=3)
    grad = torch.randn(2, 6, 40, 16, generator=torch.Generator().manual_seed(4))
    exact_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = attention_reference(*exact_in)
    exact.backward(grad.double())
    want = [exact] + [t.grad for t in exact_in]

    def errors(attend, limit=1024):
        monkeypatch.setattr(attn_mod, "CHUNKED_ATTENTION_MAX", limit)
        monkeypatch.setattr(attn_mod, "ATTENTION_CHUNK", 16)
        inputs = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
        out = attend(*inputs)
        out.backward(grad.bfloat16())
        got = [out] + [t.grad for t in inputs]
        return [(a.double() - b).abs().mean().item() for a, b in zip(got, want)]

    chunked, formula, fused = errors(attention), errors(attention_reference), errors(attention, limit=0)
    for c, r, f in zip(chunked, formula, fused):
        assert c <= 1.2 * r and c <= 2 * f, (chunked, formula, fused)


def test_chunked_attention_under_autocast_gives_the_fp32_models_gradients():
    """A model in fp32 under bf16 autocast (how fine-tuning runs on the CPU): the chunked path takes
    bf16 q, k, v and hands back gradients close to the fp32 step's."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, context_length=32, d_model=32, n_layer=2, n_head=4, n_kv_head=2)
    model = GPT(cfg)
    idx = torch.randint(0, 50, (2, 24))
    model(idx, targets=idx).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx, targets=idx).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=2e-2, rtol=5e-2, msg=n)


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


def test_rotary_tables_are_buffers_kept_out_of_checkpoints():
    """cos/sin follow the model across devices (buffers) but are not saved: checkpoints and
    HF exports hold the same keys as a learned-position model minus wpe."""
    cfg = ModelConfig(vocab_size=50, context_length=16, d_model=32, n_layer=1, n_head=4, positions="rope")
    model = GPT(cfg)
    assert {n for n, _ in model.named_buffers()} == {"rotary.cos", "rotary.sin"}
    assert not any(k.startswith("rotary") for k in model.state_dict())


def test_rotary_tables_are_built_on_the_device_asked_for():
    from lmforge.attention import RotaryEmbedding

    rope = RotaryEmbedding(head_dim=4, max_len=8)
    cos, sin = rope(0, 8, torch.device("meta"))
    assert cos.device.type == "meta" and sin.device.type == "meta" and cos.shape == (8, 4)
    cos, sin = rope(2, 3, torch.device("cpu"))  # a new device rebuilds the tables there
    assert cos.device.type == "cpu" and cos.shape == (3, 4)
    assert cos[0, 0].item() == pytest.approx(math.cos(2.0)) and sin[2, 0].item() == pytest.approx(math.sin(4.0))


def test_rotary_keeps_the_input_dtype():
    from lmforge.attention import RotaryEmbedding, apply_rotary

    cos, sin = RotaryEmbedding(head_dim=4, max_len=8)(0, 8, torch.device("cpu"))
    x = torch.randn(1, 2, 8, 4).to(torch.bfloat16)
    out = apply_rotary(x, cos, sin)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), apply_rotary(x.float(), cos, sin), atol=2e-2, rtol=2e-2)


def test_reference_attention_dropout_only_in_training():
    q, k, v = _qkv(b=1, nh=2, nkv=2, t=6, hs=4)
    plain = attention_reference(q, k, v)
    torch.testing.assert_close(attention_reference(q, k, v, dropout_p=0.5), plain)   # not training: no dropout
    torch.testing.assert_close(attention_reference(q, k, v, training=True), plain)   # default p is 0
    torch.manual_seed(0)
    dropped = attention_reference(q, k, v, dropout_p=0.5, training=True)
    assert not torch.allclose(dropped, plain)


def test_reference_attention_keeps_dtype_and_device():
    q, k, v = (t.detach().to(torch.bfloat16) for t in _qkv(b=1, nh=2, nkv=1, t=5, hs=4))
    out = attention_reference(q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attention_reference(q.float(), k.float(), v.float()), atol=3e-2,
                               rtol=3e-2)
    meta = [torch.empty(1, 2, 3, 4, device="meta") for _ in range(3)]
    assert attention_reference(*meta).device.type == "meta"  # the mask is made where the scores are
    from lmforge.attention import causal_mask

    assert causal_mask(2, 3, torch.device("meta")).device.type == "meta"


def test_kv_cache_layout_and_capacity():
    cfg = ModelConfig(vocab_size=50, context_length=32, d_model=32, n_layer=3, n_head=4, n_kv_head=2)
    cache = KVCache(cfg, batch_size=2, max_len=6, device="meta", dtype=torch.bfloat16)
    assert len(cache.k) == len(cache.v) == 3
    for t in cache.k + cache.v:
        assert t.shape == (2, 2, 6, 8) and t.dtype == torch.bfloat16 and t.device.type == "meta"
    assert KVCache(cfg, batch_size=1).max_len == 32  # the context length by default
    cache = KVCache(cfg, batch_size=1, max_len=4)
    k = torch.ones(1, 2, 4, 8)
    keys, values = cache.update(0, k, 2 * k)  # filling it exactly is fine
    assert keys.shape == (1, 2, 4, 8) and torch.equal(values, 2 * k)
    cache.advance(4)
    with pytest.raises(ValueError, match="KV cache is full"):
        cache.update(0, k[:, :, :1], k[:, :, :1])


def test_module_calls_the_chosen_path_with_its_dropout(monkeypatch):
    """``fast`` picks the kernel (the reference-path tests depend on it), and the module's
    dropout and training mode reach it."""
    import lmforge.attention as attn_mod

    calls = []

    def spy(name):
        def run(q, k, v, dropout_p=0.0, training=False, mask=None):
            calls.append((name, dropout_p, training))
            return attention_reference(q, k, v)
        return run

    monkeypatch.setattr(attn_mod, "attention", spy("fast"))
    monkeypatch.setattr(attn_mod, "attention_reference", spy("reference"))
    cfg = ModelConfig(vocab_size=50, context_length=16, d_model=32, n_layer=1, n_head=4, dropout=0.25)
    module = MultiHeadAttention(cfg)
    assert module.fast is True and module.layer == 0  # the fused kernel by default; a lone module is layer 0
    x = torch.randn(1, 3, 32)
    module.train()(x)
    module.fast = False
    module.eval()(x)
    assert calls == [("fast", 0.25, True), ("reference", 0.25, False)]


def test_low_precision_cache_with_a_float32_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, context_length=16, d_model=32, n_layer=2, n_head=4, n_kv_head=2)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(cfg, batch_size=1, dtype=torch.bfloat16)
        parts = torch.cat([model(idx[:, :5], cache), model(idx[:, 5:], cache)], dim=1)
    assert parts.dtype == torch.float32
    torch.testing.assert_close(parts, full, atol=0.05, rtol=0.05)  # keys and values rounded to bf16


@pytest.mark.parametrize("t_q", [6, 1, 3], ids=["prefill", "one-token", "chunk-after-cache"])
@pytest.mark.parametrize("attend", [attention, attention_reference], ids=["fast", "reference"])
def test_dropout_only_in_training_on_every_branch(attend, t_q):
    q, k, v = (t.detach() for t in _qkv(b=1, nh=2, nkv=2, t=6, hs=4))
    q = q[:, :, -t_q:]
    plain = attend(q, k, v)
    torch.testing.assert_close(attend(q, k, v, dropout_p=0.5), plain)   # not training: no dropout
    torch.testing.assert_close(attend(q, k, v, training=True), plain)   # the default p is 0
    torch.manual_seed(0)
    assert not torch.allclose(attend(q, k, v, dropout_p=0.5, training=True), plain)


def test_fast_attention_mask_on_the_query_device():
    q = torch.empty(1, 2, 3, 4, device="meta")
    k = v = torch.empty(1, 2, 5, 4, device="meta")
    assert attention(q, k, v).shape == (1, 2, 3, 4)


def test_padded_positions_and_mask_by_hand():
    """Two rows, the second with two padding columns, three queries over three keys: the padded row
    counts positions from its first real token and never attends to its padding (a padding query
    sees only itself)."""
    from lmforge.attention import padded_positions_and_mask

    pos, mask = padded_positions_and_mask(torch.tensor([0, 2]), torch.arange(3), 3)
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert mask.shape == (2, 1, 3, 3)
    assert mask[0, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert mask[1, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    # a later step (static cache of 5 columns, query column 3): the padded row sees columns 2 and 3
    pos, mask = padded_positions_and_mask(torch.tensor([0, 2]), torch.tensor([3]), 5)
    assert pos.tolist() == [[3], [1]] and mask[1, 0].int().tolist() == [[0, 0, 1, 1, 0]]
