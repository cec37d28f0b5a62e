"""Resuming is exact: a run killed with SIGKILL and resumed logs the same losses as one never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lmforge.cli import main

ARGS = ["--preset", "gpt-nano", "--model.context_length", "64", "--model.dropout", "0.1", "--train.batch_size", "16",
        "--train.max_steps", "80", "--train.warmup_steps", "5", "--train.eval_interval", "20", "--train.eval_batches",
        "2", "--train.log_interval", "1", "--train.save_interval", "8", "--train.dtype", "float32", "--prompts", "[]",
        "--train.grad_accum", "2"]


def _losses(run):
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.mark.slow
# SIGKILL at random instants, and at every write of a checkpoint, is in test_checkpoint.py.
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_resume_after_a_kill_reproduces_losses(prepared, sig):
    """Ctrl-C: a checkpoint is written at the last completed step, the process exits with 130, and
    resume continues from there. SIGTERM (kill, docker stop) the same, with 143."""
    tmp_path, _, data = prepared
    full = tmp_path / "full"
    assert main(["pretrain", "--data", str(data), "--out", str(full), *ARGS]) == 0
    reference = _losses(full)
    assert sorted(reference) == list(range(1, 81))

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lmforge", "pretrain", "--data", str(data), "--out", str(killed), *ARGS]
    # As from a terminal: Ctrl-C's default action, even if something earlier in this test process left
    # SIGINT ignored (a child inherits an ignored signal, and Python then installs no KeyboardInterrupt).
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = killed / "metrics.jsonl"
        steps = _losses(killed) if metrics.exists() else {}
        done = max(steps, default=0)
        # between checkpoints, well before the end (80 steps take ~5 s here: a poll that lags a
        # second or two still lands mid-run)
        if 11 <= done <= 60 and done % 8 not in (0, 7):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert max(_losses(killed)) < 80
    if sig in (signal.SIGINT, signal.SIGTERM):
        code, said = (130, "interrupted") if sig == signal.SIGINT else (143, "terminated")
        assert proc.returncode == code and f"lmforge: {said}" in err and "Traceback" not in err, err
        from lmforge.checkpoint import load_weights

        saved_step = int(load_weights(killed / "model.safetensors")[1]["step"])  # through the `latest` link
        assert saved_step == max(_losses(killed))  # the last completed step, not the last periodic checkpoint
    assert main(["pretrain", "--data", str(data), "--out", str(killed), *ARGS, "--resume", "true"]) == 0
    resumed = _losses(killed)
    assert sorted(resumed) == list(range(1, 81))
    for step in reference:
        assert abs(resumed[step] - reference[step]) <= 1e-6, (step, resumed[step], reference[step])


@pytest.mark.slow
def test_compiled_training_matches_eager(prepared):
    tmp_path, _, data = prepared
    args = ["--preset", "gpt-nano", "--model.context_length", "32", "--train.batch_size", "4", "--train.max_steps",
            "4", "--train.log_interval", "1", "--train.dtype", "float32", "--prompts", "[]"]
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "eager"), *args]) == 0
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "compiled"), *args,
                 "--train.compile", "true"]) == 0
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2, 3, 4]
    for step in eager:
        assert abs(eager[step] - compiled[step]) < 1e-4


def test_samples_during_training_leave_training_untouched(prepared):
    """Sampling switches the model to eval mode and draws random numbers; neither may leak into
    training: with dropout on, a run that samples every 2 steps logs the same losses as one that doesn't."""
    tmp_path, _, data = prepared
    args = ["--preset", "gpt-nano", "--model.context_length", "32", "--model.dropout", "0.2", "--train.batch_size",
            "4", "--train.max_steps", "6", "--train.log_interval", "1", "--train.dtype", "float32"]
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "quiet"), *args, "--prompts", "[]"]) == 0
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "chatty"), *args, "--prompts", "[Doc]",
                 "--train.sample_interval", "2"]) == 0
    assert _losses(tmp_path / "quiet") == _losses(tmp_path / "chatty")


def test_fit_takes_any_task(tmp_path):
    """A task is a batch source of any structure and a loss returning (loss, metrics): here a
    dict batch and a classification-style loss with accuracy; the metrics reach metrics.jsonl,
    evaluation may report anything, and the run records its task."""
    import torch

    from lmforge.config import ModelConfig, TrainConfig
    from lmforge.model import GPT
    from lmforge.train import fit

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt-nano", vocab_size=32, context_length=8))
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 32, (64, 8), generator=gen)
    labels = (data[:, 0] % 2)  # a learnable rule: the parity of the first token

    def batches(k):
        i = torch.arange(8) + 8 * (k % 8)
        return {"input_ids": data[i], "labels": labels[i]}

    def loss_fn(m, batch):
        logits = m(batch["input_ids"])[:, -1, :2]
        acc = (logits.argmax(-1) == batch["labels"]).float().mean().item()
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"]), {"accuracy": acc}

    def evaluate(m, dtype):
        with torch.no_grad():
            logits = m(data)[:, -1, :2]
        return {"accuracy": (logits.argmax(-1) == labels).float().mean().item()}

    cfg = TrainConfig(max_steps=6, batch_size=8, log_interval=1, eval_interval=3, warmup_steps=1, lr=1e-3,
                      dtype="float32")
    result = fit(model, batches, loss_fn, cfg, tmp_path / "run", evaluate=evaluate, task="classify", progress=False)
    assert result.step == 6 and result.tokens == 6 * 8 * 8
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and all(0 <= r["accuracy"] <= 1 for r in train)
    assert [r["step"] for r in recs if "val_accuracy" in r] == [0, 3, 6]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["task"] == "classify" and config["train"]["max_steps"] == 6
