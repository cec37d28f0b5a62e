"""A checkpoint is one unit, complete or absent; resume says what it does and refuses what would
change the run; a fault at any write boundary, or a kill at any instant, loses nothing."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
from conftest import another_process_holding

from lmforge import atomic
from lmforge.cli import main

# 8 steps, a checkpoint every 4 (at 4 and 8), one metrics record per step, dropout on so that
# the random-number state matters for exactness.
ARGS = ["--preset", "gpt-nano", "--model.context_length", "32", "--model.dropout", "0.1", "--train.batch_size", "4",
        "--train.max_steps", "8", "--train.warmup_steps", "2", "--train.eval_interval", "4", "--train.eval_batches",
        "1", "--train.log_interval", "1", "--train.save_interval", "4", "--train.dtype", "float32", "--prompts", "[]"]
OPS = ("write_file", "replace", "fsync_dir", "symlink", "remove_tree")


def _records(run: Path) -> list[dict]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "samples" not in r]  # texts of the prompts each invocation was given
    for r in recs:  # wall-clock fields differ between any two runs
        r.pop("tokens_per_s", None), r.pop("elapsed_s", None), r.pop("mfu", None)
    return recs


def _parse(line: str) -> dict | None:
    try:
        return json.loads(line)
    except ValueError:
        return None  # a line being written right now


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run) if "loss" in r}


def _leftovers(run: Path) -> list[str]:
    """Temporary files and folders anywhere in the run (there must be none after any failure)."""
    return [str(p) for p in run.rglob("*") if ".tmp" in p.name or p.name.startswith(".step-")]


def _error(args, capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("lmforge: error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of ARGS: the losses every interrupted run must end with."""
    from conftest import TEXT

    tmp = tmp_path_factory.mktemp("ref")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"doc{i:02d}.txt").write_text(f"Document {i}. " + TEXT * (3 + i % 4), encoding="utf-8")
    assert main(["tokenizer", "train", "--data", str(corpus), "--out", str(tmp / "tok.json"),
                 "--tokenizer.vocab_size", "300"]) == 0
    data = tmp / "data"
    assert main(["prepare", "--data", str(corpus), "--tokenizer", str(tmp / "tok.json"), "--out", str(data)]) == 0
    run = tmp / "full"
    assert main(["pretrain", "--data", str(data), "--out", str(run), *ARGS]) == 0
    return data, run, _records(run)


def test_layout_and_checksums(reference):
    from lmforge.checkpoint import find_checkpoint, load_model, verify_checkpoint

    _, run, records = reference
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-00000004", "step-00000008"]  # the newest two are kept
    assert os.readlink(run / "checkpoints" / "latest") == "step-00000008"
    for name in ("config.json", "model.safetensors", "trainer_state.pt"):  # the run still reads as three files
        assert (run / name).resolve() == (run / "checkpoints" / "step-00000008" / name).resolve()
    manifest = json.loads((run / "checkpoints" / "step-00000008" / "manifest.json").read_text())
    assert manifest["step"] == 8 and set(manifest["files"]) == {"config.json", "model.safetensors", "trainer_state.pt"}
    assert verify_checkpoint(run / "checkpoints" / "step-00000004") is None
    assert find_checkpoint(run).name == "step-00000008"
    model, cfg = load_model(run)
    assert cfg["step"] == 8 and cfg["train"]["max_steps"] == 8 and cfg["train"]["lr"] == 6e-4
    assert cfg["data"]["train_tokens"] > 0 and Path(cfg["data_path"]) == reference[0].resolve()
    assert sorted(r["step"] for r in records if "loss" in r) == list(range(1, 9))
    assert not _leftovers(run)


