"""What running on many processes costs on one CPU machine: the same training (lmforge's ``fit``,
same global batch, same model) as 1 process × N threads and as N gloo processes × 1 thread
each (DDP and FSDP2), tokens/s and the ratio. The difference is the communication (gradient
all-reduce, or FSDP's all-gathers and reduce-scatters) and the smaller matmuls per process.

    python benchmarks/distributed_overhead.py               # N = 2, 6 layers × 384, 8 × 256 tokens
    python benchmarks/distributed_overhead.py --procs 4 --layers 12 --width 768
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def worker(a: argparse.Namespace) -> None:
    """One training run in this process (or in each of torchrun's); rank 0 prints its tokens/s."""
    import numpy as np
    import torch

    from lmforge import distributed
    from lmforge.config import ModelConfig, TrainConfig
    from lmforge.data import RandomWindows
    from lmforge.losses import next_token_loss
    from lmforge.model import GPT
    from lmforge.train import fit

    ranks = distributed.init(timeout_s=600)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=4096, context_length=a.ctx, d_model=a.width, n_layer=a.layers,
                      n_head=a.width // 64)
    model = GPT(cfg)
    tokens = np.random.default_rng(0).integers(0, 4096, 2_000_000, dtype=np.uint16)
    windows = RandomWindows(tokens, a.ctx, a.batch, seed=0, rank=ranks.rank, world_size=ranks.world_size)
    train = TrainConfig(batch_size=a.batch, max_steps=a.steps, warmup_steps=5, dtype="float32",
                        eval_interval=10**9, save_interval=10**9, log_interval=5, strategy=a.strategy)
    with tempfile.TemporaryDirectory() as tmp:
        fit(model, windows.batch, next_token_loss, train, tmp, progress=False, task="bench")
        recs = [json.loads(ln) for ln in (Path(tmp) / "metrics.jsonl").read_text().splitlines()] if ranks.main else []
    if ranks.main:  # rank 0 alone writes the run's metrics
        tps = statistics.median([r["tokens_per_s"] for r in recs if "tokens_per_s" in r][1:])  # after warm-up
        print(f"RESULT {json.dumps({'tokens_per_s': tps, 'loss': recs[-1].get('loss')})}", flush=True)
    distributed.close()


def run(a: argparse.Namespace, procs: int, threads: int, strategy: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    args = [__file__, "--worker", "--strategy", strategy, "--steps", str(a.steps), "--batch", str(a.batch),
            "--ctx", str(a.ctx), "--layers", str(a.layers), "--width", str(a.width)]
    cmd = [sys.executable, *args] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    n = a.procs
    one = run(a, 1, n, "ddp")
    rows = [("1 process", n, "-", one)]
    for strategy in ("ddp", "fsdp"):
        rows.append((f"{n} processes (gloo)", 1, strategy, run(a, n, 1, strategy)))
    print(f"{a.layers} layers × {a.width}, global batch {a.batch} × {a.ctx} tokens, fp32, {a.steps} steps")
    print("| setup | threads each | strategy | tokens/s | vs 1 process |")
    print("| --- | ---: | --- | ---: | ---: |")
    for name, threads, strategy, res in rows:
        print(f"| {name} | {threads} | {strategy} | {res['tokens_per_s']:,.0f} | "
              f"{res['tokens_per_s'] / one['tokens_per_s']:.2f}× |")


if __name__ == "__main__":
    main()
