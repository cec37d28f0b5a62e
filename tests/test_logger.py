"""The run logger (logger.py): metrics.jsonl always, TensorBoard and W&B when asked (read back with their
own readers: TensorBoard's EventAccumulator, W&B's offline run file), resume, missing extras, and MFU
against a known answer."""

from __future__ import annotations

import json
import math
import struct
import sys
import types
from pathlib import Path

import pytest
import torch

from lmforge import logger as lg
from lmforge import train as tr
from lmforge.config import LmforgeError, ModelConfig, TrainConfig
from lmforge.model import GPT

EVENTS = [(1, {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.75, "tokens": 16}),
          (2, {"loss": 2.25, "lr": 2e-3, "grad_norm": None, "tokens": 32}),  # no clipping: no norm
          (2, {"val_loss": 2.4, "val_perplexity": math.exp(2.4), "tokens": 32}),
          (3, {"loss": 2.0, "lr": 3e-3, "grad_norm": 0.5, "tokens": 48, "note": "text is not a scalar"})]


def _jsonl(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _scalars_by_tag(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard and W&B should hold: every number of every record, by name."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, []).append((r["step"], float(v)))
    return out


def _tensorboard(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _approx(d: dict[str, list[tuple[int, float]]]) -> dict:
    # TensorBoard stores float32: equal to 7 digits
    return {k: [(s, pytest.approx(v, rel=1e-6)) for s, v in pairs] for k, pairs in d.items()}


def test_metrics_jsonl_is_written_always_with_every_record_as_given(tmp_path):
    with lg.RunLogger(tmp_path) as log:
        for step, metrics in EVENTS:
            log.log(step, **metrics)
        log.log_samples(3, [{"prompt": "The", "text": " <b>cat</b>\n"}])
    assert _jsonl(tmp_path) == [{"step": s, **m} for s, m in EVENTS] + [
        {"step": 3, "samples": [{"prompt": "The", "text": " <b>cat</b>\n"}]}]
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "wandb").exists()


def test_a_fresh_logger_starts_the_jsonl_afresh_and_a_resumed_one_keeps_up_to_the_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3}\n{"step": 5, "loss": 2}\n{"step": 6, "lo')
    lg.RunLogger(tmp_path, resume_step=4).close()
    assert _jsonl(tmp_path) == [{"step": 1, "loss": 3}]
    lg.RunLogger(tmp_path).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    assert tr.MetricsLog is lg.MetricsLog and tr._step_of is lg._step_of  # where the older callers reach them


def test_tensorboard_event_files_hold_the_same_scalars_as_the_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'lmforge[tensorboard]'")
    with lg.RunLogger(tmp_path, tensorboard=True) as log:
        for step, metrics in EVENTS:
            log.log(step, **metrics)
        log.log_samples(3, [{"prompt": "The", "text": " cat"}])
    expected = _scalars_by_tag(_jsonl(tmp_path))
    assert set(expected) == {"loss", "lr", "grad_norm", "tokens", "val_loss", "val_perplexity"}
    assert _tensorboard(tmp_path) == _approx(expected)


def test_tensorboard_on_resume_drops_the_steps_after_the_checkpoint_and_a_fresh_start_drops_all(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'lmforge[tensorboard]'")
    with lg.RunLogger(tmp_path, tensorboard=True) as log:
        for step in range(1, 7):
            log.log(step, loss=10.0 + step)
    with lg.RunLogger(tmp_path, resume_step=4, tensorboard=True) as log:  # steps 5 and 6 run again
        for step in (5, 6, 7):
            log.log(step, loss=20.0 + step)
    assert _tensorboard(tmp_path)["loss"] == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 14.0), (5, 25.0), (6, 26.0),
                                              (7, 27.0)]
    assert _tensorboard(tmp_path) == _approx(_scalars_by_tag(_jsonl(tmp_path)))
    with lg.RunLogger(tmp_path, tensorboard=True) as log:
        log.log(1, loss=1.0)
    assert _tensorboard(tmp_path) == {"loss": [(1, 1.0)]}


class FakeWandb(types.ModuleType):
    """Just enough of the wandb module to see what the logger hands it."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.runs: list[types.SimpleNamespace] = []

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, id=kwargs.get("id", f"run{len(self.runs)}"), logged=[],
                                    finished=False)
        run.log = lambda data, step=None: run.logged.append((step, data))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run

    @staticmethod
    def Table(columns, data):  # wandb's name
        return ("table", columns, data)


def test_wandb_receives_the_same_scalars_and_a_resumed_run_continues_its_id(tmp_path, monkeypatch):
    """With a stand-in wandb module (the real one, offline, is the next test)."""
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with lg.RunLogger(tmp_path, wandb_project="proj", config={"train": {"lr": 1e-3}}) as log:
        for step, metrics in EVENTS:
            log.log(step, **metrics)
        log.log_samples(3, [{"prompt": "The", "text": " cat"}])
    first = fake.runs[0]
    assert first.finished and first.kwargs == {"project": "proj", "dir": str(tmp_path), "name": tmp_path.name,
                                               "config": {"train": {"lr": 1e-3}}}
    got: dict[str, list[tuple[int, float]]] = {}
    for step, data in first.logged[:-1]:
        for k, v in data.items():
            got.setdefault(k, []).append((step, v))
    assert got == _scalars_by_tag(_jsonl(tmp_path))
    assert first.logged[-1] == (3, {"samples": ("table", ["prompt", "text"], [["The", " cat"]])})
    assert (tmp_path / "wandb" / "lmforge-run-id").read_text() == "run0\n"
    lg.RunLogger(tmp_path, resume_step=2, wandb_project="proj").close()
    assert fake.runs[1].kwargs["id"] == "run0" and fake.runs[1].kwargs["resume"] == "allow"
    lg.RunLogger(tmp_path, wandb_project="proj").close()  # a fresh start is a new W&B run
    assert "id" not in fake.runs[2].kwargs


def _wandb_file_records(path: Path) -> list:
    """The records of W&B's run file (a LevelDB-style log: 32 KiB blocks of checksummed chunks,
    each record a protobuf ``Record``), read here because wandb ships no reader for it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, whole, part = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a chunk header: the block is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            whole.append(chunk)
        elif kind in (2, 3):
            part = (b"" if kind == 2 else part) + chunk
        elif kind == 4:
            whole.append(part + chunk)
    records = []
    for raw in whole:
        r = pb.Record()
        r.ParseFromString(raw)
        records.append(r)
    return records


