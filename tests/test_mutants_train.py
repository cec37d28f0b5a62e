"""Tests written to kill mutmut survivors in train.py (docs/DEVELOPING.md, mutation testing).

They call train.py directly, in-process, on tiny models and tiny tasks, so that they are fast
enough to run for every mutant (the kill-and-resume tests of test_train.py are marked slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmforge import train as tr
from lmforge.checkpoint import find_checkpoint, load_trainer_state
from lmforge.config import LmforgeError, ModelConfig, TrainConfig, config_dict
from lmforge.model import GPT
from lmforge.optim import lr_at

TINY = dict(vocab_size=16, context_length=8, d_model=8, n_layer=1, n_head=2)


def _model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY, **overrides}))


# ------------------------------------------------------------------------------------------ batches


def test_to_device_moves_every_tensor_and_keeps_the_structure():
    meta = torch.device("meta")
    batch = {"a": torch.zeros(2), "b": (torch.ones(1), [torch.ones(3), 7]), "c": "text"}
    out = tr.to_device(batch, meta)
    assert set(out) == {"a", "b", "c"} and out["c"] == "text"
    assert out["a"].device.type == "meta" and out["a"].shape == (2,)
    assert type(out["b"]) is tuple and type(out["b"][1]) is list
    assert out["b"][0].device.type == "meta" and out["b"][1][0].device.type == "meta" and out["b"][1][1] == 7
    assert tr.to_device(torch.ones(2), meta).device.type == "meta"
    assert tr.to_device(None, meta) is None


def test_to_device_copies_host_tensors_to_a_gpu_through_pinned_memory(monkeypatch):
    # A copy from pageable memory waits for the GPU's queued work; from pinned memory it does not.
    # This machine has no GPU: the two Tensor methods record what to_device asks of them.
    calls = []
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: self.numel() == 3)  # one is pinned already
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append(("pin", self.numel())) or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking=False:
                        calls.append(("to", self.numel(), str(device), non_blocking)) or self)
    tr.to_device((torch.zeros(2), torch.zeros(3)), torch.device("cuda"))
    assert calls == [("pin", 2), ("to", 2, "cuda", True), ("to", 3, "cuda", True)]
    calls.clear()
    tr.to_device(torch.zeros(2), torch.device("cpu"))  # to the CPU: nothing pinned
    assert calls == [("to", 2, "cpu", True)]


def test_batch_tokens_counts_the_first_non_empty_tensor():
    assert tr.batch_tokens(torch.zeros(3, 5)) == 15
    assert tr.batch_tokens({"ids": torch.zeros(2, 4), "labels": torch.zeros(2)}) == 8
    assert tr.batch_tokens((torch.zeros(0), torch.zeros(2, 3))) == 6  # an empty first tensor counts nothing
    assert tr.batch_tokens(["x", [torch.zeros(7)], torch.zeros(2)]) == 7
    assert tr.batch_tokens({"a": 1}) == 0 and tr.batch_tokens(()) == 0 and tr.batch_tokens("text") == 0


# ------------------------------------------------------------------------------------------ one step


class Probe(torch.nn.Module):
    """y = w * x: the gradient of the loss sum(w * x) is sum(x), easy to predict."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))


def _probe_loss(seen: list):
    def loss_fn(model, batch):
        seen.append((batch.clone(), torch.rand(1).item()))  # the batch, and the random state dropout would see
        loss = (model.w * batch).sum()
        return loss, {"double": 2 * loss.item()}

    return loss_fn


def _step(config: TrainConfig, step: int = 0, batches=None, seen=None):
    model = Probe()
    opt = torch.optim.SGD(model.parameters(), lr=123.0)
    seen = [] if seen is None else seen
    batches = batches or (lambda k: torch.tensor([float(k), 1.0]))
    res = tr.train_step(model, opt, batches, _probe_loss(seen), step, config, torch.device("cpu"), torch.float32)
    return model, opt, res, seen


def test_train_step_accumulates_micro_batches_k_and_averages():
    cfg = TrainConfig(grad_accum=3, lr=0.5, warmup_steps=0, schedule="constant", grad_clip=None)
    model, opt, res, seen = _step(cfg, step=2)
    assert [b[0].item() for b, _ in seen] == [6.0, 7.0, 8.0]  # k = step * grad_accum + micro
    assert res.loss == pytest.approx((7 + 8 + 9) / 3)
    assert res.metrics == {"double": pytest.approx(2 * (7 + 8 + 9) / 3)}
    assert res.tokens == 3 * 2 and res.grad_norm is None
    # gradient of the mean loss: mean of the batches; one SGD step of lr 0.5
    assert model.w.tolist() == pytest.approx([1 - 0.5 * 7.0, 1 - 0.5 * 1.0])


