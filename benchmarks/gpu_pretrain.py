"""GPT-2 (124M) pretraining throughput on GPUs: lmforge's own training loop (``train.fit``), bf16,
SDPA's flash kernel, ``torch.compile``, tokens/s and MFU as the run's metrics.jsonl logs them.

    python benchmarks/gpu_pretrain.py                     # one GPU, the variants below
    python benchmarks/gpu_pretrain.py --devices 8         # DDP over 8 GPUs of this machine (torchrun)
    python benchmarks/gpu_pretrain.py --strategy fsdp --devices 8

Each variant is a real run of ``fit`` (warm-up + cosine schedule, AdamW, gradient clipping,
logging) on random token ids (throughput does not depend on the text; no download needed),
at gpt2-124m's shape with the vocabulary padded to 50,304 (a multiple of 64, as nanoGPT does).
Reported: the median tokens/s over the logged windows after the first (compilation and
warm-up excluded) and MFU against the GPU's data-sheet dense bf16 peak.
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

import numpy as np
import torch

VARIANTS = {  # name: (micro-batch per GPU, compile, fused output-layer loss)
    "b64-compiled": (64, True, True),
    "b32-compiled": (32, True, True),
    "b64-eager": (64, False, True),
    "b64-compiled-plain-loss": (64, True, False),
    "b96-compiled": (96, True, True),
    "b64-compiled-cudnn-attention": (64, True, True),
}


def run_variant(name: str, steps: int, ctx: int, strategy: str, out: Path) -> dict:
    from lmforge import distributed
    from lmforge.config import ModelConfig, TrainConfig
    from lmforge.data import RandomWindows
    from lmforge.losses import next_token_loss
    from lmforge.model import GPT
    from lmforge.train import fit

    batch, compile_, fused = VARIANTS[name]
    ranks = distributed.current()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("gpt2-124m", vocab_size=50304, context_length=ctx)
    model = GPT(cfg).to(distributed.device_of(ranks))
    tokens = np.random.default_rng(0).integers(0, 50257, 20_000_000, dtype=np.uint16)
    windows = RandomWindows(tokens, ctx, batch * ranks.world_size, seed=0, rank=ranks.rank,
                            world_size=ranks.world_size)
    log_every = 10
    train = TrainConfig(batch_size=batch * ranks.world_size, max_steps=steps, warmup_steps=10, lr=6e-4,
                        dtype="bfloat16", compile=compile_, eval_interval=10**9, save_interval=10**9,
                        log_interval=log_every, strategy=strategy, seed=0)
    loss_fn = next_token_loss if fused else (lambda m, b: next_token_loss(m, b, fused=False))
    run = out / name
    if "cudnn" in name:  # SDPA's cuDNN kernel first, where it applies
        from torch.nn.attention import SDPBackend, sdpa_kernel

        context = sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True)
    else:
        import contextlib

        context = contextlib.nullcontext()
    with context:
        fit(model, windows.batch, loss_fn, train, run, progress=False, task=name)
    if not ranks.main:  # rank 0 alone writes the run's metrics
        return {}
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in recs if "tokens_per_s" in r][1:]  # the first window holds the compilation
    return {"variant": name, "batch_per_gpu": batch, "gpus": ranks.world_size,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in logged),
            "mfu": statistics.median(r["mfu"] for r in logged if "mfu" in r),
            "memory_gb": torch.cuda.max_memory_allocated() / 1e9, "final_loss": logged[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--devices", type=int, default=1, help="GPUs of this machine (DDP / FSDP through torchrun)")
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_pretrain.py needs a CUDA GPU")
    if a.devices > 1 and "RANK" not in os.environ:
        sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={a.devices}", __file__, *sys.argv[1:]]))
    from lmforge import distributed

    ranks = distributed.init(timeout_s=900)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.variants:
            torch.cuda.reset_peak_memory_stats()
            try:
                res = run_variant(name, a.steps, a.ctx, a.strategy, Path(tmp))
            except torch.OutOfMemoryError:
                res = {"variant": name, "error": "out of memory"}
            results.append(res)
            if ranks.main:
                print(json.dumps(res), flush=True)
    if ranks.main:
        print(f"\n{torch.cuda.get_device_name()} x {ranks.world_size}, torch {torch.__version__}, gpt2-124m, "
              f"context {a.ctx}, bf16, {a.strategy}")
        print("| variant | batch / GPU | tokens/s (all GPUs) | MFU | peak memory |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for r in results:
            if "error" in r:
                print(f"| {r['variant']} | | {r['error']} | | |")
            else:
                print(f"| {r['variant']} | {r['batch_per_gpu']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
                      f"{r['memory_gb']:.1f} GB |")
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))
    distributed.close()


if __name__ == "__main__":
    main()
