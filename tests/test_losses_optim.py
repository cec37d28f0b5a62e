import math

import pytest
import torch

from lmforge.config import ModelConfig, TrainConfig
from lmforge.losses import cross_entropy_reference, linear_cross_entropy
from lmforge.model import GPT
from lmforge.optim import lr_at, make_optimizer, param_groups


def _inputs(seed=0, n=300, d=32, v=1000):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    t[::7] = -100
    return h, w, t


def test_fused_loss_equals_reference_in_fp32():
    h, w, t = _inputs()
    ref = cross_entropy_reference(h, w, t)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    for chunk in (64, 300, 1000):
        loss = linear_cross_entropy(h, w, t, chunk_rows=chunk)
        (loss * 3).backward()  # a non-unit upstream gradient
        torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(h.grad, 3 * gh, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(w.grad, 3 * gw, atol=1e-6, rtol=1e-5)
        h.grad = w.grad = None


def test_fused_loss_under_bf16_autocast_is_close():
    h, w, t = _inputs(1)
    ref = cross_entropy_reference(h, w, t)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk_rows=100)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 0.02 * ref.item()
    assert (h.grad - gh).abs().max() < 0.02 * gh.abs().max()
    assert (w.grad - gw).abs().max() < 0.02 * gw.abs().max()


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert math.isclose(lr_at(60, cfg), 0.55)
    assert math.isclose(lr_at(110, cfg), 0.1) and math.isclose(lr_at(500, cfg), 0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 120))


def test_decay_groups():
    model = GPT(ModelConfig.from_preset("gpt-nano"))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_fused_adamw_equals_foreach():
    torch.manual_seed(0)
    a = GPT(ModelConfig.from_preset("gpt-nano"))
    b = GPT(ModelConfig.from_preset("gpt-nano"))
    b.load_state_dict(a.state_dict())
    cfg = TrainConfig(lr=1e-2)
    oa, ob = make_optimizer(a, cfg, fused=True), make_optimizer(b, cfg, fused=False)
    assert oa.defaults.get("fused") and not ob.defaults.get("fused")
    assert ob.defaults.get("foreach") is True  # the fallback is the multi-tensor kernel, not a per-tensor loop
    assert make_optimizer(a, cfg).defaults.get("fused") is True  # the default picks the fused kernel (CPU has one)
    x = torch.randint(0, 512, (2, 16))
    for m, o in ((a, oa), (b, ob)):
        for _ in range(3):
            m(x).float().logsumexp(-1).mean().backward()
            o.step()
            o.zero_grad()
    # Adam divides by sqrt(v) + eps: for gradients near eps the two kernels' rounding differs, so
    # compare within 1 % of one step's size (lr), far below what a wrong update would move.
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-4, rtol=0)


def test_fused_weight_gradient_adds_to_an_existing_grad():
    for autocast in (False, True):
        h, w, t = _inputs(2)
        ref = cross_entropy_reference(h, w, t)
        (ref * 0.5).backward()
        gh, gw = h.grad.clone(), w.grad.clone()
        h.grad = None
        w.grad = torch.ones_like(w)  # accumulation adds to what is there
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = linear_cross_entropy(h, w, t, chunk_rows=128)
        (loss * 0.5).backward()
        tol = 0.02 * gw.abs().max().item() if autocast else 1e-6
        assert (w.grad - 1 - gw).abs().max() < tol
        assert (h.grad - gh).abs().max() < (0.02 * gh.abs().max().item() if autocast else 1e-6)


