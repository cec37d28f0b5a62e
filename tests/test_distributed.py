"""Training on many processes (torchrun, gloo, 2 CPU processes): the same steps as one process,
checkpoints that resume at another number of ranks, and a job that fails instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from lmforge.config import ModelConfig, TokenizerConfig
from lmforge.distributed import activation_bytes, memory_per_device
from lmforge.model import GPT

MODEL = ["--model.d_model", "32", "--model.n_layer", "2", "--model.n_head", "4", "--model.context_length", "32"]
TRAIN = ["--train.batch_size", "4", "--train.max_steps", "6", "--train.dtype", "float32", "--train.log_interval", "1",
         "--train.eval_interval", "3", "--train.save_interval", "3", "--train.warmup_steps", "2", "--prompts", "[]"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _lmforge(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=timeout,
                          env=_env())


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _assert_same_losses(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    import random

    from lmforge.config import DataConfig, TokenizerConfig
    from lmforge.data import prepare
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("dist")
    rng = random.Random(0)
    words = "the cat sat on a mat and dog ran far away from home while birds sang in the trees".split()
    docs = [" ".join(rng.choice(words) for _ in range(120)) for _ in range(40)]
    for i, d in enumerate(docs):
        (root / "corpus").mkdir(exist_ok=True)
        (root / "corpus" / f"{i:02d}.txt").write_text(d)
    tok = Tokenizer.train(docs, TokenizerConfig(vocab_size=300))
    prepare([str(root / "corpus")], root / "shards", tok, DataConfig(), quiet=True, save_tokenizer=True)
    return root / "shards"


@pytest.fixture(scope="module")
def single(shards) -> dict[int, Path]:
    """One process, global batch 4, with and without gradient accumulation: the reference runs."""
    runs = {}
    for accum in (1, 2):
        run = shards.parent / f"single-{accum}"
        res = _lmforge("pretrain", "--data", str(shards), "--out", str(run), *MODEL, *TRAIN,
                       "--train.grad_accum", str(accum))
        assert res.returncode == 0, res.stderr
        runs[accum] = run
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_take_the_steps_of_one_process_with_the_whole_batch(shards, single, tmp_path, strategy, accum):
    run = tmp_path / "run"
    res = _lmforge("pretrain", "--data", str(shards), "--out", str(run), *MODEL, *TRAIN, "--train.grad_accum",
                   str(accum), "--train.strategy", strategy, "--devices", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"ranks: 2 ({strategy}), 2 sequences each per micro-batch" in res.stdout
    assert res.stdout.count("model: ") == 1  # rank 0 alone prints
    _assert_same_losses(_losses(run), _losses(single[accum]))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["hardware"]["devices"] == 2 and cfg["train"]["strategy"] == strategy
    if (strategy, accum) == ("fsdp", 1):  # saved at 2 ranks (gathered from the shards), resumed by one process
        _drop_last_checkpoint(run)
        res = _lmforge("pretrain", "--out", str(run), "--resume", "true")
        assert res.returncode == 0, res.stderr[-3000:]
        assert "resuming" in res.stdout and "from step 3" in res.stdout
        _assert_same_losses(_losses(run), _losses(single[1]))


def _drop_last_checkpoint(run: Path) -> None:
    """As if the job had been killed after step 3's checkpoint: only it remains."""
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-00000006")
    (run / "checkpoints" / "latest").unlink()
    os.symlink("step-00000003", run / "checkpoints" / "latest")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_checkpoint_of_one_process_resumes_at_two_ranks(shards, single, tmp_path, strategy):
    """(Two ranks to one: in the test above, for FSDP2.) Under FSDP2 only rank 0 reads the weights."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(single[1], run, symlinks=True)
    _drop_last_checkpoint(run)
    res = _lmforge("pretrain", "--out", str(run), "--resume", "true", "--devices", "2", "--train.strategy", strategy)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stdout and "from step 3" in res.stdout
    _assert_same_losses(_losses(run), _losses(single[1]))


@pytest.mark.slow
def test_fine_tuning_runs_under_the_same_launcher(shards, single, tmp_path):
    import csv

    data = tmp_path / "labels.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(80):  # 56 training rows: whole batches of 4, as one process sees them
            w.writerow([("the cat sat on a mat " if i % 2 else "dog ran far away ") * 3, "cat" if i % 2 else "dog"])
    args = ["finetune", "classify", "--base", str(single[1]), "--data", str(data), "--train.batch_size", "4",
            "--train.dtype", "float32", "--train.log_interval", "1", "--finetune.epochs", "1"]
    one = _lmforge(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _lmforge(*args, "--out", str(tmp_path / "two"), "--devices", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) and len(a) >= 5
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a)
    assert json.loads((tmp_path / "two" / "results.json").read_text())["test"]["accuracy"] == \
        json.loads((tmp_path / "one" / "results.json").read_text())["test"]["accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("task, extra", [("instruct", ["--finetune.trainable", "lora", "--train.strategy", "fsdp"]),
                                         ("dpo", ["--finetune.trainable", "all", "--train.strategy", "fsdp"])])
def test_lora_instruction_tuning_and_dpo_run_under_the_launcher(shards, tmp_path, task, extra):
    from lmforge.checkpoint import save_model
    from lmforge.models import load_any
    from lmforge.tokenizer import Tokenizer

    base = tmp_path / "base"  # a context long enough for the Alpaca prompt
    tok = Tokenizer.load(shards / "tokenizer.json")
    torch.manual_seed(0)
    save_model(base, GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=192, d_model=32, n_layer=2,
                                     n_head=2)), 0, {"task": "pretrain"})
    tok.save(base / "tokenizer.json")

    recs = [{"instruction": f"Name the color {c}.", "input": "", "output": f"The color is {c}.",
             "chosen": f"The color is {c}.", "rejected": "I do not know."}
            for c in ["red", "blue", "green", "gold"] * 8]
    data = tmp_path / "records.json"
    data.write_text(json.dumps(recs))
    run = tmp_path / "run"
    args = ["finetune", task, "--base", str(base), "--data", str(data), "--train.batch_size", "4",
            "--train.dtype", "float32", "--train.log_interval", "1", "--train.save_interval", "4",
            "--finetune.epochs", "2", "--finetune.split", "[0.75,0.125,0.125]"]  # 24 records: whole batches
    res = _lmforge(*args, "--out", str(run), "--devices", "2", *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "returned a view tensor" not in res.stderr  # FSDP2's warning on every step, for logits read out of place
    losses = _losses(run)
    assert len(losses) >= 8 and all(v == v for v in losses.values())  # logged by rank 0, no NaN
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == task and "after" in results
    model, _ = load_any(str(run))  # the checkpoint (adapters over the base, or full weights) loads
    assert model.num_params() > 0
    # Under FSDP2 the base is sharded before the untuned model is scored: scores and steps are one process's.
    one = tmp_path / "one"
    res = _lmforge(*args, "--out", str(one), *extra[:2])
    assert res.returncode == 0, res.stderr[-3000:]
    alone = json.loads((one / "results.json").read_text())
    if task == "instruct":
        assert results["before"]["val"]["loss"] == pytest.approx(alone["before"]["val"]["loss"], abs=1e-5)
        assert results["before"]["rouge_l"] == alone["before"]["rouge_l"]
    else:
        assert results["before"] == pytest.approx(alone["before"], abs=1e-5)
    assert sorted(losses) == sorted(_losses(one))
    # (fp32 sums in another order, over padded rows of two ranks: a few units in the 6th digit of a loss near 5.7)
    assert all(abs(losses[k] - v) < 3e-5 for k, v in _losses(one).items())
    if task != "instruct":
        return
    # A run of one process, resumed at 2 ranks under FSDP2: its adapters are loaded into the shards.
    import shutil

    steps = sorted(p.name for p in (one / "checkpoints").iterdir() if p.name.startswith("step-"))
    shutil.rmtree(one / "checkpoints" / steps[-1])
    (one / "checkpoints" / "latest").unlink()
    os.symlink(steps[-2], one / "checkpoints" / "latest")
    (one / "results.json").unlink()
    res = _lmforge(*args, "--out", str(one), "--resume", "true", "--devices", "2", *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"from step {int(steps[-2].split('-')[1])}" in res.stdout
    assert all(abs(losses[k] - v) < 3e-5 for k, v in _losses(one).items())
    resumed = json.loads((one / "results.json").read_text())
    assert resumed["after"]["val"]["loss"] == pytest.approx(results["after"]["val"]["loss"], abs=1e-5)


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused_before_launching(shards, tmp_path):
    res = _lmforge("pretrain", "--data", str(shards), "--out", str(tmp_path / "r"), *MODEL, "--train.batch_size", "3",
                   "--devices", "2", timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "lmforge: error: --train.batch_size 3 is the global batch and must split evenly over 2 ranks; use a "
        "multiple of 2"]
    assert not (tmp_path / "r").exists()
    res = _lmforge("pretrain", "--data", str(shards), "--out", str(tmp_path / "r"), *MODEL, "--train.batch_size", "4",
                   "--train.batch_warmup_steps", "5", "--devices", "2", timeout=60)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "lmforge: error: batch-size warm-up (--train.batch_warmup_steps) runs in one process only for now; drop it, "
        "or train without --devices"]  # each rank's first rows are not the global batch's first rows
    assert not (tmp_path / "r").exists()


def test_a_recipe_whose_settings_cannot_run_sharded_is_refused_before_launching(shards, tmp_path):
    # the modern recipe trains with Muon, which needs whole matrices: refused here, not on every rank
    res = _lmforge("pretrain", "--data", str(shards), "--out", str(tmp_path / "r"), *MODEL, "--recipe", "modern",
                   "--train.strategy", "fsdp", "--devices", "2", timeout=60)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "optimizer 'muon' cannot run under strategy 'fsdp'" in res.stderr and "torch.distributed" not in res.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, message", [
    (["--devices", "0"], "--devices and --nnodes must be >= 1, got 0 and 1"),
    (["--devices", "2", "--nnodes", "2"], "--nnodes > 1 needs --rdzv_endpoint HOST:PORT, the same on every machine"),
    *[(["--devices", "2", "--nnodes", "2", "--rdzv_endpoint", bad],
       f"--rdzv_endpoint must be HOST:PORT (e.g. node0:29500, the same on every machine), got '{bad}'")
      for bad in ("localhost:notaport", "localhost:99999", ":", "garbage", "node0:0", "node0:2\u00b2")],  # ² once int()
    (["--devices", "2", "--nnodes", "2", "--node_rank", "5", "--rdzv_endpoint", "localhost:29999"],
     "--node_rank must be between 0 and --nnodes - 1 (1), got 5; give each machine its own"),
    (["--node_rank", "3"], "--node_rank must be between 0 and --nnodes - 1 (0), got 3; give each machine its own"),
    (["--devices", "1000000"], f"--devices 1000000 is more processes than this machine has CPU cores "
                               f"({os.cpu_count()}); give at most {os.cpu_count()} (--nnodes adds machines)"),
])
def test_launch_flags_that_cannot_work_are_one_line_errors(shards, tmp_path, flags, message):
    res = _lmforge("pretrain", "--data", str(shards), "--out", str(tmp_path / "r"), *MODEL, *flags, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"lmforge: error: {message}"]
    assert not (tmp_path / "r").exists()


def _on_two_ranks(script: Path, text: str, timeout: float) -> subprocess.CompletedProcess:
    """``text`` as a script run by torchrun in 2 processes."""
    script.write_text(text)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=timeout, env=_env())


def _rank_process(root_pid: int, rank: int) -> psutil.Process | None:
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "lmforge" in " ".join(child.cmdline()):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.slow
def test_a_killed_rank_stops_the_whole_job_and_is_named(shards, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmforge", "pretrain", "--data", str(shards), "--out", str(run), *MODEL,
           "--train.batch_size", "4", "--train.max_steps", "100000", "--train.dtype", "float32", "--prompts", "[]",
           "--train.log_interval", "1", "--train.dist_timeout", "20", "--devices", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "metrics.jsonl").exists():
            time.sleep(0.2)
        victim = _rank_process(proc.pid, 1)
        assert victim is not None, "rank 1 was not found"
        victim.send_signal(signal.SIGKILL)
        t0 = time.time()
        _, err = proc.communicate(timeout=60)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "rank      : 1" in err or "rank: 1" in err, err[-2000:]
    assert took < 30  # torchrun stops the other rank at once; the collective timeout is the backstop


WORKER = textwrap.dedent("""
    import json, sys, time
    import torch
    from lmforge import distributed
    group = distributed.init(timeout_s=3)
    if group.rank == 1:
        time.sleep(60)  # never joins the collective below
    try:
        distributed.all_ok(True, torch.device("cpu"))
    except Exception as e:
        print("rank 0 gave up:", type(e).__name__, file=sys.stderr)
        sys.exit(3)
