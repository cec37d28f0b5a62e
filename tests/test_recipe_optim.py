"""Recipe options of the training loop (issue 11): the Muon optimiser (Newton–Schulz against an SVD
reference, the update rule, training and resuming), the warm-up–stable–decay schedule, the batch-size
warm-up, and their refusals and warnings at config time."""

from __future__ import annotations

import dataclasses
import io
import math
import warnings

import pytest
import torch
from torch import nn

from lmforge import train as tr
from lmforge.config import ConfigError, LmforgeError, ModelConfig, TrainConfig, config_dict
from lmforge.losses import next_token_loss
from lmforge.model import GPT
from lmforge.optim import (
    NS_COEFFICIENTS,
    MuonAdamW,
    batch_rows_at,
    hidden_matrices,
    lr_at,
    make_optimizer,
    muon_param_groups,
    newton_schulz,
    param_groups,
)

TINY = dict(vocab_size=64, context_length=16, d_model=32, n_layer=2, n_head=4)
CPU = torch.device("cpu")


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**TINY))


DATA = torch.randint(0, 64, (32, 17), generator=torch.Generator().manual_seed(0))


def _batches(k: int):
    rows = DATA[(4 * k) % 32:(4 * k) % 32 + 4]
    return rows[:, :-1], rows[:, 1:]


def _loss(model, batch):
    return next_token_loss(model, batch)


def _muon_cfg(**overrides) -> TrainConfig:
    base = dict(optimizer="muon", lr=3e-3, muon_lr=0.02, warmup_steps=0, schedule="constant", max_steps=20,
                batch_size=4, dtype="float32", log_interval=100, eval_interval=100, save_interval=100)
    return TrainConfig(**{**base, **overrides})


# ------------------------------------------------------------------------------------------ Newton–Schulz


