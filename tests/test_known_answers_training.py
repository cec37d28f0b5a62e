"""Known answers for training: the loss, AdamW, the learning-rate schedule and the learning
rate the loop really uses. Expected values are worked out by hand or in plain Python here."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lmforge.config import ModelConfig, TrainConfig
from lmforge.losses import cross_entropy_reference, linear_cross_entropy, next_token_loss
from lmforge.model import GPT
from lmforge.optim import lr_at, make_optimizer, param_groups


# ----------------------------------------------------------------------------- the loss
def _softmax(row: list[float]) -> list[float]:
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


# Two positions, three-token vocabulary. W = I, so the logits are the hidden states.
H = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
Y = [2, 0]
LOSS_0 = math.log(math.e + math.e ** 2 + math.e ** 3) - 3.0   # -log softmax([1, 2, 3])[2]
LOSS_1 = math.log(3.0)                                        # uniform over three tokens


def _loss_fns():
    return [("reference", cross_entropy_reference),
            ("fused", linear_cross_entropy),
            ("fused-1-row-chunks", lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows=1))]


@pytest.mark.parametrize("name,fn", _loss_fns(), ids=[n for n, _ in _loss_fns()])
def test_cross_entropy_known_answer_and_gradients(name, fn):
    h = torch.tensor(H, requires_grad=True)
    w = torch.eye(3, requires_grad=True)
    loss = fn(h, w, torch.tensor(Y))
    assert loss.item() == pytest.approx((LOSS_0 + LOSS_1) / 2, abs=1e-6)
    (2.0 * loss).backward()
    # d loss / d logits_n = (softmax_n - onehot_n) / N; with W = I that is d/dh, and d/dW = Σ_n g_nᵀ h_n.
    g = [[(p - (j == Y[n])) / 2 for j, p in enumerate(_softmax(H[n]))] for n in range(2)]
    assert torch.allclose(h.grad, 2 * torch.tensor(g), atol=1e-6)
    gw = [[2 * sum(g[n][i] * H[n][j] for n in range(2)) for j in range(3)] for i in range(3)]
    assert torch.allclose(w.grad, torch.tensor(gw), atol=1e-6)


@pytest.mark.parametrize("name,fn", _loss_fns(), ids=[n for n, _ in _loss_fns()])
def test_cross_entropy_ignores_masked_positions(name, fn):
    h = torch.tensor(H, requires_grad=True)
    w = torch.eye(3, requires_grad=True)
    loss = fn(h, w, torch.tensor([Y[0], -100]))  # the mean is over the one valid position
    assert loss.item() == pytest.approx(LOSS_0, abs=1e-6)
    loss.backward()
    assert h.grad[1].abs().max().item() == 0.0
    p = _softmax(H[0])
    assert h.grad[0].tolist() == pytest.approx([p[0], p[1], p[2] - 1], abs=1e-6)


def test_next_token_loss_is_mean_cross_entropy_of_the_logits():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=7, context_length=4, d_model=8, n_layer=1, n_head=2)).eval()
    x, y = torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]])
    logits = model(x)[0].detach().double()
    expected = sum(torch.logsumexp(logits[i], 0).item() - logits[i, y[0, i]].item() for i in range(3)) / 3
    loss, metrics = next_token_loss(model, (x, y))
    assert loss.item() == pytest.approx(expected, abs=1e-5) and metrics == {}
    assert model(x, targets=y).item() == pytest.approx(expected, abs=1e-5)
    assert model(x, targets=y, fused=False).item() == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------- AdamW
class _Tiny(nn.Module):
    """One matrix (decayed) and one vector (not decayed), both starting at 1."""

    def __init__(self) -> None:
        super().__init__()
        self.matrix = nn.Parameter(torch.ones(1, 1))
        self.vector = nn.Parameter(torch.ones(1))


def _adamw_by_hand(p: float, grads: list[float], lr: float, wd: float, b1: float, b2: float,
                   eps: float = 1e-8) -> float:
    m = v = 0.0
    for t, g in enumerate(grads, 1):
        p *= 1 - lr * wd                       # decoupled weight decay
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return p


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_two_steps_known_answer(fused):
    cfg = TrainConfig(lr=0.1, weight_decay=0.2, beta1=0.8, beta2=0.9)
    model = _Tiny()
    opt = make_optimizer(model, cfg, fused=fused)
    decays = sorted((g["weight_decay"], [tuple(p.shape) for p in g["params"]]) for g in opt.param_groups)
    assert decays == [(0.0, [(1,)]), (0.2, [(1, 1)])]
    for g in opt.param_groups:
        assert g["lr"] == 0.1 and g["betas"] == (0.8, 0.9) and g["eps"] == 1e-8
    grads = [0.5, -0.25]
    for grad in grads:
        model.matrix.grad = torch.full((1, 1), grad)
        model.vector.grad = torch.full((1,), grad)
        opt.step()
    assert model.matrix.item() == pytest.approx(_adamw_by_hand(1.0, grads, 0.1, 0.2, 0.8, 0.9), abs=1e-6)
    assert model.vector.item() == pytest.approx(_adamw_by_hand(1.0, grads, 0.1, 0.0, 0.8, 0.9), abs=1e-6)
    assert model.matrix.item() != pytest.approx(model.vector.item(), abs=1e-3)  # the decay made a difference


def test_decay_value_of_each_group():
    model = GPT(ModelConfig.from_preset("gpt-nano", tie_embeddings=False))
    groups = param_groups(model, 0.37)
    assert [g["weight_decay"] for g in groups] == [0.37, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    plain = sorted(names[id(p)] for p in groups[1]["params"])
    assert "wte.weight" in decayed and "lm_head.weight" in decayed and "h.0.attn.c_attn.weight" in decayed
    assert "h.0.attn.c_attn.bias" in plain and "h.1.ln_2.weight" in plain and "ln_f.bias" in plain
    assert len(decayed) + len(plain) == len(names)
    frozen = GPT(ModelConfig.from_preset("gpt-nano"))
    frozen.wte.weight.requires_grad_(False)
    assert all(p is not frozen.wte.weight for g in param_groups(frozen, 0.1) for p in g["params"])


# ----------------------------------------------------------------------------- the schedule
def test_schedule_values():
    cfg = TrainConfig(lr=2.0, warmup_steps=4, max_steps=12, min_lr_ratio=0.1)
    # Warm-up: lr · (step + 1) / warmup.
    assert [lr_at(s, cfg) for s in range(4)] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    # Cosine from lr at step 4 to 0.2 at step 12: 0.2 + 0.5 · 1.8 · (1 + cos(π · (s - 4) / 8)).
    for s, progress in ((4, 0.0), (6, 0.25), (8, 0.5), (10, 0.75), (12, 1.0)):
        assert lr_at(s, cfg) == pytest.approx(0.2 + 0.9 * (1 + math.cos(math.pi * progress)), abs=1e-12)
    assert lr_at(6, cfg) == pytest.approx(1.736396, abs=1e-6)
    assert lr_at(12, cfg) == pytest.approx(0.2) and lr_at(100, cfg) == pytest.approx(0.2)  # min_lr, then flat


def test_schedule_edge_cases():
    assert lr_at(0, TrainConfig(lr=1.0, warmup_steps=0, max_steps=10)) == pytest.approx(1.0)
    constant = TrainConfig(lr=1.0, warmup_steps=2, max_steps=10, schedule="constant")
    assert [lr_at(s, constant) for s in (0, 1, 2, 9, 50)] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])
    short = TrainConfig(lr=1.0, warmup_steps=3, max_steps=3, min_lr_ratio=0.5)  # no room left for the decay
    assert [lr_at(s, short) for s in (2, 3, 4)] == pytest.approx([1.0, 1.0, 0.5])
    zero_floor = TrainConfig(lr=1.0, warmup_steps=0, max_steps=4, min_lr_ratio=0.0)
    assert lr_at(2, zero_floor) == pytest.approx(0.5) and lr_at(4, zero_floor) == pytest.approx(0.0, abs=1e-12)


def test_fit_uses_the_scheduled_lr_at_every_step(tmp_path):
    """The lr each optimiser step really runs with (seen by a step hook) and the lr logged in
    metrics.jsonl are the schedule's, step by step, in every parameter group."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from lmforge.train import fit

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, context_length=8, d_model=8, n_layer=1, n_head=1)
    model = GPT(cfg)
    train = TrainConfig(lr=0.01, warmup_steps=2, max_steps=6, min_lr_ratio=0.1, batch_size=2, log_interval=1,
                        eval_interval=100, save_interval=100, dtype="float32")
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 16, (64, 9), generator=g)

    def batches(k: int):
        rows = data[(2 * k) % 64:(2 * k) % 64 + 2]
        return rows[:, :-1], rows[:, 1:]

    seen: list[list[float]] = []
    # A global step hook: fit builds its optimiser inside, and this sees it without reaching in.
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append([grp["lr"] for grp in opt.param_groups]))
    try:
        fit(model, batches, next_token_loss, train, tmp_path / "run", progress=False)
    finally:
        hook.remove()
    # Warm-up 0.005, 0.01; then cosine over 4 steps from 0.01 to 0.001.
    expected = [0.005, 0.01] + [0.001 + 0.0045 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    assert len(seen) == 6
    for lrs, want in zip(seen, expected):
        assert lrs == pytest.approx([want] * len(lrs), abs=1e-12)
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]  # step n is logged after n optimiser steps
    assert [logged[s] for s in range(1, 7)] == pytest.approx(expected, abs=1e-12)


def test_next_token_loss_runs_the_fused_kernel_unless_told_not_to(monkeypatch):
    """Both paths give the same value (tested above); the default must still be the fast one, and
    fused=False the plain reference."""
    from lmforge import fused_ce

    calls = []
    real = fused_ce._LinearCrossEntropy.apply
    monkeypatch.setattr(fused_ce._LinearCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=7, context_length=4, d_model=8, n_layer=1, n_head=2))
    batch = (torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]))
    next_token_loss(model, batch, fused=False)
    assert calls == []
    next_token_loss(model, batch)
    assert calls == [1]