def test_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(reference, tmp_path, capsys):
    import shutil

    data, full, records = reference
    run = tmp_path / "run"
    shutil.copytree(full, run, symlinks=True)
    weights = run / "checkpoints" / "step-00000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(["generate", str(run), "--sample.max_new_tokens", "3", "--sample.seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "skipped damaged checkpoint" in err and "step 8: model.safetensors has" in err and "using step 4" in err
    # Resume goes on from step 4 and ends with the uninterrupted run's losses.
    assert main(["pretrain", "--out", str(run), "--resume", "true"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert _records(run) == records
    # A flipped byte (same size) is caught by the checksum; with every checkpoint damaged, one line.
    for step in (4, 8):
        cfg = run / "checkpoints" / f"step-{step:08d}" / "trainer_state.pt"
        raw = bytearray(cfg.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        cfg.write_bytes(bytes(raw))
    assert "every checkpoint" in _error(["eval", str(run), "--data", str(data)], capsys)


def test_a_consistent_but_wrong_checkpoint_is_refused_in_one_line(reference, tmp_path, capsys):
    """Checksums hold (the files were rewritten with their manifest), but the content is wrong."""
    import hashlib
    import shutil

    data, full, _ = reference
    run = tmp_path / "run"
    shutil.copytree(full, run, symlinks=True)
    assert "longer than the model's context" in _error(["eval", str(run), "--data", str(data), "--context", "64"],
                                                       capsys)
    for step in (4, 8):
        folder = run / "checkpoints" / f"step-{step:08d}"
        cfg = json.loads((folder / "config.json").read_text())
        cfg["model"]["d_model"] = 32
        raw = json.dumps(cfg).encode()
        (folder / "config.json").write_bytes(raw)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"]["config.json"] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        (folder / "manifest.json").write_text(json.dumps(manifest))
    assert "has shape" in _error(["generate", str(run)], capsys)
    # A trainer state that is not lmforge's (a pickle that would run code) is refused, not unpickled.
    folder = run / "checkpoints" / "step-00000008"
    shutil.copy(full / "checkpoints" / "step-00000008" / "config.json", folder / "config.json")
    evil = b"cos\nsystem\n(S'echo pwned'\ntR."
    (folder / "trainer_state.pt").write_bytes(evil)
    manifest = json.loads((full / "checkpoints" / "step-00000008" / "manifest.json").read_text())
    manifest["files"]["trainer_state.pt"] = {"bytes": len(evil), "sha256": hashlib.sha256(evil).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert "truncated or corrupted" in _error(["pretrain", "--out", str(run), "--resume", "true",
                                               "--train.max_steps", "10"], capsys)
    # The same as a protocol-4 pickle, which torch warned about in two lines before the error
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = pickle.dumps(Evil(), protocol=4)
    (folder / "trainer_state.pt").write_bytes(evil)
    manifest["files"]["trainer_state.pt"] = {"bytes": len(evil), "sha256": hashlib.sha256(evil).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert "truncated or corrupted" in _error(["pretrain", "--out", str(run), "--resume", "true",
                                               "--train.max_steps", "10"], capsys)  # one line, nothing run


def test_resume_keeps_the_runs_settings_and_refuses_changes(reference, tmp_path, capsys):
    import shutil

    data, full, _ = reference
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(run), *ARGS, "--train.lr", "1e-3"]) == 0
    capsys.readouterr()
    before = _tree(run)
    # Refused with the difference named, and nothing touched.
    err = _error(["pretrain", "--out", str(run), "--resume", "true", "--train.max_steps", "10", "--train.lr", "6e-4"],
                 capsys)
    assert "train.lr 0.001 -> 0.0006" in err and "--allow_changes" in err
    err = _error(["pretrain", "--out", str(run), "--resume", "true", "--train.max_steps", "10",
                  "--train.batch_size", "8"], capsys)
    assert "train.batch_size 4 -> 8" in err
    err = _error(["pretrain", "--out", str(run), "--resume", "true", "--train.max_steps", "10", "--model.dropout",
                  "0.0"], capsys)
    assert "model.dropout 0.1 -> 0.0" in err
    assert _tree(run) == before
    assert "already finished 8 of 8" in _error(["pretrain", "--out", str(run), "--resume", "true"], capsys)
    # Left out, the run's own learning rate is used; a longer run is announced with its schedule.
    assert main(["pretrain", "--out", str(run), "--resume", "true", "--train.max_steps", "12"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "from step 8 of 12" in out and "train.max_steps 8 -> 12" in out
    assert "schedule now spans 12 steps" in out
    lrs = {r["step"]: r["lr"] for r in _records(run) if "lr" in r}
    from lmforge.config import TrainConfig
    from lmforge.optim import lr_at

    longer = TrainConfig(lr=1e-3, max_steps=12, warmup_steps=2)
    assert all(abs(lrs[s] - lr_at(s - 1, longer)) < 1e-12 for s in range(9, 13))
    # Other data is a different run, even under the same path.
    other = tmp_path / "other"
    shutil.copytree(run, other, symlinks=True)
    assert main(["pretrain", "--out", str(other), "--resume", "true", "--train.max_steps", "14", "--train.lr",
                 "5e-4", "--allow_changes", "true"]) == 0
    assert "train.lr 0.001 -> 0.0005" in capsys.readouterr().out
    assert json.loads((other / "config.json").read_text())["train"]["lr"] == 5e-4


def test_outputs_that_would_destroy_work_are_refused(reference, tmp_path, capsys):
    import shutil

    data, full, records = reference
    run = tmp_path / "run"
    shutil.copytree(full, run, symlinks=True)
    data_before, run_before = _tree(data), _tree(run)
    assert "already holds a trained model" in _error(["pretrain", "--data", str(data), "--out", str(run), *ARGS],
                                                     capsys)
    assert "overlap" in _error(["pretrain", "--data", str(data), "--out", str(data), *ARGS], capsys)
    assert "overlap" in _error(["pretrain", "--data", str(data), "--out", str(data / "run"), *ARGS], capsys)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert "not an lmforge run" in _error(["pretrain", "--data", str(data), "--out", str(tmp_path / "notes"), *ARGS],
                                          capsys)
    (tmp_path / "afile").write_text("mine")
    assert "existing file" in _error(["pretrain", "--data", str(data), "--out", str(tmp_path / "afile"), *ARGS],
                                     capsys)
    assert _tree(data) == data_before and _tree(run) == run_before
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine" and (tmp_path / "afile").read_text() == "mine"
    # --overwrite starts the run over: no stale checkpoint, record, logger folder or report is left
    # (an old W&B run id would make the new run log into the old run).
    for folder in ("wandb", "tensorboard", "report-plots"):
        (run / folder).mkdir()
        (run / folder / "old").write_text("old run")
    (run / "report.html").write_text("old report")
    assert main(["pretrain", "--data", str(data), "--out", str(run), *ARGS, "--train.max_steps", "4",
                 "--overwrite", "true"]) == 0
    assert not any((run / name).exists() for name in ("wandb", "tensorboard", "report-plots", "report.html"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000004"]
    assert sorted(_losses(run)) == [1, 2, 3, 4] and max(r["step"] for r in _records(run)) == 4


def test_overwrite_with_a_logger_that_is_not_installed_keeps_the_old_run(reference, tmp_path, monkeypatch, capsys):
    import shutil
    import sys

    data, full, _ = reference
    run = tmp_path / "run"
    shutil.copytree(full, run, symlinks=True)
    before = _tree(run)
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if it were not installed
    err = _error(["pretrain", "--data", str(data), "--out", str(run), *ARGS, "--overwrite", "true",
                  "--train.wandb", "true"], capsys)
    assert "pip install 'lmforge[wandb]'" in err and _tree(run) == before


def test_time_cap_counts_only_this_invocation(reference, tmp_path, monkeypatch, capsys):
    """A run whose earlier invocations took longer than the cap still trains on resume."""
    import lmforge.train

    data, _, records = reference
    run = tmp_path / "run"
    clock = {"t": 0.0}

    def slow_clock() -> float:  # every reading is 100 s later: the first invocation "takes" hours
        clock["t"] += 100.0
        return clock["t"]

    monkeypatch.setattr(lmforge.train, "time", types.SimpleNamespace(perf_counter=slow_clock))
    assert main(["pretrain", "--data", str(data), "--out", str(run), *ARGS, "--train.max_steps", "4"]) == 0
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["pretrain", "--out", str(run), "--resume", "true", "--train.max_steps", "8",
                 "--train.max_minutes", "5"]) == 0
    out = capsys.readouterr().out
    assert "finished 8 steps" in out and "time cap" not in out
    # The clock firing is said plainly, with the way to go on.
    run2 = tmp_path / "run2"
    assert main(["pretrain", "--data", str(data), "--out", str(run2), *ARGS, "--train.max_minutes", "1e-6"]) == 0
    captured = capsys.readouterr()
    assert "stopped by the time cap" in captured.err + captured.out and "at step 1 of 8" in captured.err + captured.out
    assert f"resume with: lmforge pretrain --out {run2} --resume true" in captured.out
    assert main(["pretrain", "--out", str(run2), "--resume", "true", "--train.max_minutes", "5"]) == 0
    assert _losses(run2) == _losses(reference[1])


class Fault(Exception):
    pass


def _inject(monkeypatch, at: int | None, during_step: int, exc: BaseException | None = None) -> list[str]:
    """Count the atomic-write operations of the checkpoint of ``during_step`` (and of the
    metrics rewrite on resume when ``during_step`` is -1); raise ``exc`` at call number ``at``."""
    import lmforge.train

    calls: list[str] = []
    active = {"on": False}
    real_save, real_log = lmforge.train.save_checkpoint, lmforge.train.MetricsLog.__init__

    def save(run, model, optimizer, step, *a, **kw):
        active["on"] = step == during_step
        try:
            return real_save(run, model, optimizer, step, *a, **kw)
        finally:
            active["on"] = False

    def log_init(self, path, resume_step):
        active["on"] = during_step == -1 and resume_step is not None
        try:
            return real_log(self, path, resume_step)
        finally:
            active["on"] = False

    for name in OPS:
        real = getattr(atomic, name)

        def op(*a, _real=real, _name=name, **kw):
            if active["on"]:
                calls.append(_name)
                if at is not None and len(calls) == at:
                    raise exc or OSError(errno.ENOSPC, "No space left on device", str(a[0]))
            return _real(*a, **kw)
        monkeypatch.setattr(atomic, name, op)
    monkeypatch.setattr(lmforge.train, "save_checkpoint", save)
    monkeypatch.setattr(lmforge.train.MetricsLog, "__init__", log_init)
    return calls


@pytest.mark.slow
def test_a_fault_at_every_write_boundary_of_a_checkpoint_loses_nothing(reference, tmp_path, monkeypatch, capsys):
    """A full disk at the k-th write of the step-8 checkpoint, for every k: one line, no temp
    files, the step-4 checkpoint intact; resume ends with the uninterrupted run's losses."""
    data, _, records = reference
    calls = _inject(monkeypatch, None, 8)
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "count"), *ARGS]) == 0
    monkeypatch.undo()
    n = len(calls)
    assert n >= 8, calls  # four files, the manifest, two fsyncs, the rename, the link...
    capsys.readouterr()
    for k in range(1, n + 1):
        run = tmp_path / f"k{k}"
        _inject(monkeypatch, k, 8)
        code = main(["pretrain", "--data", str(data), "--out", str(run), *ARGS])
        monkeypatch.undo()
        err = capsys.readouterr().err
        assert not _leftovers(run), (k, calls[k - 1], _leftovers(run))
        if code == 2:  # the unit was not complete: the error says so in one line
            assert "No space left on device" in err and "Traceback" not in err, (k, err)
            assert main(["pretrain", "--out", str(run), "--resume", "true"]) == 0, (k, capsys.readouterr().err)
        else:  # the fault hit after the unit was in place (the `latest` link, pruning): it is complete
            assert code == 0 and calls[k - 1] in ("symlink", "remove_tree", "fsync_dir"), (k, calls[k - 1])
        assert _records(run) == records, k


@pytest.mark.slow
def test_a_fault_while_resume_rewrites_the_metrics_loses_no_record(reference, tmp_path, monkeypatch, capsys):
    import shutil

    data, full, records = reference
    # A run stopped after its step-4 checkpoint: metrics hold records up to step 6, say.
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(run), *ARGS, "--train.max_steps", "8"]) == 0
    shutil.rmtree(run / "checkpoints" / "step-00000008")
    with open(run / "metrics.jsonl") as f:
        lines = f.read()
    for k in (1, 2):
        _inject(monkeypatch, k, -1)
        assert main(["pretrain", "--out", str(run), "--resume", "true"]) == 2
        monkeypatch.undo()
        assert (run / "metrics.jsonl").read_text() == lines and not _leftovers(run)
    capsys.readouterr()
    assert main(["pretrain", "--out", str(run), "--resume", "true"]) == 0
    assert _records(run) == records


CHILD = textwrap.dedent("""
    import os, sys
    import lmforge.train
    from lmforge import atomic
    from lmforge.cli import main
    at, n = int(sys.argv[1]), [0]
    real_save = lmforge.train.save_checkpoint
    active = [False]
    def save(run, model, opt, step, *a, **kw):
        active[0] = step == 8
        return real_save(run, model, opt, step, *a, **kw)
    for name in {ops!r}:
        real = getattr(atomic, name)
        def op(*a, _real=real, **kw):
            if active[0]:
                n[0] += 1
                if n[0] == at:
                    os._exit(137)  # a kill: no cleanup, no finally
            return _real(*a, **kw)
        setattr(atomic, name, op)
    lmforge.train.save_checkpoint = save
    sys.exit(main(sys.argv[2:]))
""").format(ops=OPS)


@pytest.mark.slow
def test_a_kill_at_every_write_boundary_of_a_checkpoint_loses_nothing(reference, tmp_path, monkeypatch, capsys):
    data, _, records = reference
    calls = _inject(monkeypatch, None, 8)
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "count"), *ARGS]) == 0
    monkeypatch.undo()
    from lmforge.checkpoint import find_checkpoint

    commit = calls.index("replace") + 1  # the rename of the finished folder into place
    for k in range(1, len(calls) + 1):
        run = tmp_path / f"k{k}"
        proc = subprocess.run([sys.executable, "-c", CHILD, str(k), "pretrain", "--data", str(data), "--out",
                               str(run), *ARGS], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 137, (k, proc.stderr[-1500:])
        if k <= commit:  # killed before the unit was in place: step 4 is the newest, and resume finishes the run
            assert find_checkpoint(run).name == "step-00000004", k
            assert main(["pretrain", "--out", str(run), "--resume", "true"]) == 0, (k, capsys.readouterr().err)
            assert not _leftovers(run), (k, _leftovers(run))
        else:  # killed after: the step-8 checkpoint is whole, and the run is done
            assert find_checkpoint(run).name == "step-00000008", k
            capsys.readouterr()
            assert "already finished 8 of 8" in _error(["pretrain", "--out", str(run), "--resume", "true"], capsys)
        assert _records(run) == records, k


@pytest.mark.slow
def test_sigkill_at_random_instants_then_resume_reproduces_the_run(reference, tmp_path):
    """Checkpoint every step, SIGKILL at random delays, resume each time: the uninterrupted run's losses."""
    data, _, _ = reference
    args = [a if a != "4" or i == 0 or ARGS[i - 1] != "--train.save_interval" else "1" for i, a in enumerate(ARGS)]
    args = [*args[: args.index("--train.max_steps") + 1], "48", *args[args.index("--train.max_steps") + 2:]]
    full = tmp_path / "full"
    assert main(["pretrain", "--data", str(data), "--out", str(full), *args]) == 0
    want = _records(full)
    run = tmp_path / "run"
    rng = random.Random(0)
    cmd = [sys.executable, "-m", "lmforge", "pretrain", "--out", str(run)]
    from lmforge.checkpoint import find_checkpoint, has_checkpoint

    def saved_step() -> int | None:
        return int(find_checkpoint(run).name.split("-")[1]) if has_checkpoint(run) else None

    def logged_step() -> int:
        try:
            lines = (run / "metrics.jsonl").read_text().splitlines()
        except OSError:
            return -1
        steps = [r.get("step", -1) for ln in lines if (r := _parse(ln)) is not None and "loss" in r]
        return max(steps, default=-1)

    kills = 0
    while kills < 4:  # four kills, each at a random instant while training steps and writes checkpoints
        start = saved_step()
        extra = ["--resume", "true"] if start is not None else ["--data", str(data), *args]
        proc = subprocess.Popen([*cmd, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while proc.poll() is None and logged_step() <= (start or 0) and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:
            err = proc.stderr.read()
            assert proc.returncode == 0, err[-1500:]
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        kills += 1
    if saved_step() != 48:
        assert main(["pretrain", "--out", str(run), "--resume", "true"]) == 0
    assert kills >= 1
    assert _records(run) == want
    assert not _leftovers(run)


def test_what_the_adversarial_sweep_found(reference, tmp_path, capsys):
    """Other data of the same size, a run stopped in its first second, a copy that followed the
    links, a swapped tokenizer, a file named checkpoints, a changed preset, an old config."""
    import hashlib
    import shutil

    from lmforge.checkpoint import find_checkpoint
    from lmforge.train import settings_diff

    data, full, records = reference
    # Other data, same token counts: the content hash tells them apart.
    other = tmp_path / "other-data"
    shutil.copytree(data, other)
    train = bytearray((other / "train.bin").read_bytes())
    train[0:2], train[2:4] = train[2:4], train[0:2]
    assert train != (data / "train.bin").read_bytes()
    (other / "train.bin").write_bytes(bytes(train))
    index = json.loads((other / "index.json").read_text())
    index["sha256"]["train"] = hashlib.sha256(bytes(train)).hexdigest()  # as `prepare` would record it
    (other / "index.json").write_text(json.dumps(index))
    run = tmp_path / "run"
    shutil.copytree(full, run, symlinks=True)
    err = _error(["pretrain", "--out", str(run), "--resume", "true", "--train.max_steps", "10", "--data", str(other)],
                 capsys)
    assert "data.sha256.train" in err
    # A changed preset is a settings difference, named before any weights are read.
    err = _error(["pretrain", "--out", str(run), "--resume", "true", "--train.max_steps", "10", "--preset",
                  "gpt-micro"], capsys)
    assert "model.d_model 64 -> 192" in err and "resuming" not in capsys.readouterr().out
    # A config written before a setting existed is not a difference.
    assert settings_diff({"train": {"lr": 1.0}}, {"task": "pretrain", "train": {"lr": 1.0, "new": 2}}) == []
    # A run killed in its first second (only its tokenizer, a temp file) is started over by the same command.
    early = tmp_path / "early"
    early.mkdir()
    shutil.copy(full / "tokenizer.json", early / "tokenizer.json")
    (early / "metrics.jsonl.tmp4242").write_text("")
    assert "without --resume" in _error(["pretrain", "--out", str(early), "--resume", "true"], capsys)
    assert main(["pretrain", "--data", str(data), "--out", str(early), *ARGS]) == 0
    assert _records(early) == records and not _leftovers(early)
    # A copy that followed the links (cp -rL): resuming puts the links back, on the newest checkpoint.
    copy = tmp_path / "copy"
    shutil.copytree(full, copy, symlinks=False)
    assert not (copy / "model.safetensors").is_symlink()
    assert main(["pretrain", "--out", str(copy), "--resume", "true", "--train.max_steps", "10"]) == 0
    for name in ("model.safetensors", "config.json", "trainer_state.pt"):
        assert (copy / name).resolve() == (copy / "checkpoints" / "step-00000010" / name).resolve(), name
    assert os.readlink(copy / "checkpoints" / "latest") == "step-00000010"
    assert find_checkpoint(copy).name == "step-00000010"
    # A tokenizer that is not the run's is refused, not used.
    swapped = tmp_path / "swapped"
    shutil.copytree(full, swapped, symlinks=True)
    from lmforge.config import TokenizerConfig
    from lmforge.tokenizer import Tokenizer

    Tokenizer.train(["other text entirely, " * 50], TokenizerConfig(vocab_size=270)).save(swapped / "tokenizer.json")
    capsys.readouterr()
    assert "not the tokenizer this run was trained with" in _error(["generate", str(swapped)], capsys)
    # A file where the checkpoints go is named before any training.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("mine")
    assert "is a file" in _error(["pretrain", "--data", str(data), "--out", str(blocked), *ARGS], capsys)
    assert (blocked / "checkpoints").read_text() == "mine"


def test_a_run_another_process_trains_in_is_refused_and_free_again_once_it_dies(reference, tmp_path, capsys):
    # Once both ran: one run's checkpoints, config and metrics silently mixed into the other's.
    data, full, _ = reference
    run = tmp_path / "run"
    with another_process_holding(run):
        for extra in ([], ["--overwrite", "true"]):
            err = _error(["pretrain", "--data", str(data), "--out", str(run), *ARGS, *extra], capsys)
            assert "is in use by another lmforge process that trains in it" in err
        assert list(run.iterdir()) == []  # nothing written, nothing cleared
        copy = tmp_path / "copy"
        shutil.copytree(full, copy, symlinks=True)
        before = _tree(copy)
        with another_process_holding(copy):
            err = _error(["pretrain", "--out", str(copy), "--resume", "true", "--train.max_steps", "12"], capsys)
            assert "in use by another lmforge process" in err and _tree(copy) == before
    # killed: the OS dropped the lock with the process
    assert main(["pretrain", "--data", str(data), "--out", str(run), *ARGS]) == 0
    assert _losses(run) == _losses(full)


def test_run_lock_is_reentrant_and_removes_only_the_folders_it_made_when_nothing_was_written(tmp_path):
    from lmforge.outputs import run_lock

    target = tmp_path / "a" / "b" / "run"
    with pytest.raises(RuntimeError):
        with run_lock(target):
            with run_lock(target):  # the same process again (fit inside pretrain): no conflict
                raise RuntimeError("refused before anything was written")
    assert not (tmp_path / "a").exists()
    with run_lock(target):
        (target / "config.json").write_text("{}")
    assert (target / "config.json").is_file()  # what was written stays


def test_export_and_report_never_write_over_a_prepared_data_folder_even_with_overwrite(reference, tmp_path, capsys):
    # Once --overwrite let export replace the shards' tokenizer.json and report their index.json.
    data, full, _ = reference
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    before = _tree(copy)
    err = _error(["export", str(full), "--to", "hf", "--out", str(copy), "--overwrite", "true"], capsys)
    assert "is a prepared data folder, which only `lmforge prepare` writes" in err
    err = _error(["report", str(full), "--out", str(copy / "index.json"), "--overwrite", "true"], capsys)
    assert "is a file of a prepared data folder" in err
    assert _tree(copy) == before


def test_resume_with_another_optimizer_is_a_one_line_error_even_when_changes_are_allowed(reference, tmp_path,
                                                                                        capsys):
    _, full, _ = reference
    run = tmp_path / "run"
    shutil.copytree(full, run, symlinks=True)
    before = _tree(run)
    err = _error(["pretrain", "--out", str(run), "--resume", "true", "--train.max_steps", "12", "--train.optimizer",
                  "muon", "--allow_changes", "true"], capsys)  # once an internal ValueError
    assert "the optimizer state saved in" in err and "does not fit this run's optimizer (muon" in err
    assert {k: v for k, v in _tree(run).items() if k != "metrics.jsonl"} == \
        {k: v for k, v in before.items() if k != "metrics.jsonl"}


def test_shards_holding_ids_beyond_the_vocabulary_are_a_one_line_error(reference, tmp_path, capsys):
    import numpy as np

    data, full, _ = reference
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    shard = np.fromfile(copy / "train.bin", dtype=np.uint16)
    shard[:] = 65535  # damaged, or written by another tokenizer (the size still fits the index)
    shard.tofile(copy / "train.bin")
    for args in (["pretrain", "--data", str(copy), "--out", str(tmp_path / "run"), *ARGS],
                 ["eval", str(full), "--data", str(copy), "--split", "train"]):
        assert main(args) == 2  # once: internal error, IndexError: index out of range in self
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar of the steps begun
        assert last.startswith("lmforge: error: token id 65535 is outside this model's vocabulary of"), last


def test_a_file_system_without_locks_trains_unlocked_with_a_warning(tmp_path, monkeypatch):
    import fcntl

    from lmforge.outputs import run_lock

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot be locked on this file system"):
        with run_lock(tmp_path / "run"):  # once: "in use by another lmforge process", and no run at all
            (tmp_path / "run" / "config.json").write_text("{}")
    assert (tmp_path / "run" / "config.json").is_file()


def test_a_folder_of_a_tokenizer_and_an_evaluations_results_is_not_taken_for_an_unstarted_run(tmp_path):
    from lmforge.checkpoint import is_run_dir, is_unstarted_run

    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "results.json").write_text("{}")  # a user's, or an evaluation's: fine-tuning writes it only at the end
    assert not is_unstarted_run(tmp_path) and not is_run_dir(tmp_path)
    (tmp_path / "results.json").unlink()
    (tmp_path / "before.json").write_text("{}")  # what a fine-tuning run killed in its first seconds leaves
    assert is_unstarted_run(tmp_path)
