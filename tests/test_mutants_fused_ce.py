"""Tests written to kill mutmut survivors in fused_ce.py (docs/DEVELOPING.md, mutation testing).

The fused loss's values are covered by the known-answer and reference tests; what those cannot
see is where its work happens (the device of every buffer: the CPU suite would not notice a
buffer made on the CPU for a GPU run), how much memory one chunk takes, and whether several
losses alive at once keep their own gradients. These tests check each directly."""

import pytest
import torch

from lmforge import fused_ce
from lmforge.fused_ce import cross_entropy_reference, linear_cross_entropy


def _inputs(seed=0, n=60, d=16, v=50, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_(True)
    w = torch.randn(v, d, generator=g).to(dtype).requires_grad_(True)
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = -100
    return h, w, t


@pytest.fixture
def recorded_apply(monkeypatch):
    """Replaces the kernel by a recorder of what linear_cross_entropy hands it."""
    calls = []

    def record(hidden, weight, targets, ignore_index, rows, compute_dtype):
        calls.append({"shape": tuple(hidden.shape), "targets": tuple(targets.shape), "ignore": ignore_index,
                      "rows": rows, "dtype": compute_dtype})
        return torch.zeros(())

    monkeypatch.setattr(fused_ce._LinearCrossEntropy, "apply", staticmethod(record))
    return calls


@pytest.mark.parametrize("v, dtype, n, rows", [
    (2**16, torch.float32, 4096, 512),     # 128 MB of fp32 logits: 2**27 / (65536 * 4) rows
    (2**16, torch.bfloat16, 4096, 1024),   # half the bytes per logit, twice the rows
    (2**16, torch.float32, 300, 300),      # never more rows than there are
    (2**21, torch.float32, 4096, 64),      # a huge vocabulary: still 64 rows a chunk, not 16
    (1000, torch.float32, 10, 64),         # few rows: the floor (the kernel slices it to 10)
    (1000, torch.float32, 40000, 33554),   # 2**27 / 4000 is not a whole number of rows
])
def test_default_chunk_holds_128_MB_of_logits_and_at_least_64_rows(recorded_apply, v, dtype, n, rows):
    h = torch.zeros(n, 1)
    w = torch.zeros(1, 1).expand(v, 1)  # only its shape matters here
    linear_cross_entropy(h, w, torch.zeros(n, dtype=torch.long), compute_dtype=dtype)
    assert recorded_apply[-1]["rows"] == rows and type(recorded_apply[-1]["rows"]) is int  # range() needs an int


def test_what_the_wrapper_hands_the_kernel(recorded_apply):
    h = torch.zeros(2, 3, 4)
    w = torch.zeros(5, 4, requires_grad=True)
    t = torch.zeros(2, 3, dtype=torch.long)
    linear_cross_entropy(h, w, t, chunk_rows=7, ignore_index=3)
    assert recorded_apply[-1] == {"shape": (6, 4), "targets": (6,), "ignore": 3, "rows": 7, "dtype": torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_cross_entropy(h, w, t)
    assert recorded_apply[-1]["dtype"] == torch.bfloat16
    linear_cross_entropy(h.double(), w.double(), t)  # without autocast, the inputs' own precision
    assert recorded_apply[-1]["dtype"] == torch.float64


def test_masked_positions_never_reach_the_output_layer(recorded_apply):
    """On the CPU, only rows with a target are handed to the kernel (a prompt's positions cost nothing)."""
    h = torch.zeros(2, 5, 4)
    t = torch.tensor([[-100, -100, 1, 2, 3], [-100, 4, 0, -100, -100]])
    linear_cross_entropy(h, torch.zeros(7, 4), t)
    assert recorded_apply[-1]["shape"] == (5, 4) and recorded_apply[-1]["targets"] == (5,)
    linear_cross_entropy(h, torch.zeros(7, 4), torch.full((2, 5), -100))  # none valid: the kernel's own zero
    assert recorded_apply[-1]["shape"] == (10, 4)


def test_an_empty_batch_has_zero_loss_and_a_zero_weight_gradient():
    h = torch.zeros(0, 4, requires_grad=True)
    w = torch.randn(7, 4, requires_grad=True)
    torch.full((7, 4), float("nan"))  # freed at once: the next block of its size likely reuses its bytes
    loss = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and w.grad.abs().max() == 0  # not the uninitialised sum buffer


@pytest.mark.parametrize("cap", [None, 5.0])
def test_a_mostly_masked_batch_gives_the_references_loss_and_gradients(cap):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 40, 16, generator=g, requires_grad=True)
    w = torch.randn(90, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 90, (3, 40), generator=g)
    t[:, :25] = -100  # a prompt of 25 positions in every row
    t[2, 30:] = -100  # and padding
    got = linear_cross_entropy(h, w, t, chunk_rows=16, cap=cap)
    got_grads = torch.autograd.grad(got, (h, w))
    want = cross_entropy_reference(h, w, t, cap=cap)
    want_grads = torch.autograd.grad(want, (h, w))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)
    assert got_grads[0][:, :25].abs().max() == 0  # masked positions get no gradient


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_every_buffer_and_gradient_lives_on_the_inputs_device(compute_dtype, need):
    """On the meta device (shapes, dtypes and devices without data): a buffer or gradient made on
    the CPU by mistake would fail here, as it would on a GPU."""
    n, d, v = 70, 8, 30
    h = torch.empty(n, d, device="meta", requires_grad=need[0])
    w = torch.empty(v, d, device="meta", requires_grad=need[1])
    t = torch.empty(n, dtype=torch.long, device="meta")
    made = []  # every tensor the kernel makes: (device, shape, dtype)
    real_empty = torch.empty

    def spy(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        made.append((out.device.type, tuple(out.shape), out.dtype))
        return out

    torch.empty = spy
    try:
        loss = fused_ce._LinearCrossEntropy.apply(h, w, t, -100, 32, compute_dtype)
    finally:
        torch.empty = real_empty
    assert loss.device.type == "meta" and loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    for x, wanted in zip((h, w), need):
        if wanted:
            assert x.grad.device.type == "meta" and x.grad.dtype == torch.float32 and x.grad.shape == x.shape
        else:
            assert x.grad is None
    # Everything made on the inputs' device (meta kernels written in Python make tensors too);
    # among it one chunk's logits and log-probabilities (32 rows, not all 70) and the gradients.
    assert {dev for dev, _, _ in made} == {"meta"}
    wanted = [*([((n, d), torch.float32)] if need[0] else []), *([((v, d), compute_dtype)] if need[1] else []),
              ((32, v), compute_dtype), ((32, v), compute_dtype)]
    shapes = [(shape, dtype) for _, shape, dtype in made]
    for item in wanted:
        assert item in shapes, item
        shapes.remove(item)
    assert ((70, v), compute_dtype) not in shapes  # never the whole logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_on_the_meta_device_keep_the_inputs_dtypes(dtype):
    h = torch.empty(40, 8, device="meta", dtype=dtype, requires_grad=True)
    w = torch.empty(30, 8, device="meta", dtype=dtype, requires_grad=True)
    t = torch.empty(40, dtype=torch.long, device="meta")
    loss = fused_ce._LinearCrossEntropy.apply(h, w, t, -100, 16, torch.bfloat16)
    loss.backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert h.grad.device.type == w.grad.device.type == "meta"


def test_loss_and_gradients_do_not_depend_on_the_chunk_size():
    h, w, t = _inputs(2, n=45, v=37)
    ref = cross_entropy_reference(h, w, t)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    for rows in (1, 2, 7, 44, 45, 46, 1000):
        h.grad = w.grad = None
        loss = linear_cross_entropy(h, w, t, chunk_rows=rows)
        (loss * 0.5).backward()
        torch.testing.assert_close(loss, ref.detach(), msg=str(rows))
        torch.testing.assert_close(h.grad, gh * 0.5, msg=str(rows))
        torch.testing.assert_close(w.grad, gw * 0.5, msg=str(rows))


def test_losses_freed_in_any_order_keep_their_own_gradients():
    """Several losses alive at once (micro-batches, preference pairs), freed in another order
    than made: each keeps its own gradients, whatever the others do."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(4, 20, 8, generator=g, requires_grad=True)
    w = torch.randn(30, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 30, (4, 20), generator=g)
    cross_entropy_reference(h[2], w, t[2]).backward()
    want = w.grad.clone()
    w.grad = None
    a = linear_cross_entropy(h[0], w, t[0])
    b = linear_cross_entropy(h[1], w, t[1])
    del a
    c = linear_cross_entropy(h[2], w, t[2])
    del b
    linear_cross_entropy(h[3], w, t[3])
    c.backward()
    torch.testing.assert_close(w.grad, want)


def test_a_batch_with_every_position_ignored_has_zero_loss_and_zero_gradients():
    """A batch of padding only (every target ignored): loss 0 and zero gradients, not 0/0 = NaN."""
    h, w, _ = _inputs(4, n=12, v=9)
    t = torch.full((12,), -100)
    loss = linear_cross_entropy(h, w, t, chunk_rows=5)
    assert loss.item() == 0.0
    loss.backward()
    assert h.grad.abs().max().item() == 0.0 and w.grad.abs().max().item() == 0.0


def test_one_valid_position_is_its_own_mean():
    """One valid row among ignored ones: the mean is over that one row (n_valid = 1, not clamped up)."""
    h, w, _ = _inputs(5, n=6, v=9)
    t = torch.full((6,), -100)
    t[4] = 7
    want = -torch.log_softmax(h[4] @ w.T, -1)[7]
    loss = linear_cross_entropy(h, w, t, chunk_rows=4)
    torch.testing.assert_close(loss, want)
    loss.backward()
    p = torch.softmax(h[4] @ w.T, -1).detach()
    torch.testing.assert_close(h.grad[4], p @ w.detach() - w.detach()[7])
    assert h.grad[[0, 1, 2, 3, 5]].abs().max().item() == 0.0


def test_two_losses_on_the_meta_device_keep_their_gradients_there():
    h = torch.empty(40, 8, device="meta", requires_grad=True)
    w = torch.empty(30, 8, device="meta", requires_grad=True)
    t = torch.empty(40, dtype=torch.long, device="meta")
    first = fused_ce._LinearCrossEntropy.apply(h, w, t, -100, 16, torch.float32)
    second = fused_ce._LinearCrossEntropy.apply(h, w, t, -100, 16, torch.float32)
    (first + second).backward()
    assert w.grad.device.type == "meta" and h.grad.device.type == "meta"


def test_accumulated_weight_gradient_is_not_overwritten_by_the_next_forward():
    """Gradient accumulation: the weight's .grad after one backward must be a tensor of its own,
    which the next micro-batch's forward does not touch."""
    h, w, t = _inputs(6, n=64, v=50)
    cross_entropy_reference(h[:32], w, t[:32]).backward()
    cross_entropy_reference(h[32:], w, t[32:]).backward()
    want = w.grad.clone()
    w.grad = None
    linear_cross_entropy(h[:32], w, t[:32], chunk_rows=16).backward()
    after_first = w.grad.clone()
    second = linear_cross_entropy(h[32:], w, t[32:], chunk_rows=16)
    assert torch.equal(w.grad, after_first)
    second.backward()
    torch.testing.assert_close(w.grad, want)


def test_hidden_gradient_keeps_the_hiddens_precision_with_a_bfloat16_weight():
    """fp32 hidden states, a bf16 output weight: the hidden's gradient is computed and returned in
    fp32, not rounded through the weight's bf16 on the way."""
    h, w, t = _inputs(7, n=64, d=32, v=50)
    w16 = w.detach().to(torch.bfloat16).requires_grad_(True)
    loss = linear_cross_entropy(h, w16, t, compute_dtype=torch.bfloat16)
    (loss * 3).backward()
    assert h.grad.dtype == torch.float32 and w16.grad.dtype == torch.bfloat16
    # (bf16 products, then fp32 arithmetic: most values are not bf16 numbers)
    assert (h.grad != h.grad.to(torch.bfloat16).float()).float().mean() > 0.5
    h.grad = None
    cross_entropy_reference(h, w16.float(), t).backward()
    gh = h.grad.clone()
    h.grad = None
    (linear_cross_entropy(h, w16, t, compute_dtype=torch.bfloat16) * 3).backward()
    assert (h.grad - 3 * gh).abs().max() < 0.03 * (3 * gh).abs().max()


def test_an_explicit_half_precision_is_the_precision_used():
    """compute_dtype=float16 outside autocast: the products are fp16 (10-bit mantissa), not the
    device's autocast default (bf16 on the CPU, 7 bits): the error against fp32 shows which."""
    h, w, t = _inputs(0, n=64, d=32, v=50)
    ref = cross_entropy_reference(h, w, t)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss = linear_cross_entropy(h, w, t, compute_dtype=torch.float16)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 2e-3  # bf16: about 6e-3
    assert (h.grad - gh).abs().max() < 3e-3 * gh.abs().max()  # fp16: 1e-3; bf16: 1.2e-2
    assert (w.grad - gw).abs().max() < 2e-3 * gw.abs().max()  # fp16: 6e-4; bf16: 6e-3


def test_backward_twice_through_a_retained_graph():
    """backward(retain_graph=True) leaves what the graph saved as it was: a second backward adds
    the same gradients again."""
    h, w, t = _inputs(8, n=40, v=30)
    cross_entropy_reference(h, w, t).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss = linear_cross_entropy(h, w, t, chunk_rows=16)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * gh)
    torch.testing.assert_close(w.grad, 2 * gw)


def test_independent_of_torchs_default_dtype():
    """With torch's default dtype set to float64 (as scientific code does), fp32 inputs still give
    an fp32 loss and the same values: nothing in the kernel is made in "the default dtype"."""
    h, w, t = _inputs(9, n=40, v=30)
    ref = cross_entropy_reference(h, w, t)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        loss = linear_cross_entropy(h, w, t, chunk_rows=16)
        loss.backward()
    finally:
        torch.set_default_dtype(old)
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, gh)
    torch.testing.assert_close(w.grad, gw)


def test_every_chunk_writes_into_a_buffer_of_its_own_shape():
    """The logits, log-probabilities and gradient buffers are made to the shapes the products write:
    torch would silently resize a wrong one (and warn), costing a fresh allocation per chunk."""
    import warnings

    h, w, t = _inputs(1, n=40, d=16, v=41)  # vocabulary != width; a short last chunk (40 = 16 + 16 + 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = linear_cross_entropy(h, w, t, chunk_rows=16)
        loss.backward()
    ref = cross_entropy_reference(h.detach().requires_grad_(), w, t)
    torch.testing.assert_close(loss, ref)