""")


@pytest.mark.slow
def test_a_collective_that_hangs_ends_the_job_after_the_timeout(tmp_path):
    t0 = time.time()
    res = _on_two_ranks(tmp_path / "hang.py", WORKER, timeout=120)
    took = time.time() - t0
    assert res.returncode != 0
    assert "rank 0 gave up" in res.stderr
    assert took < 40  # 3 s of timeout, not rank 1's 60 s of sleep


RANK0_FAILS = textwrap.dedent("""
    import sys
    import torch
    from lmforge import distributed
    from lmforge.config import LmforgeError
    group = distributed.init(timeout_s=60)
    def write():  # what a full disk does to rank 0's checkpoint
        raise OSError(28, "No space left on device")
    try:
        distributed.on_main(write, torch.device("cpu"))
    except (OSError, LmforgeError) as e:
        print(f"rank {group.rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
""")


@pytest.mark.slow
def test_when_rank_0_cannot_write_every_rank_stops_with_an_error(tmp_path):
    t0 = time.time()
    res = _on_two_ranks(tmp_path / "full_disk.py", RANK0_FAILS, timeout=120)
    assert res.returncode != 0
    assert "rank 0: OSError: [Errno 28] No space left on device" in res.stderr
    assert "rank 1: DistributedError: rank 0 stopped with an error (its message is above)" in res.stderr
    assert time.time() - t0 < 40  # told at once, not after the 60 s timeout


BUILD = textwrap.dedent("""
    import json
    import torch
    import torch.distributed as dist
    from lmforge import distributed
    from lmforge.config import ModelConfig
    from lmforge.model import GPT

    group = distributed.init(timeout_s=60)
    cfg = ModelConfig(vocab_size=96, context_length=16, d_model=32, n_layer=2, n_head=4)
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(group.rank)  # another random state on each rank: rank 0's weights must win anyway
    model = distributed.build(lambda: GPT(cfg), "fsdp", torch.device("cpu"))
    shapes_only = [None] * 2
    dist.all_gather_object(shapes_only, distributed.on_meta(model))
    distributed.wrap(model, "fsdp")
    loss = model(x, targets=torch.roll(x, -1, 1)).item()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if group.main:
        torch.manual_seed(0)
        reference = GPT(cfg)
        ref_loss = reference(x, targets=torch.roll(x, -1, 1)).item()
        diff = max((weights[k] - v).abs().max().item() for k, v in reference.state_dict().items())
        print("RESULT " + json.dumps({"shapes_only": shapes_only, "weights_diff": diff, "loss": loss,
                                      "ref_loss": ref_loss, "tied": model.lm_head.weight is model.wte.weight}))
    distributed.close()
""")


@pytest.mark.slow
def test_under_fsdp_only_rank_0_builds_the_model_and_every_rank_gets_its_values(tmp_path):
    """The other ranks build shapes only (no rank holds a whole model it does not need), yet the sharded
    model is rank 0's, value for value, whatever the other ranks' random state."""
    res = _on_two_ranks(tmp_path / "build.py", BUILD, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert out["shapes_only"] == [False, True]
    assert out["weights_diff"] == 0.0  # gathered from both ranks' shards: rank 1's came from rank 0
    assert out["loss"] == pytest.approx(out["ref_loss"], abs=1e-6)
    assert out["tied"]


BASE = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from lmforge import distributed, finetune
    from lmforge.config import TrainConfig

    group = distributed.init(timeout_s=60)
    reads = []
    load = finetune._load_base
    finetune._load_base = lambda *a, **k: reads.append(a[0]) or load(*a, **k)
    torch.manual_seed(group.rank)
    model, tok, identity = finetune._base_model(sys.argv[1], torch.device("cpu"), TrainConfig(strategy="fsdp"))
    seen = [None] * 2
    dist.all_gather_object(seen, {"reads": len(reads), "shapes_only": distributed.on_meta(model),
                                  "identity": identity, "tokenizer": tok.fingerprint,
                                  "tied": model.lm_head.weight is model.wte.weight})
    distributed.wrap(model, "fsdp")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if group.main:
        from lmforge.models import load_any
        reference, _ = load_any(sys.argv[1])
        diff = max((weights[k] - v).abs().max().item() for k, v in reference.state_dict().items())
        print("RESULT " + json.dumps({"ranks": seen, "weights_diff": diff}))
    distributed.close()
""")