def test_train_step_sets_the_scheduled_learning_rate_on_every_group():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, max_steps=10, grad_clip=None)
    model = Probe()
    extra = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [model.w]}, {"params": [extra], "lr": 9.0}], lr=9.0)
    tr.train_step(model, opt, lambda k: torch.ones(2), _probe_loss([]), 1, cfg, torch.device("cpu"), torch.float32)
    assert [g["lr"] for g in opt.param_groups] == [lr_at(1, cfg), lr_at(1, cfg)] == [0.5, 0.5]


def test_train_step_seeds_each_micro_batch_by_its_index():
    cfg = TrainConfig(grad_accum=2, seed=5, grad_clip=None)
    _, _, _, seen = _step(cfg, step=3)
    want = []
    for k in (6, 7):
        torch.manual_seed(5 * 1_000_003 + k)
        want.append(torch.rand(1).item())
    assert [r for _, r in seen] == want


def test_train_step_clips_the_gradient_and_reports_its_norm_before_clipping():
    cfg = TrainConfig(lr=1.0, warmup_steps=0, schedule="constant", grad_clip=1.0)
    model, _, res, _ = _step(cfg, batches=lambda k: torch.tensor([3.0, 4.0]))
    assert res.grad_norm == pytest.approx(5.0)
    assert model.w.tolist() == pytest.approx([1 - 0.6, 1 - 0.8])  # a step of length 1


def test_train_step_keeps_the_gradient_buffers_zeroed():
    cfg = TrainConfig(grad_clip=None)
    model, _, _, _ = _step(cfg)
    assert model.w.grad is not None and model.w.grad.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_train_step_stops_on_a_non_finite_loss(bad):
    # Named as the log counts steps (the step of index 4 is logged as step 5; once "step 4", the step
    # before, whose loss the log showed finite); in fp32 there is no fp32 to advise (once it was advised)
    cfg = TrainConfig(grad_clip=None)
    with pytest.raises(LmforgeError) as e:
        _step(cfg, step=4, batches=lambda k: torch.tensor([bad, 1.0]))
    assert str(e.value) == f"loss became {bad} at step 5; lower --train.lr"
    with pytest.raises(LmforgeError) as e:
        tr.train_step(Probe(), torch.optim.SGD(Probe().parameters(), lr=1.0), lambda k: torch.tensor([bad, 1.0]),
                      _probe_loss([]), 4, cfg, torch.device("cpu"), torch.bfloat16)
    assert str(e.value) == f"loss became {bad} at step 5; lower --train.lr or use --train.dtype float32"


def test_an_unread_step_leaves_its_numbers_on_the_device_and_reading_raises_at_the_first_bad_step():
    # fit reads a step's numbers only when it logs or saves: reading a GPU tensor makes the host wait
    cfg = TrainConfig(grad_clip=1.0)
    model = Probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    data = {0: [1.0, 2.0], 1: [float("nan"), 1.0], 2: [float("inf"), 1.0]}
    steps = [tr.train_step(model, opt, lambda k: torch.tensor(data[k]), _probe_loss([]), s, cfg, torch.device("cpu"),
                           torch.float32, read=False) for s in range(3)]  # no error yet
    assert all(isinstance(r.loss, torch.Tensor) and isinstance(r.grad_norm, torch.Tensor) for r in steps)
    first = tr.resolve_steps(steps[:1])[0]
    assert (first.loss, first.metrics, first.grad_norm, first.step) == (3.0, {"double": 6.0},
                                                                        pytest.approx(5 ** 0.5), 0)
    assert type(first.loss) is float and type(first.grad_norm) is float
    with pytest.raises(LmforgeError, match="^loss became nan at step 2; lower --train.lr$"):
        tr.resolve_steps(steps)