def test_training_speedups_keep_the_gradients():
    from lmforge.train import prepare_for_training

    for tie in (True, False):
        torch.manual_seed(0)
        a = GPT(ModelConfig.from_preset("gpt-nano", tie_embeddings=tie))
        b = GPT(ModelConfig.from_preset("gpt-nano", tie_embeddings=tie))
        b.load_state_dict(a.state_dict())
        prepare_for_training(b)
        x, y = torch.randint(0, 512, (3, 32)), torch.randint(0, 512, (3, 32))
        a(x, targets=y, fused=False).backward()
        b(x, targets=y).backward()
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert pb.grad.layout == torch.strided, name
            torch.testing.assert_close(pb.grad, pa.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_two_losses_before_one_backward():
    """Kept buffers must not be shared by two graphs waiting for backward (DPO-style losses)."""
    h, w, t = _inputs(3)
    ref = cross_entropy_reference(h[:150], w, t[:150]) + 2 * cross_entropy_reference(h[150:], w, t[150:])
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    for _ in range(2):  # also after a first round has released the buffer
        loss = linear_cross_entropy(h[:150], w, t[:150]) + 2 * linear_cross_entropy(h[150:], w, t[150:])
        loss.backward()
        torch.testing.assert_close(h.grad, gh, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(w.grad, gw, atol=1e-6, rtol=1e-5)
        h.grad = w.grad = None


def test_bits_per_byte_known_answer():
    """A model that predicts uniformly scores log2(V) bits per token, spread over the bytes."""
    from lmforge.config import TokenizerConfig
    from lmforge.evaluate import bits_per_byte
    from lmforge.tokenizer import Tokenizer

    from conftest import TEXT

    tok = Tokenizer.train([TEXT * 10], TokenizerConfig(vocab_size=300))
    model = GPT(ModelConfig.from_preset("gpt-nano", vocab_size=300, context_length=16, tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    text = TEXT * 3
    res = bits_per_byte(model, tok, text, window=16)
    ids = tok.encode(text)
    assert res["tokens"] == len(ids) - 1
    expected = math.log2(300) * (len(ids) - 1) / len(tok.decode_bytes(ids[1:]))
    assert abs(res["bits_per_byte"] - expected) < 1e-5


def test_custom_ignore_index_on_both_paths():
    h, w, t = _inputs(4, n=40, v=50)
    t = t.clamp(min=0)
    t[::3] = 7  # 7 marks the masked positions here
    keep = t != 7
    expected = cross_entropy_reference(h[keep], w, t[keep]).item()
    assert cross_entropy_reference(h, w, t, ignore_index=7).item() == pytest.approx(expected, rel=1e-6)
    assert linear_cross_entropy(h, w, t, ignore_index=7).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_fused_loss_with_only_one_input_needing_a_gradient(which):
    h, w, t = _inputs(5, n=60, v=80)
    ref = cross_entropy_reference(h, w, t)
    ref.backward()
    want = (h if which == "hidden" else w).grad.clone()
    h, w = h.detach().requires_grad_(which == "hidden"), w.detach().requires_grad_(which == "weight")
    loss = linear_cross_entropy(h, w, t, chunk_rows=16)
    torch.testing.assert_close(loss, ref.detach(), atol=1e-6, rtol=1e-6)
    loss.backward()
    got, other = (h, w) if which == "hidden" else (w, h)
    torch.testing.assert_close(got.grad, want, atol=1e-6, rtol=1e-5)
    assert other.grad is None


@pytest.mark.parametrize("tie", [True, False])
def test_output_layer_gradient_goes_through_autograd(tie):
    """The fused loss hands the output layer's gradient to autograd like any function (once per
    backward, so DDP's and the user's hooks see it), tied or untied, and it equals the plain loss's."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, context_length=8, d_model=16, n_layer=1, n_head=2, tie_embeddings=tie))
    x, y = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    model(x, targets=y, fused=False).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    seen = []
    model.lm_head.weight.register_hook(lambda g: seen.append(tuple(g.shape)))
    model(x, targets=y).backward()
    assert seen == [(64, 16)]
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-6, rtol=1e-5, msg=n)


def test_frozen_output_layer_gets_no_gradient_and_the_rest_the_plain_ones():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, context_length=8, d_model=16, n_layer=1, n_head=2, tie_embeddings=False))
    model.lm_head.weight.requires_grad_(False)
    x, y = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    model(x, targets=y, fused=False).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    model(x, targets=y).backward()
    assert model.lm_head.weight.grad is None
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[n], atol=1e-6, rtol=1e-5, msg=n)


def test_two_losses_before_one_backward_under_bf16():
    h, w, t = _inputs(7, n=64, v=50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = linear_cross_entropy(h[:32], w, t[:32]) + linear_cross_entropy(h[32:], w, t[32:])
    ref.backward()
    gw = w.grad.clone()
    w.grad = h.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = linear_cross_entropy(h[:32], w, t[:32])
        second = linear_cross_entropy(h[32:], w, t[32:])  # made before the first is backwarded
    (first + second).backward()
    torch.testing.assert_close(w.grad, gw)


@pytest.mark.slow
def test_a_training_step_touches_no_new_memory_after_the_first():
    """The fused loss makes fresh tensors every call (correct by construction); its speed on the
    CPU comes from the allocator fit() tunes, which serves them from memory already mapped. Counted
    in page faults (not time): without the tuning, each step faults in its vocab x d gradient and
    logits afresh; with it, almost nothing."""
    import os
    import subprocess
    import sys

    script = """
import resource, sys, torch
from lmforge.precision import tune_cpu_allocator
from lmforge.config import ModelConfig
from lmforge.model import GPT
from lmforge.train import prepare_for_training
torch.manual_seed(0)
if sys.argv[1] == "tuned":
    tune_cpu_allocator()
model = GPT(ModelConfig(vocab_size=20000, context_length=64, d_model=128, n_layer=1, n_head=2))
prepare_for_training(model)
x, y = torch.randint(0, 20000, (4, 64)), torch.randint(0, 20000, (4, 64))
faults = []
for _ in range(7):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x, targets=y).backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
# the steady state: the median of the steps after the heap has grown (one step may still grow it now
# and then, by about one tensor, which a maximum would count: 2436 faults seen once in a full run)
print(sorted(faults[3:])[2])
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    counts = {mode: int(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                       check=True, env=env).stdout.split()[-1]) for mode in ("plain", "tuned")}
    pages = 20000 * 128 * 4 // 4096  # one vocab x d fp32 tensor: 2500 pages
    assert counts["plain"] > pages, counts  # the measurement sees the faults it should
    assert counts["tuned"] < pages // 10, counts


def test_fused_loss_without_gradients_sums_every_chunk():
    """Evaluation runs the fused loss under no_grad: every chunk must still count."""
    h, w, t = _inputs(9, n=50, v=30)
    expected = cross_entropy_reference(h, w, t).item()
    with torch.no_grad():
        assert linear_cross_entropy(h, w, t, chunk_rows=8).item() == pytest.approx(expected, rel=1e-6)
    assert linear_cross_entropy(h.detach(), w.detach(), t, chunk_rows=8).item() == pytest.approx(expected, rel=1e-6)


def test_fused_loss_with_a_computed_weight():
    """A weight that is not a leaf (scaled, tied through a function, an adapter) gets its
    gradient through autograd."""
    h, w, t = _inputs(10, n=40, v=30)
    cross_entropy_reference(h, w * 2.0, t).backward()
    want = w.grad.clone()
    w.grad = None
    linear_cross_entropy(h, w * 2.0, t, chunk_rows=16).backward()
    torch.testing.assert_close(w.grad, want, atol=1e-6, rtol=1e-5)


def test_fused_loss_default_goes_through_autograd():
    """A weight's hooks (DDP's, say) see its gradient, once."""
    h, w, t = _inputs(11, n=20, v=30)
    seen = []
    w.register_hook(lambda g: None if g is None else seen.append(tuple(g.shape)))
    linear_cross_entropy(h, w, t).backward()
    assert seen == [(30, 32)]


def test_gradient_into_a_bfloat16_weight():
    h, w, t = _inputs(12, n=40, v=30)
    cross_entropy_reference(h, w, t).backward()
    want = w.grad.clone()
    w16 = w.detach().to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_cross_entropy(h.detach(), w16, t, chunk_rows=16).backward()
    assert w16.grad.dtype == torch.bfloat16
    assert (w16.grad.float() - want).abs().max() < 0.03 * want.abs().max()


def test_scaled_and_unscaled_backward_through_a_retained_graph():
    """loss.backward() hands autograd the saved hidden gradient itself; a scaled backward (gradient
    accumulation divides the loss) gets a scaled copy; neither changes what a second backward sees."""
    h, w, t = _inputs(11, n=24, v=30)
    ref_h, = torch.autograd.grad(cross_entropy_reference(h, w, t), h)
    loss = linear_cross_entropy(h, w, t)
    first, = torch.autograd.grad(loss, h, retain_graph=True)
    half, = torch.autograd.grad(loss * 0.5, h, retain_graph=True)
    again, = torch.autograd.grad(loss, h)
    torch.testing.assert_close(first, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(half, ref_h * 0.5, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, ref_h, rtol=1e-5, atol=1e-6)
