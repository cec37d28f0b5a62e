"""Training-step speed: lmforge against the book's package (llms-from-scratch) and
Hugging Face transformers' GPT2LMHeadModel (sdpa attention), side by side in one run.

One step = forward, loss, backward, AdamW. Each contender runs in its own fresh
subprocess (so one's allocator settings or warm caches cannot help another), on the same
thread count, with the same shapes and random token batches. The script also measures
this CPU's matmul peak (fp32 and bf16) and prints MFU against it.

    pip install -e ".[bench]" && pip install --no-deps llms-from-scratch   # its own deps pull TensorFlow
    python benchmarks/train_step.py                 # both shapes, fp32 and bf16
    python benchmarks/train_step.py --shapes small --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SHAPES = {
    # name: (n_layer, d_model, n_head, context, batch)
    "124m": (12, 768, 12, 256, 1),
    "small": (6, 384, 6, 256, 8),
}
VOCAB = 50257


def matmul_peak(dtype_name: str, threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    a = torch.randn(2048, 2048).to(dtype)
    b = torch.randn(2048, 2048).to(dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        dt = (time.perf_counter() - t0) / 5
        best = max(best, 2 * 2048**3 / dt)
    return best


def flops_per_step(n_layer, d, ctx, batch) -> float:
    # 6 × matmul weights (blocks + output layer) + attention (12 · L · d · T), per token
    matmul_weights = n_layer * (4 * d * d + 8 * d * d) + VOCAB * d
    return (6 * matmul_weights + 12 * n_layer * d * ctx) * ctx * batch


def worker(contender: str, shape: str, dtype_name: str, steps: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n_layer, d, n_head, ctx, batch = SHAPES[shape]
    dtype = getattr(torch, dtype_name)

    if contender == "lmforge":
        from lmforge.config import ModelConfig, TrainConfig
        from lmforge.losses import next_token_loss
        from lmforge.model import GPT
        from lmforge.optim import make_optimizer
        from lmforge.precision import tune_cpu_allocator
        from lmforge.train import prepare_for_training

        tune_cpu_allocator()  # what fit() does before its loop
        model = GPT(ModelConfig(vocab_size=VOCAB, context_length=1024, d_model=d, n_layer=n_layer, n_head=n_head))
        prepare_for_training(model)
        opt = make_optimizer(model, TrainConfig(lr=4e-4, weight_decay=0.1))

        def loss_of(x, y):
            return next_token_loss(model, (x, y))[0]
        zero = lambda: opt.zero_grad(set_to_none=False)  # noqa: E731
    else:
        if contender == "llms-from-scratch":
            from llms_from_scratch.ch04 import GPTModel

            model = GPTModel({"vocab_size": VOCAB, "context_length": 1024, "emb_dim": d, "n_heads": n_head,
                              "n_layers": n_layer, "drop_rate": 0.0, "qkv_bias": True})

            def logits_of(x):
                return model(x)
        else:
            from transformers import GPT2Config, GPT2LMHeadModel

            cfg = GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=d, n_layer=n_layer, n_head=n_head,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            cfg._attn_implementation = "sdpa"
            model = GPT2LMHeadModel(cfg)
            model.config._attn_implementation = "sdpa"

            def logits_of(x):
                return model(input_ids=x).logits
        opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)

        def loss_of(x, y):
            # the book's calc_loss_batch
            logits = logits_of(x)
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        zero = opt.zero_grad
    model.train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (batch, ctx), generator=gen)
    y = torch.randint(0, VOCAB, (batch, ctx), generator=gen)
    ac = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else None

    def step():
        if ac is not None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_of(x, y)
        else:
            loss = loss_of(x, y)
        loss.backward()
        opt.step()
        zero()
        return loss.item()

    for _ in range(2):
        step()
    times, faults = [], []
    for _ in range(steps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    times.sort()
    return {"median_s": times[len(times) // 2], "faults": sorted(faults)[len(faults) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--contenders", nargs="+", default=["lmforge", "llms-from-scratch", "transformers"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", nargs=3, metavar=("CONTENDER", "SHAPE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.threads)))
        return

    peak = {dt: matmul_peak(dt, args.threads) for dt in ("float32", "bfloat16")}
    print(f"matmul peak ({args.threads} threads, 2048³): fp32 {peak['float32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s ({peak['bfloat16'] / peak['float32']:.2f}×)")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results: dict[tuple, dict] = {}
    for shape in args.shapes:
        n_layer, d, n_head, ctx, batch = SHAPES[shape]
        fl = flops_per_step(n_layer, d, ctx, batch)
        print(f"\nshape {shape}: {n_layer} layers, width {d}, {n_head} heads, batch {batch} × {ctx}, vocab {VOCAB}")
        print(f"{'contender':<20}{'dtype':<10}{'step (s)':>10}{'tokens/s':>11}{'MFU':>8}{'faults/step':>13}")
        for dtype in args.dtypes:
            for c in args.contenders:
                out = subprocess.run([sys.executable, __file__, "--worker", c, shape, dtype, "--steps", str(args.steps),
                                      "--threads", str(args.threads)], capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    print(f"{c:<20}{dtype:<10} failed: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                tps = batch * ctx / r["median_s"]
                mfu = fl / r["median_s"] / peak[dtype]
                results[(shape, c, dtype)] = {**r, "tps": tps}
                print(f"{c:<20}{dtype:<10}{r['median_s']:>10.3f}{tps:>11,.0f}{mfu:>8.1%}{r['faults']:>13,}")
        peers = [c for c in args.contenders if c != "lmforge"]

        def best_peer(dtype):
            got = [results[(shape, c, dtype)]["tps"] for c in peers if (shape, c, dtype) in results]
            return max(got) if got else None
        ours = {dt: results.get((shape, "lmforge", dt), {}).get("tps") for dt in args.dtypes}
        for dt in args.dtypes:
            bp = best_peer(dt)
            if ours.get(dt) and bp:
                print(f"ratio lmforge {dt} / fastest peer {dt}: {ours[dt] / bp:.2f}×")
        if ours.get("bfloat16") and best_peer("float32"):
            print(f"ratio lmforge bfloat16 / fastest peer float32: {ours['bfloat16'] / best_peer('float32'):.2f}×")


if __name__ == "__main__":
    main()