def test_fit_stops_at_a_non_finite_loss_naming_its_step_and_saves_nothing_after_it(tmp_path):
    # Steps 1 and 2 are fine, step 3's loss is inf (its batch is rows 4-5); logs every 5 steps and
    # saves every 2: the numbers are read after steps 2 and 4, and the second read, which checks
    # steps 3 and 4, raises before the checkpoint after step 4 is written.
    def loss(model, batch):
        value, metrics = _loss(model, batch)
        return (value * float("inf") if torch.equal(batch[0], DATA[4:6, :-1]) else value), metrics

    cfg = _cfg(log_interval=5, save_interval=2, eval_interval=100)
    with pytest.raises(LmforgeError, match="^loss became inf at step 3; "):
        tr.fit(_model(), _batches, loss, cfg, tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-00000002"]
    assert all(r["step"] <= 2 for r in _records(tmp_path))


def test_train_step_moves_each_batch_to_the_device_given():
    devices = []

    def loss_fn(model, batch):
        devices.append(batch.device.type)
        return (model.w * torch.ones(2)).sum(), {}

    model = Probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr.train_step(model, opt, lambda k: torch.ones(2), loss_fn, 0, TrainConfig(grad_accum=2), torch.device("meta"),
                  torch.float32)
    assert devices == ["meta", "meta"]


def test_train_step_runs_the_loss_under_autocast_for_bfloat16():
    dtypes = []

    def loss_fn(model, batch):
        dtypes.append((torch.ones(2, 2) @ torch.ones(2, 2)).dtype)  # a matmul under autocast
        return (model.w * batch).sum(), {}

    model = Probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr.train_step(model, opt, lambda k: torch.ones(2), loss_fn, 0, TrainConfig(), torch.device("cpu"), torch.bfloat16)
    assert dtypes == [torch.bfloat16]


# ------------------------------------------------------------------------------------------ metrics log


def test_metrics_log_starts_empty_unless_resuming(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    tr.MetricsLog(path, None)
    assert path.read_text() == ""


def test_metrics_log_on_resume_keeps_the_events_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = ['{"step": 0, "val_loss": 3}', '{"step": 2, "loss": 1}', "not json", '{"no_step": 1}', '{"step": "x"}',
             '{"step": 3, "loss": 1}', '{"step": 4, "lo']
    path.write_text("\n".join(lines))
    log = tr.MetricsLog(path, 3)
    assert path.read_text() == '{"step": 0, "val_loss": 3}\n{"step": 2, "loss": 1}\n{"step": 3, "loss": 1}\n'
    log.write(step=4, loss=0.5)
    log.write(step=5)
    assert path.read_text().splitlines()[-2:] == ['{"step": 4, "loss": 0.5}', '{"step": 5}']
    tr.MetricsLog(tmp_path / "absent.jsonl", 3)
    assert (tmp_path / "absent.jsonl").read_text() == ""


def test_a_step_of_a_line_is_read_from_json():
    assert tr._step_of('{"step": 7}') == 7 and tr._step_of('{"step": "8"}') == 8
    assert tr._step_of("[1]") is None and tr._step_of('{"step": null}') is None and tr._step_of("{") is None


# ------------------------------------------------------------------------------------------ resume


def test_settings_diff_compares_nested_settings_the_old_config_has():
    old = {"train": {"lr": 1, "max_steps": 5}, "model": {"d": 8}, "data_path": "a"}
    new = {"train": {"lr": 2, "max_steps": 5, "brand_new": 1}, "model": {"d": 8}, "data_path": "b", "more": 3}
    assert tr.settings_diff(old, new) == [("train.lr", 1, 2), ("data_path", "a", "b")]
    assert tr._flatten({"a": {"b": {"c": 1}}, "d": 2}) == {"a.b.c": 1, "d": 2}


def _configs(**train) -> tuple[dict, dict, TrainConfig]:
    old = TrainConfig(max_steps=10, warmup_steps=0)
    new = TrainConfig(**{"max_steps": 10, "warmup_steps": 0, **train})
    from lmforge.config import config_dict

    return {"train": config_dict(old)}, {"train": config_dict(new)}, new


def test_resume_refuses_changed_settings_and_names_them(tmp_path):
    stored, current, cfg = _configs(lr=1e-3, batch_size=4)
    with pytest.raises(LmforgeError) as e:
        tr._check_resume(tmp_path, stored, current, cfg, 5, False)
    assert str(e.value) == (f"{tmp_path} was trained with other settings (train.batch_size 8 -> 4, train.lr 0.0006 -> "
                            "0.001); resuming with them would not give the run you started. Leave them out (a resumed "
                            "run keeps its own settings) or pass --allow_changes true to continue with them anyway")


def test_resume_with_allowed_changes_announces_them_and_the_new_schedule(tmp_path):
    stored, current, cfg = _configs(lr=1e-3)
    lines = tr._check_resume(tmp_path, stored, current, cfg, 5, True)
    assert lines == ["changed on resume: train.lr 0.0006 -> 0.001",
                     f"the learning-rate schedule now spans 10 steps: at step 5 it is {lr_at(5, cfg):.3g} "
                     f"(was {lr_at(5, TrainConfig(max_steps=10, warmup_steps=0)):.3g})"]


def test_resume_announces_resumable_changes_without_being_asked(tmp_path):
    stored, current, cfg = _configs(max_steps=20, log_interval=3)
    lines = tr._check_resume(tmp_path, stored, current, cfg, 5, False)
    assert lines[0] == "changed on resume: train.max_steps 10 -> 20, train.log_interval 10 -> 3"
    assert lines[1].startswith("the learning-rate schedule now spans 20 steps: at step 5 it is ")
    assert len(lines) == 2


def test_resume_with_the_same_settings_says_nothing(tmp_path):
    stored, current, cfg = _configs()
    assert tr._check_resume(tmp_path, stored, current, cfg, 5, False) == []


def test_no_schedule_line_for_a_run_already_at_its_end(tmp_path):
    stored, current, cfg = _configs(lr=1e-3)
    assert tr._check_resume(tmp_path, stored, current, cfg, 10, True) == ["changed on resume: train.lr 0.0006 -> 0.001"]


def test_no_schedule_line_past_the_end_or_when_the_schedule_is_the_same(tmp_path):
    stored, current, cfg = _configs(max_steps=20)
    assert len(tr._check_resume(tmp_path, stored, current, cfg, 20, False)) == 1  # start == max_steps
    stored, current, cfg = _configs(eval_interval=7)  # the schedule does not depend on it
    assert tr._check_resume(tmp_path, stored, current, cfg, 5, False) == ["changed on resume: train.eval_interval "
                                                                           "100 -> 7"]


@pytest.mark.parametrize("stored_train", [{"bogus": 1}, {"lr": -1.0}, None])
def test_a_stored_train_config_of_another_version_gives_no_schedule_line(tmp_path, stored_train):
    stored = {} if stored_train is None else {"train": stored_train}
    cfg = TrainConfig(max_steps=10)
    assert tr._check_resume(tmp_path, stored, {"x": 1}, cfg, 5, False) == []


def test_only_extending_or_observing_settings_are_resumable():
    assert tr.RESUMABLE == {"train.max_steps", "train.max_minutes", "train.eval_interval", "train.eval_batches",
                            "train.sample_interval", "train.save_interval", "train.log_interval",
                            "train.keep_checkpoints", "train.compile", "train.tensorboard", "train.wandb",
                            "train.wandb_project", "train.peak_flops", "train.strategy", "train.dist_timeout",
                            "data_path", "base.spec"}  # a moved base: its digest still guards it


def test_a_tasks_own_resumable_settings_may_change_and_others_still_may_not(tmp_path):
    cfg = TrainConfig()
    stored = {"train": config_dict(cfg), "respond_test": 5, "mask_prompt": True}
    current = {"train": config_dict(cfg), "respond_test": 9, "mask_prompt": True}
    with pytest.raises(LmforgeError, match=r"other settings \(respond_test 5 -> 9\)"):
        tr._check_resume(tmp_path, stored, current, cfg, 1, False)
    assert tr._check_resume(tmp_path, stored, current, cfg, 1, False, frozenset({"respond_test"})) == [
        "changed on resume: respond_test 5 -> 9"]
    with pytest.raises(LmforgeError, match=r"other settings \(mask_prompt True -> False\)"):
        tr._check_resume(tmp_path, stored, {**current, "mask_prompt": False}, cfg, 1, False,
                         frozenset({"respond_test"}))


def test_stale_temp_files_of_the_run_are_removed(tmp_path):
    for name in ("metrics.jsonl.tmp123", "config.json.tmp9", "notes.txt.tmp1", "metrics.jsonl.tmpx", "metrics.jsonl"):
        (tmp_path / name).write_text("x")
    (tmp_path / "loss.png.tmp4").mkdir()
    tr.remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png.tmp4", "metrics.jsonl", "metrics.jsonl.tmpx",
                                                          "notes.txt.tmp1"]


def test_prepare_for_training_makes_sparse_embedding_gradients_and_zeroed_buffers():
    model = _model()
    model.h[0].ln_1.weight.requires_grad_(False)
    kept = torch.full_like(model.wpe.weight, 3.0)
    model.wpe.weight.grad = kept
    tr.prepare_for_training(model)
    assert model.wte.sparse
    assert model.h[0].ln_1.weight.grad is None  # frozen: no buffer
    assert model.wpe.weight.grad is kept  # an existing gradient is kept
    assert torch.equal(model.wte.weight.grad, torch.zeros_like(model.wte.weight))
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------ fit

DATA = torch.randint(0, 16, (64, 9), generator=torch.Generator().manual_seed(0))


def _batches(k: int):
    rows = DATA[(2 * k) % 64:(2 * k) % 64 + 2]
    return rows[:, :-1], rows[:, 1:]


def _loss(model, batch):
    from lmforge.losses import next_token_loss

    loss, _ = next_token_loss(model, batch)
    return loss, {"half": loss.item() / 2}


def _cfg(**overrides) -> TrainConfig:
    base = dict(max_steps=6, batch_size=2, lr=1e-2, warmup_steps=1, log_interval=2, eval_interval=3, save_interval=4,
                dtype="float32", keep_checkpoints=5)
    return TrainConfig(**{**base, **overrides})


def _records(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


class Recorder:
    """evaluate and sample callbacks that note when they ran and in which mode the model was."""

    def __init__(self) -> None:
        self.evals: list[tuple[bool, torch.dtype]] = []
        self.samples: list[tuple[int, bool]] = []

    def evaluate(self, model, dtype):
        self.evals.append((model.training, dtype))
        return {"loss": 2.5, "tokens": 7, "accuracy": 0.125}

    def sample(self, model, step):
        self.samples.append((step, model.training))
        model.eval()  # generation does


def test_fit_logs_evaluates_samples_and_saves_on_their_intervals(tmp_path, capsys):
    rec = Recorder()
    model = _model(dropout=0.1)
    res = tr.fit(model, _batches, _loss, _cfg(sample_interval=2), tmp_path, evaluate=rec.evaluate,
                 sample=rec.sample, progress=False, extra_config={"data": {"x": 1}}, task="mytask")
    assert res.step == 6 and not res.stopped_early and res.tokens == 6 * 2 * 8 and res.seconds > 0
    recs = _records(tmp_path)
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert res.last_loss == train[-1]["loss"] and math.isfinite(res.last_loss)
    for r in train:
        assert r["lr"] == lr_at(r["step"] - 1, _cfg()) and r["half"] == pytest.approx(r["loss"] / 2, rel=1e-5)
        assert r["tokens"] == r["step"] * 16 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        assert 0 < r["elapsed_s"] <= res.seconds
    val = [r for r in recs if "val_loss" in r]
    assert [(r["step"], r["tokens"], r["val_tokens"]) for r in val] == [(0, 0, 7), (3, 48, 7), (6, 96, 7)]
    assert rec.evals == [(True, torch.float32)] * 3
    # sampled: before training, at each sample_interval but the last step, and once after training
    assert rec.samples == [(0, True), (2, True), (4, True), (6, False)]
    assert not model.training
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("step-*"))] == ["step-00000004", "step-00000006"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["task"] == "mytask" and config["data"] == {"x": 1} and config["train"]["max_steps"] == 6
    state = load_trainer_state(find_checkpoint(tmp_path), 6)
    assert state["tokens"] == 96 and 0 < state["elapsed"] <= res.seconds
    out = capsys.readouterr()
    assert "step 3: val loss 2.5, val accuracy 0.125\n" in out.out + out.err and "val tokens" not in out.out + out.err


def test_fit_logs_throughput_and_elapsed_time_by_the_clock(tmp_path, monkeypatch):
    # Every reading of the clock is 0.25 s later: the run starts at 0, the first window at 0.5,
    # step n ends at 0.5 + 0.25 n; each log covers 2 steps of 16 tokens in 0.5 s. The checkpoint
    # after step 4 is a pause: the window starts again after it (one more reading, at 1.75), so
    # step 6 ends at 2.25 and its log covers steps 5 and 6 (32 tokens) in 0.5 s.
    clock = iter(range(0, 10_000))
    monkeypatch.setattr(tr.time, "perf_counter", lambda: next(clock) / 4)
    res = tr.fit(_model(), _batches, _loss, _cfg(), tmp_path, progress=False)
    train = [r for r in _records(tmp_path) if "loss" in r]
    assert [(r["step"], r["tokens_per_s"], r["elapsed_s"]) for r in train] == [(2, 64.0, 1.0), (4, 64.0, 1.5),
                                                                               (6, 64.0, 2.25)]
    assert res.seconds == 2.25


def test_throughput_leaves_out_the_time_of_an_evaluation(tmp_path, monkeypatch):
    # An evaluation that takes 10 s (the clock jumps) between logs must not lower tokens/s.
    now = [0.0]

    def clock() -> float:
        now[0] += 0.25
        return now[0]

    def slow_eval(model, dtype):
        now[0] += 10.0
        return {"loss": 1.0}

    monkeypatch.setattr(tr.time, "perf_counter", clock)
    tr.fit(_model(), _batches, _loss, _cfg(eval_interval=1, save_interval=100), tmp_path, evaluate=slow_eval,
           progress=False)
    train = [r for r in _records(tmp_path) if "loss" in r]
    assert all(r["tokens_per_s"] == 64.0 for r in train), train


def test_a_fresh_run_drops_the_metrics_of_an_earlier_start(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "val_loss": 9.0}\n')
    tr.fit(_model(), _batches, _loss, _cfg(max_steps=2), tmp_path, progress=False)
    assert all(r.get("val_loss") != 9.0 for r in _records(tmp_path))


def test_fit_keeps_the_configured_number_of_checkpoints(tmp_path):
    tr.fit(_model(), _batches, _loss, _cfg(save_interval=1, keep_checkpoints=3), tmp_path, progress=False)
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("step-*"))] == [
        "step-00000004", "step-00000005", "step-00000006"]