def test_wandb_offline_run_file_holds_the_same_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="pip install 'lmforge[wandb]'")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                        "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(name, value)
    run = tmp_path / "run"
    run.mkdir()
    with lg.RunLogger(run, wandb_project="lmforge-test", config={"train": {"lr": 1e-3}}) as log:
        for step, metrics in EVENTS:
            log.log(step, **metrics)
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    got: dict[str, list[tuple[int, float]]] = {}
    for r in _wandb_file_records(files[0]):
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            step = items.pop("_step")
            for k, v in items.items():
                if not k.startswith("_"):
                    got.setdefault(k, []).append((step, v))
    # W&B merges the records of one step into one history row (tokens at step 2 is in two records)
    expected = _scalars_by_tag(_jsonl(run))
    assert {k: dict(v) for k, v in got.items()} == {k: dict(v) for k, v in expected.items()}
    assert sum(map(len, got.values())) == sum(map(len, expected.values())) - 1
    assert (run / "wandb" / "lmforge-run-id").read_text().strip() in files[0].name


@pytest.mark.parametrize("backend, module, extra", [({"tensorboard": True}, "torch.utils.tensorboard", "tensorboard"),
                                                    ({"wandb_project": "p"}, "wandb", "wandb")])
def test_a_missing_optional_package_is_one_line_naming_the_extra_and_touches_nothing(tmp_path, monkeypatch, backend,
                                                                                       module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(LmforgeError) as e:
        lg.RunLogger(tmp_path, **backend)
    assert f"pip install 'lmforge[{extra}]'" in str(e.value) and "\n" not in str(e.value)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_wandb_that_cannot_start_is_one_line_with_the_offline_hint(tmp_path, monkeypatch):
    fake = FakeWandb()

    def refuse(**kwargs):
        raise RuntimeError("api_key not configured (no-tty).\ncall wandb.login(key=...)")
    fake.init = refuse
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.raises(LmforgeError, match="WANDB_MODE=offline") as e:
        lg.RunLogger(tmp_path, wandb_project="p")
    assert "\n" not in str(e.value) and "api_key not configured" in str(e.value)


# ---------------------------------------------------------------- MFU


def test_mfu_known_answer_gpt2_124m_on_an_a100():
    """nanoGPT's estimate: GPT-2 124M, context 1024, 6N + 12·L·H·Q·T FLOPs per token; at 100,000
    tokens/s against an A100's 312 TFLOP/s of dense bf16."""
    with torch.device("meta"):
        model = GPT(ModelConfig.from_preset("gpt2-124m"))
    fpt = model.flops_per_token()
    assert fpt == 6 * (12 * 12 * 768**2 + 50257 * 768) + 12 * 12 * 768 * 1024 == 854_438_400
    peak = lg.gpu_peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16)
    assert peak == 312e12
    assert lg.mfu(100_000, fpt, peak) == pytest.approx(854_438_400 * 1e5 / 312e12) == pytest.approx(0.273858, abs=1e-6)
    assert lg.mfu(100_000, None, peak) is None and lg.mfu(100_000, fpt, None) is None


@pytest.mark.parametrize("name, dtype, tf32, peak", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989e12), ("NVIDIA H100 PCIe", torch.bfloat16, False, 756e12),
    ("NVIDIA H200", torch.bfloat16, False, 989e12), ("NVIDIA GH200 480GB", torch.float32, True, 494e12),
    ("NVIDIA A100-PCIE-40GB", torch.float32, False, 19.5e12), ("NVIDIA L40S", torch.bfloat16, False, 362e12),
    ("NVIDIA L4", torch.bfloat16, False, 121e12), ("NVIDIA A10G", torch.bfloat16, False, None),
    ("Tesla V100-SXM2-16GB", torch.bfloat16, False, None), ("Tesla T4", torch.float32, True, 8.1e12)])