@pytest.mark.parametrize("shape", [(16, 16), (32, 32), (8, 24), (48, 16)])
def test_newton_schulz_gives_singular_values_near_one_in_the_svd_direction(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    for _ in range(3):
        g = torch.randn(*shape, generator=gen)
        u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
        out = newton_schulz(g)
        s = torch.linalg.svdvals(out.double())
        # The quintic iteration does not converge to 1: it leaves every singular value in about
        # [0.68, 1.2] (measured), including those of a square matrix 300 times smaller than its norm.
        assert 0.65 <= s.min() and s.max() <= 1.25, (s.min().item(), s.max().item())
        cos = torch.nn.functional.cosine_similarity(out.double().flatten(), (u @ vh).flatten(), dim=0)
        assert cos > 0.95, cos.item()


def test_newton_schulz_in_bfloat16_agrees_with_float32():
    gen = torch.Generator().manual_seed(5)
    for shape in ((64, 16), (24, 40)):
        g = torch.randn(*shape, generator=gen)
        fast, reference = newton_schulz(g, dtype=torch.bfloat16), newton_schulz(g)
        assert fast.dtype == torch.float32  # computed in bf16, returned in the gradient's dtype
        assert torch.nn.functional.cosine_similarity(fast.flatten(), reference.flatten(), dim=0) > 0.99
        s = torch.linalg.svdvals(fast)
        assert 0.65 <= s.min() and s.max() <= 1.25


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_muon_iterates_newton_schulz_in_the_training_precision(dtype, expected):
    assert make_optimizer(_model(), _muon_cfg(dtype=dtype)).ns_dtype == expected


def test_newton_schulz_of_a_transposed_matrix_is_the_transposed_result():
    g = torch.randn(40, 12, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(newton_schulz(g.T), newton_schulz(g).T)


def test_newton_schulz_keeps_the_dtype_and_maps_zero_to_zero():
    g = torch.randn(8, 8, generator=torch.Generator().manual_seed(2)).bfloat16()
    assert newton_schulz(g).dtype == torch.bfloat16
    assert torch.equal(newton_schulz(torch.zeros(4, 6)), torch.zeros(4, 6))  # no NaN from the normalisation


def test_newton_schulz_is_the_quintic_polynomial_written_out():
    g = torch.randn(10, 14, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    a, b, c = NS_COEFFICIENTS
    x = g / (g.norm() + 1e-7)
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    torch.testing.assert_close(newton_schulz(g, dtype=torch.float64), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_of_a_stack_orthogonalises_each_matrix_on_its_own(dtype):
    gen = torch.Generator().manual_seed(7)
    for shape in ((3, 12, 20), (4, 30, 8)):  # wide and tall
        g = torch.randn(*shape, generator=gen)
        g[1] *= 1e-3  # each matrix is normalised by its own norm, not the stack's
        together = newton_schulz(g, dtype=dtype)
        for i in range(shape[0]):
            torch.testing.assert_close(together[i], newton_schulz(g[i], dtype=dtype), atol=1e-5, rtol=1e-5)


def test_newton_schulz_ignores_the_scale_of_its_input():
    g = torch.randn(12, 20, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(newton_schulz(1e-3 * g), newton_schulz(g), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ the optimiser


def test_muon_takes_the_block_matrices_and_adamw_everything_else():
    model = _model()
    cfg = _muon_cfg(lr=2e-3, muon_lr=0.04, weight_decay=0.1)
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay, muon = opt.param_groups
    assert sorted(names[id(p)] for p in muon["params"]) == sorted(
        f"h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert sorted(names[id(p)] for p in decay["params"]) == ["wpe.weight", "wte.weight"]  # the head is tied to wte
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert muon["muon"] and not decay["muon"] and not no_decay["muon"]
    assert muon["lr_scale"] == pytest.approx(20.0) and decay["lr_scale"] == 1.0
    # decoupled decay shrinks a Muon matrix by lr·scale · wd/scale: the same factor per step as AdamW's
    assert muon["weight_decay"] * muon["lr_scale"] == pytest.approx(decay["weight_decay"])


def test_muon_leaves_out_frozen_matrices_and_embedding_tables_inside_blocks():
    model = _model()
    model.h[0].value_embed = nn.Embedding(64, 32)  # what a value embedding inside a block would be
    model.h[1].attn.c_proj.weight.requires_grad_(False)
    chosen = {id(p) for p in hidden_matrices(model)}
    assert id(model.h[0].value_embed.weight) not in chosen
    assert id(model.h[1].attn.c_proj.weight) not in chosen
    assert id(model.h[1].attn.c_attn.weight) in chosen and len(chosen) == 7
    groups = muon_param_groups(model, _muon_cfg())
    assert any(p is model.h[0].value_embed.weight for p in groups[0]["params"])  # AdamW, with decay


def test_muon_with_no_trainable_block_matrix_is_refused():
    model = _model()
    for block in model.h:
        block.requires_grad_(False)  # only the embeddings and head train: nothing for Muon
    with pytest.raises(ConfigError, match="optimizer 'muon' found no trainable 2-D weights.*optimizer adamw"):
        make_optimizer(model, _muon_cfg())


def test_muon_refuses_a_tensor_that_is_not_a_matrix():
    model = _model()
    with pytest.raises(ConfigError, match=r"Muon updates matrices only.*\[\(32,\)\]"):
        MuonAdamW([{"params": [model.h[0].attn.c_proj.weight, model.h[0].ln_1.weight], "muon": True}], lr=0.02)


def test_muon_step_follows_nesterov_momentum_newton_schulz_and_decoupled_decay():
    gen = torch.Generator().manual_seed(4)
    w = nn.Parameter(torch.randn(24, 6, generator=gen))  # tall: the update is scaled by sqrt(24 / 6) = 2
    w0 = w.detach().clone()
    lr, wd, beta = 0.05, 0.3, 0.9
    opt = MuonAdamW([{"params": [w], "muon": True, "weight_decay": wd}], lr=lr, momentum=beta)
    g1, g2 = torch.randn(24, 6, generator=gen), torch.randn(24, 6, generator=gen)
    w.grad = g1.clone()
    opt.step()
    buf = (1 - beta) * g1
    w1 = w0 * (1 - lr * wd) - lr * 2 * newton_schulz((1 - beta) * g1 + beta * buf)
    torch.testing.assert_close(w.detach(), w1)
    w.grad = g2.clone()
    opt.step()
    buf = beta * buf + (1 - beta) * g2
    w2 = w1 * (1 - lr * wd) - lr * 2 * newton_schulz((1 - beta) * g2 + beta * buf)
    torch.testing.assert_close(w.detach(), w2)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], buf)
    assert torch.equal(w.grad, g2)  # the gradient itself is left as it was


def test_muon_step_over_matrices_of_several_shapes_follows_the_formula_for_each():
    gen = torch.Generator().manual_seed(8)
    shapes = [(6, 10), (24, 6), (6, 10), (24, 6), (5, 5)]
    ws = [nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    w0 = [w.detach().clone() for w in ws]
    lr, wd, beta = 0.05, 0.3, 0.9
    opt = MuonAdamW([{"params": ws, "muon": True, "weight_decay": wd}], lr=lr, momentum=beta)
    grads = [torch.randn(*s, generator=gen) for s in shapes]
    for w, g in zip(ws, grads):
        w.grad = g.clone()
    ws[4].grad = None  # a matrix with no gradient this step is left alone
    opt.step()
    for i, (w, g) in enumerate(zip(ws, grads)):
        if i == 4:
            assert torch.equal(w.detach(), w0[i]) and w not in opt.state
            continue
        scale = max(1.0, w.size(0) / w.size(1)) ** 0.5
        expected = w0[i] * (1 - lr * wd) - lr * scale * newton_schulz((1 - beta) * g + beta * (1 - beta) * g)
        torch.testing.assert_close(w.detach(), expected)
        torch.testing.assert_close(opt.state[w]["momentum_buffer"], (1 - beta) * g)


def test_adamw_groups_of_muon_adamw_step_as_torch_adamw():
    a, b = _model(), _model()
    oa = MuonAdamW(param_groups(a, 0.1), lr=1e-2, betas=(0.9, 0.95))
    ob = torch.optim.AdamW(param_groups(b, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step in range(3):
        for m, o in ((a, oa), (b, ob)):
            x, y = _batches(step)
            m(x, targets=y).backward()
            o.step()
            o.zero_grad()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=name)


def test_train_step_gives_muon_groups_the_scheduled_rate_times_their_scale():
    model = _model()
    cfg = _muon_cfg(lr=1e-3, muon_lr=0.03, warmup_steps=4, schedule="cosine", max_steps=10)
    opt = make_optimizer(model, cfg)
    tr.train_step(model, opt, _batches, _loss, 1, cfg, CPU, torch.float32)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr_at(1, cfg)] * 2 + [0.03 * lr_at(1, cfg) / 1e-3])
    assert opt.param_groups[2]["lr"] == pytest.approx(0.015)  # half-way through the warm-up


def _losses_on_one_batch(model, opt, cfg) -> list[float]:
    return [tr.train_step(model, opt, lambda k: _batches(0), _loss, s, cfg, CPU, torch.float32).loss
            for s in range(cfg.max_steps)]


def test_muon_training_lowers_the_loss():
    model = _model()
    cfg = _muon_cfg()
    losses = _losses_on_one_batch(model, make_optimizer(model, cfg), cfg)
    assert losses[0] == pytest.approx(math.log(64), abs=0.2)
    assert losses[-1] < 0.65 * losses[0], losses  # measured: 4.18 -> 2.41 in 20 steps


def test_muon_alone_on_the_block_matrices_lowers_the_loss():
    model = _model()
    cfg = _muon_cfg(lr=0.02)
    opt = MuonAdamW([{"params": hidden_matrices(model), "muon": True}], lr=cfg.lr)  # nothing else trains
    losses = _losses_on_one_batch(model, opt, cfg)
    assert losses[-1] < losses[0] - 0.3, losses  # measured: 4.18 -> 3.61; a wrong sign or scale climbs or stalls


def test_muon_state_dict_round_trips_and_a_restored_optimizer_continues_identically():
    cfg = _muon_cfg()
    a = _model()
    oa = make_optimizer(a, cfg)
    for s in range(3):
        tr.train_step(a, oa, _batches, _loss, s, cfg, CPU, torch.float32)
    buffer = io.BytesIO()
    torch.save({"model": a.state_dict(), "optimizer": oa.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as checkpoints are read
    b = _model(seed=1)
    b.load_state_dict(saved["model"])
    ob = make_optimizer(b, cfg)
    ob.load_state_dict(saved["optimizer"])
    assert [g["muon"] for g in ob.param_groups] == [False, False, True]
    assert ob.state_dict()["state"].keys() == oa.state_dict()["state"].keys()
    for s in range(3, 6):
        la = tr.train_step(a, oa, _batches, _loss, s, cfg, CPU, torch.float32).loss
        lb = tr.train_step(b, ob, _batches, _loss, s, cfg, CPU, torch.float32).loss
        assert la == lb
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_a_resumed_fit_with_muon_wsd_and_batch_warmup_equals_an_uninterrupted_one(tmp_path):
    cfg = _muon_cfg(max_steps=8, schedule="wsd", decay_fraction=0.5, warmup_steps=1, batch_warmup_steps=6)
    full = _model()
    reference = tr.fit(full, _batches, _loss, cfg, tmp_path / "full", progress=False)

    calls = []

    def interrupting(model, batch):
        if len(calls) == 5:  # at step 5: inside the batch warm-up and the decay
            raise KeyboardInterrupt
        calls.append(1)
        return _loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        tr.fit(_model(), _batches, interrupting, cfg, tmp_path / "run", progress=False)
    resumed_model = _model(seed=1)
    resumed = tr.fit(resumed_model, _batches, _loss, cfg, tmp_path / "run", resume=True, progress=False)
    assert resumed.step == 8 and resumed.tokens == reference.tokens
    assert resumed.last_loss == reference.last_loss
    for (name, pa), pb in zip(full.named_parameters(), resumed_model.parameters()):
        assert torch.equal(pa, pb), name


# ------------------------------------------------------------------------------------------ wsd schedule


def test_wsd_schedule_warms_up_holds_then_decays_linearly_to_the_minimum():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    assert cfg.decay_steps == 22
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert all(lr_at(s, cfg) == 1.0 for s in range(10, 89))  # stable until max_steps - 22 = 88
    assert lr_at(99, cfg) == pytest.approx(1.0 - 0.9 * 11 / 22)
    assert lr_at(109, cfg) == pytest.approx(0.1 + 0.9 / 22)  # the last step
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) > lr_at(s + 1, cfg) for s in range(88, 110))


def test_wsd_decay_steps_are_rounded_not_pushed_up_by_floating_point():
    assert TrainConfig(schedule="wsd", max_steps=300, decay_fraction=0.2).decay_steps == 60  # 60.000000000000004
    assert TrainConfig(schedule="wsd", max_steps=2, warmup_steps=0, decay_fraction=0.1).decay_steps == 1


def test_wsd_whose_phases_exceed_max_steps_is_refused_naming_both():
    with pytest.raises(ConfigError, match=r"warm-up \(50 steps\) and decay \(12 steps.*exceed max_steps \(60\)"):
        TrainConfig(schedule="wsd", max_steps=60, warmup_steps=50, decay_fraction=0.2)
    with pytest.raises(ConfigError, match=r"\(12 steps.*\(61\)"):
        TrainConfig(schedule="wsd", max_steps=61, warmup_steps=50, decay_fraction=0.2)  # one step short
    TrainConfig(schedule="wsd", max_steps=62, warmup_steps=50, decay_fraction=0.2)  # 50 + 12 fits exactly
    TrainConfig(schedule="cosine", max_steps=60, warmup_steps=50)  # only wsd has phases to fit
    TrainConfig(schedule="wsd", max_steps=10, warmup_steps=0, decay_fraction=1.0)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_decay_fraction_outside_zero_to_one_is_refused(fraction):
    with pytest.raises(ConfigError, match="decay_fraction must be in"):
        TrainConfig(schedule="wsd", decay_fraction=fraction)


# ------------------------------------------------------------------------------------------ batch warm-up


def test_batch_rows_grow_linearly_from_the_start_fraction_to_all():
    cfg = TrainConfig(batch_warmup_steps=4, batch_warmup_start=0.25)
    assert [batch_rows_at(s, 8, cfg) for s in range(6)] == [2, 4, 5, 7, 8, 8]  # ceil of 2, 3.5, 5, 6.5
    # 0.2 + 0.8 · 1/2 = 0.6 of 5 rows is 3.0000000000000004 in floating point: 3 rows, not 4
    assert batch_rows_at(1, 5, TrainConfig(batch_warmup_steps=2, batch_warmup_start=0.2)) == 3
    assert batch_rows_at(0, 1, cfg) == 1  # never no rows
    assert all(batch_rows_at(s, 8, TrainConfig()) == 8 for s in range(3))  # no warm-up by default


def test_train_step_uses_only_the_warmup_rows_of_every_tensor_and_counts_their_tokens():
    cfg = TrainConfig(batch_warmup_steps=4, batch_warmup_start=0.25, grad_accum=2, warmup_steps=0, grad_clip=None)
    seen = []

    def loss_fn(model, batch):
        seen.append(batch)
        return next_token_loss(model, (batch["x"], batch["y"]))

    def batches(k):
        x, y = _batches(k)
        # a 0-d tensor first: the rows are counted on the first tensor that has rows (once an IndexError)
        return {"scale": torch.tensor(2.0), "x": x, "y": y, "rows": [torch.arange(4)], "name": "tiny"}

    model = _model()
    opt = make_optimizer(model, cfg)
    res = tr.train_step(model, opt, batches, loss_fn, 1, cfg, CPU, torch.float32)  # 4 · 0.4375 → 2 rows
    assert [b["x"].shape for b in seen] == [(2, 16), (2, 16)] and seen[0]["y"].shape == (2, 16)
    assert torch.equal(seen[1]["x"], _batches(3)[0][:2])  # micro-batch k = 1·2 + 1, its first rows
    assert seen[0]["rows"][0].tolist() == [0, 1] and seen[0]["scale"].item() == 2.0 and seen[0]["name"] == "tiny"
    assert res.tokens == 2 * 2 * 16
    seen.clear()
    assert tr.train_step(model, opt, batches, loss_fn, 4, cfg, CPU, torch.float32).tokens == 2 * 4 * 16
    assert seen[0]["x"].shape == (4, 16)


def test_batch_warmup_over_a_batch_without_rows_is_a_one_line_error():
    from lmforge.config import LmforgeError

    cfg = TrainConfig(batch_warmup_steps=2, warmup_steps=0)
    model = _model()
    with pytest.raises(LmforgeError, match="batch-size warm-up needs batches with rows"):
        tr.train_step(model, make_optimizer(model, cfg), lambda k: {"scale": torch.tensor(1.0)},
                      lambda m, b: (torch.zeros((), requires_grad=True), {}), 0, cfg, CPU, torch.float32)


def test_first_rows_keeps_the_structure_of_a_batch():
    out = tr.first_rows((torch.zeros(5, 3), [torch.ones(5)], 7), 2)
    assert type(out) is tuple and type(out[1]) is list and out[2] == 7
    assert out[0].shape == (2, 3) and out[1][0].shape == (2,)
    batch = {"t": torch.tensor(0.5), "x": torch.zeros(3, 7)}
    assert tr.batch_tokens(batch) == 21 and tr.batch_width(batch) == 7  # the 0-d tensor is not the input


# ------------------------------------------------------------------------------------------ config checks


def test_muon_under_fsdp_is_refused_with_the_way_out():
    with pytest.raises(ConfigError, match="use --train.strategy ddp"):
        TrainConfig(optimizer="muon", strategy="fsdp")
    TrainConfig(optimizer="adamw", strategy="fsdp")


@pytest.mark.parametrize("muon_lr", [0.001, 0.5])
def test_a_muon_learning_rate_outside_the_usual_range_warns_naming_it_once(muon_lr, monkeypatch):
    from lmforge import config

    monkeypatch.setattr(config, "_WARNED_MUON_LR", set())
    with pytest.warns(UserWarning, match=r"outside Muon's usual range 0\.005-0\.1"):
        cfg = TrainConfig(optimizer="muon", muon_lr=muon_lr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same value again (every replace and load rebuilds it): no repeat
        dataclasses.replace(cfg, max_steps=7)
        TrainConfig(optimizer="muon", muon_lr=muon_lr)


def test_a_muon_learning_rate_in_range_or_unused_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig(optimizer="muon", muon_lr=0.005)
        TrainConfig(optimizer="muon", muon_lr=0.1)
        TrainConfig(optimizer="adamw", muon_lr=0.5)


@pytest.mark.parametrize("field, value, message", [
    ("muon_lr", 0.0, "muon_lr must be > 0"),
    ("muon_lr", -0.02, "muon_lr must be > 0"),
    ("muon_momentum", 1.0, r"muon_momentum must be in \[0, 1\)"),
    ("muon_momentum", -0.1, r"muon_momentum must be in \[0, 1\)"),
    ("optimizer", "sgd", "optimizer must be 'adamw' or 'muon'"),
    ("batch_warmup_start", 0.0, r"batch_warmup_start must be in \(0, 1\]"),
    ("batch_warmup_start", 1.5, r"batch_warmup_start must be in \(0, 1\]"),
    ("batch_warmup_steps", -1, "batch_warmup_steps must be an integer >= 0"),
    ("schedule", "linear", "schedule must be 'cosine', 'constant' or 'wsd'"),
])
def test_bad_recipe_values_are_refused_in_one_line(field, value, message):
    with pytest.raises(ConfigError, match=message) as e:
        TrainConfig(**{field: value})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("field, value", [("optimizer", "muon"), ("muon_lr", 0.03), ("muon_momentum", 0.9),
                                          ("schedule", "wsd"), ("decay_fraction", 0.1),
                                          ("batch_warmup_steps", 5), ("batch_warmup_start", 0.5)])
def test_changing_a_recipe_setting_on_resume_is_refused(tmp_path, field, value):
    old = TrainConfig(max_steps=100)
    new = TrainConfig(max_steps=100, **{field: value})
    assert f"train.{field}" not in tr.RESUMABLE
    with pytest.raises(LmforgeError, match=f"train.{field} "):
        tr._check_resume(tmp_path, {"train": config_dict(old)}, {"train": config_dict(new)}, new, 5, False)


def test_fit_logs_the_muon_rate_that_its_matrices_stepped_with(tmp_path):
    import json

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    cfg = _muon_cfg(lr=1e-3, muon_lr=0.03, warmup_steps=2, schedule="cosine", max_steps=5, log_interval=1)
    seen: list[float] = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.extend(g["lr"] for g in opt.param_groups if g.get("muon")))
    try:
        tr.fit(_model(), _batches, _loss, cfg, tmp_path / "run", progress=False)
    finally:
        hook.remove()
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "muon_lr" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5]
    assert [r["muon_lr"] for r in logged] == pytest.approx(seen, abs=1e-12)
    assert [r["lr"] for r in logged] == pytest.approx([s * 1e-3 / 0.03 for s in seen], abs=1e-12)  # AdamW's
    assert seen[1] == pytest.approx(0.03)  # the peak, at the end of the warm-up


def test_muon_steps_alike_whatever_its_stacks_hold(monkeypatch):
    from lmforge import optim

    def stepped(stack_bytes: int) -> list[torch.Tensor]:
        monkeypatch.setattr(optim, "NS_STACK_BYTES", stack_bytes)
        gen = torch.Generator().manual_seed(9)
        ws = [nn.Parameter(torch.randn(6, 10, generator=gen)) for _ in range(5)]
        opt = MuonAdamW([{"params": ws, "muon": True, "weight_decay": 0.1}], lr=0.05)
        for _ in range(2):
            for w in ws:
                w.grad = torch.randn(6, 10, generator=gen)
            opt.step()
        return [w.detach().clone() for w in ws]

    together, two_by_two, one_by_one = stepped(2**30), stepped(2 * 6 * 10 * 4), stepped(1)
    for a, b, c in zip(together, two_by_two, one_by_one):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