def test_fit_saves_each_step_once(tmp_path, monkeypatch):
    saved = []
    real = tr.save_checkpoint
    monkeypatch.setattr(tr, "save_checkpoint", lambda run, m, o, step, *a, **k: saved.append(step) or real(
        run, m, o, step, *a, **k))
    tr.fit(_model(), _batches, _loss, _cfg(max_steps=4), tmp_path, progress=False)  # step 4: interval and last
    assert saved == [4]


def test_fit_runs_no_eval_when_none_is_given_and_logs_the_last_step(tmp_path):
    tr.fit(_model(), _batches, _loss, _cfg(max_steps=5, log_interval=100), tmp_path, progress=False)
    assert [r["step"] for r in _records(tmp_path)] == [5]


def test_fit_resolves_the_dtype_for_evaluation_and_training(tmp_path):
    rec, autocast = Recorder(), []

    def loss_fn(model, batch):
        autocast.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return _loss(model, batch)

    tr.fit(_model(), _batches, loss_fn, _cfg(max_steps=1, dtype="bfloat16"), tmp_path, evaluate=rec.evaluate,
           progress=False)
    assert rec.evals == [(True, torch.bfloat16)] * 2 and autocast == [torch.bfloat16]
    tr.fit(_model(), _batches, loss_fn, _cfg(max_steps=1, dtype="float32"), tmp_path / "fp32", progress=False)
    assert autocast == [torch.bfloat16, False]