def test_gpu_peaks_come_from_the_table_by_name_and_precision(name, dtype, tf32, peak):
    assert lg.gpu_peak_flops(name, dtype, tf32) == peak


def test_the_cpu_peak_is_a_matmul_measured_once_per_process():
    first = lg.describe_hardware("cpu", torch.float32)
    assert first["device"] == "cpu" and first["threads"] == torch.get_num_threads() and first["name"]
    assert 1e8 < first["peak_flops"] < 1e14 and first["peak_source"].startswith("measured: 1024³ float32 matmul")
    assert lg.describe_hardware("cpu", torch.float32)["peak_flops"] == first["peak_flops"]  # cached
    given = lg.describe_hardware("cpu", torch.float32, peak_flops=5e12)
    assert given["peak_flops"] == 5e12 and given["peak_source"] == "given (--train.peak_flops)"


TINY = dict(vocab_size=16, context_length=8, d_model=8, n_layer=1, n_head=2)
DATA = torch.randint(0, 16, (64, 9), generator=torch.Generator().manual_seed(0))


def _fit(run: Path, resume: bool = False, width: int = 8, **train) -> GPT:
    from lmforge.losses import next_token_loss

    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    cfg = TrainConfig(**{**dict(max_steps=4, batch_size=2, lr=1e-2, warmup_steps=1, log_interval=2, eval_interval=2,
                                save_interval=4, dtype="float32"), **train})

    def batches(k: int):
        rows = DATA[(2 * k) % 64:(2 * k) % 64 + 2, :width + 1]
        return rows[:, :-1], rows[:, 1:]

    def sample(m, step):
        return [{"prompt": "<script>", "text": f" at {step}"}]

    tr.fit(model, batches, next_token_loss, cfg, run, evaluate=lambda m, d: {"loss": 1.5}, sample=sample,
           progress=False, resume=resume)
    return model


def test_fit_logs_what_people_look_at_with_mfu_against_the_peak(tmp_path):
    model = _fit(tmp_path, peak_flops=1e9, width=5)  # batches shorter than the context of 8
    records = _jsonl(tmp_path)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    assert model.flops_per_token(5) < model.flops_per_token()
    for r in train:
        assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "elapsed_s"} <= set(r)
        # attention's FLOPs counted at the batches' length, not the context's
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * model.flops_per_token(5) / 1e9)
    hardware = json.loads((tmp_path / "config.json").read_text())["hardware"]
    assert hardware["peak_flops"] == 1e9 and hardware["flops_per_token"] == model.flops_per_token()
    assert hardware["device"] == "cpu" and hardware["dtype"] == "float32"
    # samples: before training, and after it (sample_interval 0)
    assert [(r["step"], r["samples"]) for r in records if "samples" in r] == [
        (0, [{"prompt": "<script>", "text": " at 0"}]), (4, [{"prompt": "<script>", "text": " at 4"}])]


def test_fit_with_tensorboard_writes_the_scalars_of_its_jsonl_and_resumes_them(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'lmforge[tensorboard]'")
    _fit(tmp_path, tensorboard=True)
    first = _tensorboard(tmp_path)
    assert first == _approx(_scalars_by_tag(_jsonl(tmp_path)))
    _fit(tmp_path, resume=True, tensorboard=True, max_steps=6)  # going on from the step-4 checkpoint
    tb = _tensorboard(tmp_path)
    assert [s for s, _ in tb["loss"]] == [2, 4, 6] and tb["loss"][:2] == first["loss"]
    assert tb == _approx(_scalars_by_tag(_jsonl(tmp_path)))


def test_the_loggers_are_closed_when_training_fails_before_its_first_step(tmp_path, monkeypatch):
    from lmforge.losses import next_token_loss

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)

    def broken_eval(m, d):
        raise RuntimeError("evaluation broke")

    cfg = TrainConfig(max_steps=2, batch_size=2, log_interval=1, dtype="float32", wandb=True)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        tr.fit(GPT(ModelConfig(**TINY)), lambda k: (DATA[:2, :-1], DATA[:2, 1:]), next_token_loss, cfg, tmp_path,
               evaluate=broken_eval, progress=False)
    (run,) = fake.runs
    assert run.finished  # W&B finished (and TensorBoard flushed) also when the step-0 evaluation fails


def test_fit_with_wandb_hands_it_the_run_config_and_every_scalar(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    _fit(tmp_path, wandb=True, wandb_project="my-project", peak_flops=1e9)
    (run,) = fake.runs
    assert run.finished and run.kwargs["project"] == "my-project"
    assert {"model", "train", "task", "hardware"} <= set(run.kwargs["config"])
    assert run.kwargs["config"]["train"]["wandb_project"] == "my-project"
    got: dict[str, list[tuple[int, float]]] = {}
    for step, data in run.logged:
        for k, v in data.items():
            if k != "samples":
                got.setdefault(k, []).append((step, v))
    assert got == _scalars_by_tag(_jsonl(tmp_path)) and "mfu" in got
