"""Causal attention, forward + backward, on the CPU: lmforge's chunked products against PyTorch's
fused kernel (``scaled_dot_product_attention``, flash on the CPU) and the plain formula, side by
side in one process.

Shapes are SmolLM2-135M's heads (9 query heads sharing 3 key/value heads, 64 wide) and GPT-2's
(12 heads, 64 wide), at 1024 tokens per batch (batch = 1024 / length), for each length; times are
per 30 layers (one SmolLM2-135M step's attention). Each contender's best of ``--rounds``,
alternating, because this shared machine has slow spells.

    python benchmarks/attention_speed.py
    python benchmarks/attention_speed.py --lengths 256 --dtypes bfloat16 --rounds 5
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lmforge.attention import ATTENTION_CHUNK, ChunkedCausalAttention, attention_reference
from lmforge.precision import tune_cpu_allocator

SHAPES = {"smollm2 (9 q / 3 kv heads)": (9, 3), "gpt2 (12 heads)": (12, 12)}


def contenders(chunk: int) -> dict:
    return {
        "lmforge chunked": lambda q, k, v: ChunkedCausalAttention.apply(q, k, v, chunk),
        "torch sdpa (flash)": lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=q.size(1) != k.size(1)),
        "formula (reference)": attention_reference,
    }


def time_one(fn, heads: int, kv_heads: int, t: int, dtype: torch.dtype, steps: int) -> float:
    """Seconds for forward + backward of 30 layers' attention."""
    b = max(1, 1024 // t)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, t, 64, generator=gen, dtype=dtype, requires_grad=True)
               for n in (heads, kv_heads, kv_heads))
    grad = torch.randn(b, heads, t, 64, generator=gen, dtype=dtype)
    for _ in range(2):
        fn(q, k, v).backward(grad)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(q, k, v).backward(grad)
    return (time.perf_counter() - t0) / steps * 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=ATTENTION_CHUNK)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()  # as fit() does
    fns = contenders(args.chunk)
    print(f"causal attention forward + backward, s per 30 layers, 1024 tokens per batch, {args.threads} threads, "
          f"chunks of {args.chunk}, best of {args.rounds} rounds")
    print(f"{'heads':<28}{'dtype':<10}{'tokens':>7}" + "".join(f"{n:>21}" for n in fns) + f"{'sdpa / chunked':>16}")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for shape, (heads, kv_heads) in SHAPES.items():
            for t in args.lengths:
                best = {n: float("inf") for n in fns}
                for _ in range(args.rounds):
                    for n, fn in fns.items():
                        best[n] = min(best[n], time_one(fn, heads, kv_heads, t, dtype, args.steps))
                ratio = best["torch sdpa (flash)"] / best["lmforge chunked"]
                print(f"{shape:<28}{dtype_name:<10}{t:>7}" + "".join(f"{best[n]:>21.3f}" for n in fns)
                      + f"{ratio:>15.2f}x", flush=True)


if __name__ == "__main__":
    main()