def test_fit_stops_at_the_time_cap_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    rec = Recorder()
    # Every reading of the clock is 30 s later: the invocation starts at 30, step 1 ends at 90, step 2 at 120.
    clock = iter(range(0, 10_000, 30))
    monkeypatch.setattr(tr.time, "perf_counter", lambda: float(next(clock)))
    res = tr.fit(_model(), _batches, _loss, _cfg(max_minutes=1.5, save_interval=100), tmp_path,
                 evaluate=rec.evaluate, progress=False)
    assert res.stopped_early and res.step == 2 and res.seconds == 120.0  # elapsed counts from the start, 0
    assert [r["step"] for r in _records(tmp_path) if "val_loss" in r] == [0, 2]
    assert find_checkpoint(tmp_path).name == "step-00000002"
    out = capsys.readouterr()
    assert "stopped by the time cap (1.5 min) at step 2 of 6; checkpoint saved" in out.out + out.err


def test_fit_at_the_time_cap_on_the_last_step_is_not_stopped_early(tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 30))
    monkeypatch.setattr(tr.time, "perf_counter", lambda: float(next(clock)))
    res = tr.fit(_model(), _batches, _loss, _cfg(max_steps=2, max_minutes=1.5), tmp_path, progress=False)
    assert res.step == 2 and not res.stopped_early


