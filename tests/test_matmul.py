"""The oneDNN products (``lmforge.matmul``) against PyTorch's own, and every layer built on them
against its plain reference: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge import matmul
from lmforge.config import ModelConfig
from lmforge.lora import lora_linear, lora_linear_reference
from lmforge.model import GPT

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _rand(*shape, seed=0, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))
    return t.requires_grad_(grad)


@pytest.mark.skipif(not ONEDNN, reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("rows, inner, out", [(64, 48, 96), (300, 96, 40), (1024, 576, 1536)])
def test_the_onednn_products_are_as_accurate_as_torchs_in_fp32(rows, inner, out):
    x, w, b, g = _rand(rows, inner), _rand(out, inner, seed=1), _rand(out, seed=2), _rand(rows, out, seed=3)
    assert matmul._onednn(x, w) and matmul._onednn(g, w)  # the fast path is what is tested here
    exact = [F.linear(x.double(), w.double(), b.double()), x.double() @ w.double().T, g.double() @ w.double()]
    fast = [matmul.linear(x, w, b), matmul.linear(x, w), matmul.times_weight(g, w)]
    plain = [F.linear(x, w, b), x @ w.T, g @ w]
    for f, p, e in zip(fast, plain, exact, strict=True):
        assert f.dtype == torch.float32 and f.shape == e.shape
        # fp32 arithmetic both ways, summed in another order: rounding error within a small factor of
        # torch's own product (a bf16 or tf32 product would be off by a hundred times more)
        assert (f - e).abs().mean() <= 3 * (p - e).abs().mean() + 1e-7
        assert (f - e).abs().max() <= 5 * (p - e).abs().max() + 1e-6


def test_small_inputs_other_dtypes_and_compiled_code_take_torchs_own_products(monkeypatch):
    w = _rand(8, 16)
    assert not matmul._onednn(_rand(matmul.MIN_ROWS - 1, 16), w)  # decoding: one or a few rows
    assert not matmul._onednn(_rand(128, 16).bfloat16(), w.bfloat16())  # bf16 goes to oneDNN through torch
    assert not matmul._onednn(_rand(2, 64, 16), w)  # 3-D: callers flatten first
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not matmul._onednn(_rand(128, 16), w)
    x = _rand(5, 16)
    assert torch.equal(matmul.linear(x, w), F.linear(x, w)) and torch.equal(matmul.times_weight(x @ w.T, w),
                                                                             (x @ w.T) @ w)


def _grads(out: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    g = _rand(*out.shape, seed=7)
    return [out.detach()] + list(torch.autograd.grad(out, [t for t in inputs if t.requires_grad], g))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [4, 96])  # below and above MIN_ROWS
def test_linear_layer_equals_nn_linear_in_value_and_gradients(bias, rows):
    torch.manual_seed(0)
    fast = matmul.Linear(24, 40, bias=bias)
    plain = nn.Linear(24, 40, bias=bias)
    plain.load_state_dict(fast.state_dict())
    x = _rand(2, rows // 2, 24, grad=True)
    got = _grads(fast(x), x, *fast.parameters())
    want = _grads(plain(x), x, *plain.parameters())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    frozen = matmul.Linear(24, 40, bias=bias).requires_grad_(False)  # a frozen layer: only the input's gradient
    (gx,) = torch.autograd.grad(frozen(x).sum(), x)
    torch.testing.assert_close(gx, torch.ones(2, rows // 2, 40) @ frozen.weight, rtol=1e-5, atol=1e-5)


def test_linear_layer_under_autocast_is_exactly_f_linear():
    layer = matmul.Linear(24, 40)
    x = _rand(4, 32, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = layer(x), F.linear(x, layer.weight, layer.bias)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("rows", [6, 128])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("base_trains", [False, True])
def test_lora_layer_equals_its_op_by_op_reference(rows, dropout, bias, base_trains):
    x = _rand(2, rows // 2, 32, grad=True)
    w = _rand(48, 32, seed=1, grad=base_trains)
    b = _rand(48, seed=2, grad=base_trains) if bias else None
    a, bb = _rand(4, 32, seed=3, grad=True), _rand(48, 4, seed=4, grad=True)
    inputs = [t for t in (x, w, b, a, bb) if t is not None]
    results = []
    for fn in (lora_linear, lora_linear_reference):
        x_d = x * (torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) > 0.3) / 0.7 if dropout else None
        results.append(_grads(fn(x, x_d, w, b, a, bb, 0.75), *inputs))
    assert len(results[0]) == len(inputs) - (0 if base_trains else 1 + bias) + 1
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [2, 64])  # the plain products and oneDNN's
def test_lora_layer_known_answer(rows):
    """Worked by hand, so a formula wrong in both the layer and its reference still fails: x = (1, 2)
    on every row, W = [[1,0],[0,1],[1,1]], b = (0,0,1), A = [[1,1]], B = (1,0,2)ᵀ, s = 0.5.
    h = x·Aᵀ = 3; y = x Wᵀ + b + s·h·Bᵀ = (1,2,4) + (1.5,0,3) = (2.5, 2, 7). For loss = Σ y:
    d/dB = s·Σ h = 1.5·rows each; d/dA = s·(Σ B)·Σ x = 1.5·rows·(1, 2); d/dx = Σ W rows + s·(Σ B)·A = (3.5, 3.5)."""
    x = torch.tensor([[1.0, 2.0]]).repeat(rows, 1).requires_grad_(True)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([0.0, 0.0, 1.0])
    a = torch.tensor([[1.0, 1.0]], requires_grad=True)
    bb = torch.tensor([[1.0], [0.0], [2.0]], requires_grad=True)
    for fn in (lora_linear, lora_linear_reference):
        y = fn(x, None, w, b, a, bb, 0.5)
        gx, ga, gb = torch.autograd.grad(y.sum(), (x, a, bb))
        assert torch.equal(y, torch.tensor([[2.5, 2.0, 7.0]]).repeat(rows, 1))
        assert torch.equal(gb, torch.full((3, 1), 1.5 * rows))
        assert torch.equal(ga, torch.tensor([[1.5 * rows, 3.0 * rows]]))
        assert torch.equal(gx, torch.tensor([[3.5, 3.5]]).repeat(rows, 1))


def test_lora_layer_under_autocast_runs_in_bf16_and_stays_within_its_rounding():
    x = _rand(64, 32, grad=True)
    w, a, bb = _rand(48, 32, seed=1), _rand(4, 32, seed=3, grad=True), _rand(48, 4, seed=4, grad=True)
    results = []
    for fn in (lora_linear, lora_linear_reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, None, w, None, a, bb, 2.0)
        assert y.dtype == torch.bfloat16
        results.append(_grads(y.float(), x, a, bb))
    for got, want in zip(*results, strict=True):
        scale = want.abs().max()
        assert (got.float() - want.float()).abs().max() <= 2e-2 * scale  # a few bf16 roundings


@pytest.mark.parametrize("lora", [False, True])
def test_a_training_step_is_the_same_with_and_without_the_onednn_products(monkeypatch, lora):
    """A whole model (every layer, LoRA layers, the fused loss) with rows enough for oneDNN, against
    the same model with the fast path switched off: the same loss and gradients."""
    from lmforge.lora import apply_lora

    def step(min_rows):
        monkeypatch.setattr(matmul, "MIN_ROWS", min_rows)
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=300, context_length=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                                norm="rmsnorm", mlp="swiglu", positions="rope", bias=False, tie_embeddings=False))
        if lora:
            apply_lora(model, rank=4, alpha=8, targets=("attn", "mlp", "head"))
            for m in model.modules():
                if hasattr(m, "lora_B"):
                    nn.init.normal_(m.lora_B)  # B = 0 would hide a wrong A gradient
        g = torch.Generator().manual_seed(1)
        x, y = torch.randint(0, 300, (4, 64), generator=g), torch.randint(0, 300, (4, 64), generator=g)
        loss = model(x, targets=y)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss_fast, grads_fast = step(64)
    loss_plain, grads_plain = step(10**9)
    torch.testing.assert_close(loss_fast, loss_plain, rtol=1e-6, atol=1e-6)
    assert grads_fast.keys() == grads_plain.keys() and grads_fast
    for name, g in grads_fast.items():
        # fp32 rounding, relative to the gradient's own scale (single small entries differ relatively more)
        assert (g - grads_plain[name]).abs().max() <= 1e-5 * grads_plain[name].abs().max(), name


def _layers(rows_in: int = 24):
    from lmforge.lora import LoRALinear

    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(rows_in, 40), 4, 8.0)
    nn.init.normal_(lora.lora_B)
    return {"linear": matmul.Linear(rows_in, 40), "lora": lora}


@pytest.mark.parametrize("kind", ["linear", "lora"])
def test_a_layers_output_can_be_changed_in_place_as_nn_linears_can(kind):
    layer = _layers()[kind]
    x = _rand(2, 48, 24, grad=True)
    y = layer(x)
    y.mul_(2)  # a custom Function's own views refuse this; the layers' outputs must not be such views
    y[..., 0] = 0
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("kind", ["linear", "lora"])
def test_a_frozen_layer_keeps_no_copy_of_its_input_for_backward(kind):
    """A frozen base weight needs no gᵀx: like nn.Linear, the layer saves no (N, in) activation
    beyond what LoRA's A needs."""
    layer = _layers()[kind]
    layer.weight.requires_grad_(False)
    if layer.bias is not None:
        layer.bias.requires_grad_(False)
    x = _rand(2, 48, 24, grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    inputs = [t for t in saved if t.shape[-1] == 24 and t.numel() == x.numel()]
    assert len(inputs) == (1 if kind == "lora" else 0)  # LoRA keeps x once, for A's gradient


@pytest.mark.parametrize("kind", ["linear", "lora"])
def test_layers_compile_in_one_graph_with_the_eager_values_and_gradients(kind):
    layer = _layers()[kind]
    x = _rand(2, 48, 24, grad=True)
    want = _grads(layer(x), x, *[p for p in layer.parameters() if p.requires_grad])
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # a graph break would raise here
    got = _grads(compiled(x), x, *[p for p in layer.parameters() if p.requires_grad])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_lora_layer_runs_on_the_meta_device():
    from lmforge.lora import LoRALinear

    with torch.device("meta"):
        layer = LoRALinear(nn.Linear(8, 6), 2, 4.0)
        assert layer(torch.empty(3, 5, 8)).shape == (3, 5, 6)