@pytest.mark.slow
def test_under_fsdp_only_rank_0_reads_the_base_model_of_a_fine_tuning_run(tmp_path):
    """Once every rank read the whole base into host memory (8 copies on a machine of 8 ranks): now
    rank 0 reads it and sends the others its shapes, tokenizer and identity; their shards get rank 0's
    values."""
    from lmforge.checkpoint import save_model
    from lmforge.tokenizer import Tokenizer

    base = tmp_path / "base"
    tok = Tokenizer.train(["the cat sat on the mat " * 20], TokenizerConfig(vocab_size=264))
    torch.manual_seed(0)
    save_model(base, GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=32, d_model=32, n_layer=2,
                                     n_head=2)), 0, {"task": "pretrain"})
    tok.save(base / "tokenizer.json")
    res = _on_two_ranks(tmp_path / "base.py", BASE.replace("sys.argv[1]", repr(str(base))), timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    first, second = out["ranks"]
    assert (first["reads"], second["reads"]) == (1, 0) and (first["shapes_only"], second["shapes_only"]) == (False, True)
    assert first["identity"] == second["identity"] and first["identity"]["digest"]
    assert first["tokenizer"] == second["tokenizer"] == tok.fingerprint and second["tied"]
    assert out["weights_diff"] == 0.0  # gathered from both ranks' shards: rank 1's came from rank 0


PARITY = textwrap.dedent("""
    import json, sys
    import torch
    from lmforge import distributed
    from lmforge.config import ModelConfig, TrainConfig
    from lmforge.losses import next_token_loss
    from lmforge.model import GPT
    from lmforge.optim import make_optimizer
    from lmforge.train import train_step
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    group = distributed.init(timeout_s=60)
    out = {}
    cfg = ModelConfig(vocab_size=96, context_length=16, d_model=32, n_layer=2, n_head=4)
    x = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, 1)
    rows = slice(group.rank * 4, group.rank * 4 + 4)
    for strategy in ("ddp", "fsdp"):
        grads = {}
        for fused in (True, False):
            torch.manual_seed(0)
            model = GPT(cfg)
            wrapped = distributed.wrap(model, strategy)
            wrapped(x[rows], targets=y[rows], fused=fused).backward()
            g = model.wte.weight.grad
            grads[fused] = (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()
        out[f"{strategy}_fused_vs_plain"] = (grads[True] - grads[False]).abs().max().item()
        # Gradient accumulation: 4 micro-batches, gradients communicated once.
        torch.manual_seed(0)
        model = GPT(cfg)
        wrapped = distributed.wrap(model, strategy)
        calls = []
        if strategy == "ddp":
            def hook(state, bucket):
                calls.append(1)
                return allreduce_hook(None, bucket)
            wrapped.register_comm_hook(None, hook)
        else:
            import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group
            real = param_group.foreach_reduce  # one reduce-scatter of a unit's gradients
            def counting(*a, **k):
                calls.append(1)
                return real(*a, **k)
            param_group.foreach_reduce = counting
        opt = make_optimizer(model, TrainConfig())
        train_step(wrapped, opt, lambda k: (x[rows], y[rows]), next_token_loss, 0, TrainConfig(grad_accum=4),
                   torch.device("cpu"), torch.float32)
        out[f"{strategy}_comm_calls"] = len(calls)
        if strategy == "fsdp":
            param_group.foreach_reduce = real
            local = lambda t: t.to_local() if hasattr(t, "to_local") else t
            out["fsdp_param_bytes"] = sum(local(p).numel() * 4 for p in model.parameters())
            out["fsdp_optim_bytes"] = sum(local(v).numel() * local(v).element_size() for s in opt.state.values()
                                          for k, v in s.items() if k != "step")
            out["n_params"] = sum(p.numel() for p in GPT(cfg).parameters())
    if group.main:
        print("RESULT " + json.dumps(out))
    distributed.close()
""")


@pytest.mark.slow
def test_the_fused_loss_and_gradient_accumulation_under_ddp_and_fsdp(tmp_path):
    res = _on_two_ranks(tmp_path / "parity.py", PARITY, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    # The fused output layer + loss gives the plain path's gradient under both wrappings.
    assert out["ddp_fused_vs_plain"] < 1e-5 and out["fsdp_fused_vs_plain"] < 1e-5
    # Four micro-batches, one communication of the gradients (one DDP bucket; one reduce-scatter per FSDP unit:
    # two blocks and the root).
    assert out["ddp_comm_calls"] == 1
    assert out["fsdp_comm_calls"] == 3
    # What each rank holds under FSDP is what memory_per_device says (shards are padded to equal sizes).
    paper = memory_per_device(out["n_params"], "fsdp", 2)
    assert abs(out["fsdp_param_bytes"] - paper["parameters"]) / paper["parameters"] < 0.02
    assert abs(out["fsdp_optim_bytes"] - paper["optimizer"]) / paper["optimizer"] < 0.02


# --------------------------------------------------------------------------- memory on paper vs measured
@pytest.mark.parametrize("attention", ["flash", "chunked"])
@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_activation_bytes_match_what_autograd_keeps(arch, attention, monkeypatch):
    """On paper against a real forward, for the fused kernel (a GPU's path) and for the CPU's chunked
    attention (in chunks of 16 here: four per row, each keeping its weights over the keys it sees)."""
    import lmforge.attention as attention_module

    monkeypatch.setattr(attention_module, "CHUNKED_ATTENTION_MAX", 0 if attention == "flash" else 1024)
    monkeypatch.setattr(attention_module, "ATTENTION_CHUNK", 16)
    kw = dict(norm="rmsnorm", mlp="swiglu", positions="rope", n_kv_head=2, bias=False, qkv_bias=False) \
        if arch == "llama" else {}
    cfg = ModelConfig(vocab_size=256, context_length=64, d_model=64, n_layer=3, n_head=4, **kw)
    model = GPT(cfg)
    x = torch.randint(0, 256, (4, 64))
    kept: dict[int, int] = {}  # storage -> bytes: a tensor saved twice, or views of one, count once

    def pack(t: torch.Tensor):
        if t.is_floating_point() and not isinstance(t, torch.nn.Parameter) and t.requires_grad is not None:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, targets=x)
    measured = sum(b for ptr, b in kept.items() if ptr not in params)
    paper = activation_bytes(cfg, 4, 64, attention=attention, chunk=16)
    assert abs(measured - paper) / measured < 0.1, (measured, paper)
    if attention == "chunked":  # counting the kept weights brings paper closer to what is kept
        assert abs(measured - paper) < abs(measured - activation_bytes(cfg, 4, 64))


def test_activation_bytes_names_the_attention_kinds_it_knows():
    with pytest.raises(ValueError, match="'flash', 'chunked' or 'plain'"):
        activation_bytes(ModelConfig(vocab_size=256, context_length=64, d_model=64, n_layer=1, n_head=4), 1, 8,
                         attention="sdpa")


def test_memory_per_device_matches_the_tensors_of_a_real_training_step():
    from lmforge.config import TrainConfig
    from lmforge.optim import make_optimizer

    model = GPT(ModelConfig(vocab_size=256, context_length=32, d_model=64, n_layer=2, n_head=4))
    opt = make_optimizer(model, TrainConfig())
    x = torch.randint(0, 256, (2, 32))
    model(x, targets=x).backward()
    opt.step()
    n = model.num_params()
    paper = memory_per_device(n, "single", 1)
    assert paper["parameters"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert paper["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    assert paper["optimizer"] == sum(v.numel() * v.element_size() for s in opt.state.values()
                                     for k, v in s.items() if k != "step")
    ddp = memory_per_device(n, "ddp", 8)
    fsdp = memory_per_device(n, "fsdp", 8, largest_unit=1000)
    assert ddp["gradient_buckets"] == paper["gradients"] and ddp["total"] == paper["total"] + paper["gradients"]
    assert fsdp["optimizer"] == paper["optimizer"] // 8 and fsdp["gathered"] == 2 * 1000 * 4


def test_each_rank_gets_its_rows_and_an_uneven_last_batch_is_completed_with_its_first_rows():
    from lmforge.distributed import Group, rank_rows

    batches = lambda k: (torch.arange(4 if k == 0 else 3), {"y": torch.arange(4 if k == 0 else 3) * 10})  # noqa: E731
    r0, r1 = rank_rows(batches, Group(0, 2)), rank_rows(batches, Group(1, 2))
    assert r0(0)[0].tolist() == [0, 1] and r1(0)[0].tolist() == [2, 3] and r1(0)[1]["y"].tolist() == [20, 30]
    assert r0(1)[0].tolist() == [0, 1] and r1(1)[0].tolist() == [2, 0]  # 3 rows: the first one again
    assert rank_rows(batches, Group())(1)[0].tolist() == [0, 1, 2]  # one process: as given
    scaled = rank_rows(lambda k: {"scale": torch.tensor(0.5), "x": torch.arange(4)}, Group(1, 2))(0)
    assert scaled["scale"].item() == 0.5 and scaled["x"].tolist() == [2, 3]  # a 0-d tensor goes whole to each rank


def test_an_unknown_strategy_is_refused():
    from lmforge.config import LmforgeError, TrainConfig

    with pytest.raises(LmforgeError, match="strategy must be 'ddp' or 'fsdp'"):
        TrainConfig(strategy="zero3")
    with pytest.raises(LmforgeError, match="unknown strategy"):
        memory_per_device(10, "zero3", 2)


def test_a_rank_trains_on_a_gpu_only_when_it_joined_over_nccl(monkeypatch):
    # --device cpu on a machine with GPUs: init joins over gloo, so the rank's tensors stay on the CPU
    import torch.distributed as dist

    from lmforge.distributed import Group, device_of

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    assert device_of(Group(rank=1, world_size=2, local_rank=1)) == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    assert device_of(Group(rank=1, world_size=2, local_rank=1)) == torch.device("cuda", 1)


def test_the_writer_is_rank_0_of_a_torchrun_job_or_a_single_process(monkeypatch):
    from lmforge.distributed import writer

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "3")  # RANK alone (set by some other launcher) is not a torchrun job
    assert writer()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not writer()  # known before the process group is joined: the run lock is taken before it
    monkeypatch.setenv("RANK", "0")
    assert writer()