def test_an_interrupt_saves_the_completed_steps_and_propagates(tmp_path):
    def interrupting(model, batch):
        if interrupting.calls == 3:
            raise KeyboardInterrupt
        interrupting.calls += 1
        return _loss(model, batch)

    interrupting.calls = 0
    with pytest.raises(KeyboardInterrupt):
        tr.fit(_model(), _batches, interrupting, _cfg(save_interval=100), tmp_path, progress=False)
    assert find_checkpoint(tmp_path).name == "step-00000003"
    assert load_trainer_state(find_checkpoint(tmp_path), 3)["tokens"] == 48


def _interrupt_at(n: int):
    """A loss function that raises KeyboardInterrupt at its n-th call (0-based)."""
    calls = []

    def loss_fn(model, batch):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(1)
        return _loss(model, batch)

    return loss_fn


def _count_saves(monkeypatch) -> list[int]:
    saved: list[int] = []
    real = tr.save_checkpoint
    monkeypatch.setattr(tr, "save_checkpoint", lambda run, m, o, step, *a, **k: saved.append(step) or real(
        run, m, o, step, *a, **k))
    return saved


def test_an_interrupt_before_the_first_step_saves_step_0(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        tr.fit(_model(), _batches, _interrupt_at(0), _cfg(), tmp_path, progress=False)
    assert find_checkpoint(tmp_path).name == "step-00000000"


def test_an_interrupt_right_after_a_save_does_not_save_again(tmp_path, monkeypatch):
    saved = _count_saves(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        tr.fit(_model(), _batches, _interrupt_at(4), _cfg(), tmp_path, progress=False)  # saved at 4, stopped in 5
    assert saved == [4]


def test_an_interrupt_right_after_resuming_does_not_save_again(tmp_path, monkeypatch):
    tr.fit(_model(), _batches, _loss, _cfg(max_steps=2), tmp_path, progress=False)
    saved = _count_saves(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        tr.fit(_model(), _batches, _interrupt_at(0), _cfg(max_steps=4), tmp_path, resume=True, progress=False)
    assert saved == []


def test_resume_continues_from_the_checkpoint_with_its_counters(tmp_path, capsys):
    # A constant schedule: the 4-step run takes the same steps as the first 4 of the 6-step one.
    full = tr.fit(_model(), _batches, _loss, _cfg(schedule="constant"), tmp_path / "full", progress=False)
    first = tr.fit(_model(), _batches, _loss, _cfg(schedule="constant", max_steps=4), tmp_path / "run", progress=False)
    capsys.readouterr()
    rec = Recorder()
    (tmp_path / "run" / "metrics.jsonl").write_text((tmp_path / "run" / "metrics.jsonl").read_text()
                                                  + '{"step": 5, "loss": 99}\n')
    (tmp_path / "run" / "metrics.jsonl.tmp77").write_text("stale")
    res = tr.fit(_model(), _batches, _loss, _cfg(schedule="constant"), tmp_path / "run", evaluate=rec.evaluate,
                 resume=True, progress=False)
    out = capsys.readouterr().out
    assert out.startswith(f"resuming {tmp_path / 'run'} from step 4 of 6 (step-00000004)\n"
                          "changed on resume: train.max_steps 4 -> 6\nstep 6: val loss 2.5, val accuracy 0.125\n")
    assert res.step == 6 and res.tokens == 96 and res.seconds > first.seconds
    assert res.last_loss == pytest.approx(full.last_loss, rel=1e-6)  # optimizer state and weights restored
    assert [r["step"] for r in _records(tmp_path / "run") if "loss" in r] == [2, 4, 6]
    assert len(rec.evals) == 1  # no evaluation of the untrained model on resume, only at the end
    assert not (tmp_path / "run" / "metrics.jsonl.tmp77").exists()


def test_resume_announces_the_schedule_at_the_checkpoints_step(tmp_path, capsys):
    tr.fit(_model(), _batches, _loss, _cfg(max_steps=3), tmp_path, progress=False)
    capsys.readouterr()
    tr.fit(_model(), _batches, _loss, _cfg(max_steps=4), tmp_path, resume=True, progress=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == ["changed on resume: train.max_steps 3 -> 4",
                          f"the learning-rate schedule now spans 4 steps: at step 3 it is {lr_at(3, _cfg(max_steps=4)):.3g} "
                          f"(was {lr_at(3, _cfg(max_steps=3)):.3g})"]


def test_resume_of_a_run_that_saved_only_what_it_trained(tmp_path):
    def frozen() -> GPT:
        model = _model()
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("ln_f."))
        return model

    extra = {"weights": "trained"}
    tr.fit(frozen(), _batches, _loss, _cfg(max_steps=2), tmp_path, extra_config=extra, progress=False)
    model = frozen()
    res = tr.fit(model, _batches, _loss, _cfg(max_steps=3), tmp_path, extra_config=extra, resume=True, progress=False)
    assert res.step == 3


def test_resume_names_a_weights_file_that_does_not_fit(tmp_path):
    from lmforge import checkpoint as ck

    tr.fit(_model(), _batches, _loss, _cfg(max_steps=2), tmp_path, progress=False)
    folder = find_checkpoint(tmp_path)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "manifest.json"}
    other = tmp_path / "other"
    ck.save_model(other, _model(d_model=16), 2)
    files["model.safetensors"] = (find_checkpoint(other) / "model.safetensors").read_bytes()
    folder = ck.write_checkpoint(tmp_path, 2, files)  # the run's config, another model's weights
    with pytest.raises(LmforgeError) as e:
        tr.fit(_model(), _batches, _loss, _cfg(max_steps=4), tmp_path, resume=True, progress=False)
    assert str(e.value).startswith(f"{folder / 'model.safetensors'}: tensor ")


def test_resume_of_a_finished_run_is_refused(tmp_path):
    tr.fit(_model(), _batches, _loss, _cfg(max_steps=2), tmp_path, progress=False)
    with pytest.raises(LmforgeError) as e:
        tr.fit(_model(), _batches, _loss, _cfg(max_steps=2), tmp_path, resume=True, progress=False)
    assert str(e.value) == f"{tmp_path} already finished 2 of 2 steps; raise --train.max_steps to train further"


def test_resume_of_a_weights_only_checkpoint_is_refused(tmp_path):
    from lmforge.checkpoint import save_model

    model = _model()
    save_model(tmp_path, model, 2, {"task": "pretrain", "train": {}})
    with pytest.raises(LmforgeError) as e:
        tr.fit(model, _batches, _loss, _cfg(), tmp_path, resume=True, progress=False)
    assert str(e.value) == (f"{tmp_path / 'checkpoints' / 'step-00000002'} holds weights but no trainer state, so it "
                            "cannot be resumed; start without --resume")


def test_resume_refuses_another_model_as_a_settings_difference(tmp_path):
    tr.fit(_model(), _batches, _loss, _cfg(max_steps=2), tmp_path, progress=False)
    with pytest.raises(LmforgeError) as e:
        tr.fit(_model(d_model=16), _batches, _loss, _cfg(max_steps=4), tmp_path, resume=True, progress=False)
    assert str(e.value).startswith(f"{tmp_path} was trained with other settings (model.d_model 8 -> 16)")


def test_resume_with_allow_changes_takes_the_new_settings(tmp_path, capsys):
    tr.fit(_model(), _batches, _loss, _cfg(max_steps=2), tmp_path, progress=False)
    res = tr.fit(_model(), _batches, _loss, _cfg(max_steps=3, lr=2e-2), tmp_path, resume=True, allow_changes=True,
                 progress=False)
    assert res.step == 3 and "train.lr 0.01 -> 0.02" in capsys.readouterr().out


def test_fit_compiles_each_block_when_asked(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    model = _model(n_layer=2)
    tr.fit(model, _batches, _loss, _cfg(max_steps=1, compile=True), tmp_path, progress=False)
    assert compiled == ["Block", "Block"]
    tr.fit(_model(), _batches, _loss, _cfg(max_steps=1), tmp_path / "plain", progress=False)
    assert compiled == ["Block", "Block"]


def test_fit_makes_the_run_folder_and_its_parents(tmp_path):
    tr.fit(_model(), _batches, _loss, _cfg(max_steps=1), tmp_path / "a" / "b", progress=False)
    assert find_checkpoint(tmp_path / "a" / "b").name == "step-00000001"


def test_fit_tunes_the_allocator_for_a_cpu_model(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tr, "tune_cpu_allocator", lambda: calls.append(1))
    tr.fit(_model(), _batches, _loss, _cfg(max_steps=1), tmp_path, progress=False)
    assert calls == [1]


def test_fit_prepares_the_model_for_training(tmp_path):
    model = _model()
    tr.fit(model, _batches, _loss, _cfg(max_steps=1), tmp_path, progress=False)
    assert model.wte.sparse


def test_fit_shows_a_progress_bar_named_after_the_task(tmp_path, capsys):
    import re

    tr.fit(_model(), _batches, _loss, _cfg(max_steps=2), tmp_path, task="chat-tune")
    err = capsys.readouterr().err
    last = err.strip().split("\r")[-1]  # the bar as it was left
    assert last.startswith("chat-tune") and "| 2/2 " in last and re.search(r"(step/s|s/step)", last)
    assert re.search(r"loss=\d+\.\d\d\d, tok_s=[\d,]+\]", err)
    tr.fit(_model(), _batches, _loss, _cfg(max_steps=4), tmp_path, resume=True, task="chat-tune")
    err = capsys.readouterr().err
    assert "| 2/4" in err and "| 4/4 " in err.strip().split("\r")[-1] and "| 0/4" not in err  # from the checkpoint
    tr.fit(_model(), _batches, _loss, _cfg(max_steps=2), tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""


def test_bfloat16_asked_for_on_a_cpu_without_fast_bf16_warns_and_auto_picks_float32(monkeypatch):
    import warnings

    from lmforge import precision

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(precision, "_warned_slow_bf16", False)
    with pytest.warns(UserWarning, match="bfloat16 was asked for, but this CPU has no fast bf16 .* ask for float32"):
        assert precision.resolve_dtype("bfloat16", "cpu") is torch.bfloat16  # the user's choice stands
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve_dtype("bfloat16", "cpu") is torch.bfloat16  # said once per process
        assert precision.resolve_dtype("auto", "cpu") is torch.float32
        assert precision.resolve_dtype("bfloat16", "meta") is torch.bfloat16  # only the CPU's own products
        monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
        assert precision.resolve_dtype("bfloat16", "cpu") is torch.bfloat16
        assert precision.resolve_dtype("auto", "cpu") is torch.bfloat16


def test_an_interrupt_inside_the_first_non_finite_step_saves_nothing(tmp_path, monkeypatch):
    # Ctrl-C lands in optimizer.step of the step whose loss is inf: its update is made, its loss
    # not yet kept for reading. The interrupt's checkpoint would hold non-finite weights.
    def loss(model, batch):
        value, metrics = _loss(model, batch)
        return (value * float("inf") if torch.equal(batch[0], DATA[4:6, :-1]) else value), metrics

    make = tr.make_optimizer

    def interrupted_in_step_2(model, config):
        opt = make(model, config)
        step, calls = opt.step, []

        def stepping(*a, **k):
            out = step(*a, **k)
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return out
        opt.step = stepping
        return opt

    monkeypatch.setattr(tr, "make_optimizer", interrupted_in_step_2)
    cfg = _cfg(log_interval=100, save_interval=100, eval_interval=100)
    with pytest.raises(LmforgeError, match="^interrupted after step 2 with non-finite weights .* nothing was saved"):
        tr.fit(_model(), _batches, loss, cfg, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").glob("step-*"))
