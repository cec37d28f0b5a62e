"""Fine-tuning-step speed: lmforge against Hugging Face transformers + peft, side by side in one run.

The model is SmolLM2-135M's architecture (30 layers, width 576, grouped-query attention,
vocabulary 49,152; random weights: speed does not depend on their values). One step =
forward, next-token loss, backward, AdamW, on the same token batch, in the same precision:

    full: every parameter trains
    lora: rank-16 adapters (alpha 16) on the attention and MLP projections; the rest frozen
          (peft: q, k, v, o, gate, up, down; lmforge: the fused qkv, o, gate, up, down)

Each contender runs in its own fresh subprocess with the same thread count.

    pip install -e ".[bench]"
    python benchmarks/finetune_step.py                       # full and lora, fp32 and bf16
    python benchmarks/finetune_step.py --modes lora --dtypes bfloat16 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BATCH, CTX = 4, 256


def worker(contender: str, mode: str, dtype_name: str, steps: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if contender == "lmforge":
        from lmforge.config import FinetuneConfig, LoRAConfig, ModelConfig, TrainConfig
        from lmforge.finetune import set_trainable
        from lmforge.losses import next_token_loss
        from lmforge.model import GPT
        from lmforge.optim import make_optimizer
        from lmforge.precision import tune_cpu_allocator
        from lmforge.train import prepare_for_training

        tune_cpu_allocator()  # what fit() does before its loop
        model = GPT(ModelConfig.from_preset("smollm2-135m", context_length=2048))
        set_trainable(model, FinetuneConfig(trainable="all" if mode == "full" else "lora"), LoRAConfig(rank=16,
                      alpha=16), head_trains=False)
        prepare_for_training(model)
        opt = make_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.0))

        def loss_of(x, y):
            return next_token_loss(model, (x, y))[0]
        zero = lambda: opt.zero_grad(set_to_none=False)  # noqa: E731
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                          rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg)
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

        def loss_of(x, y):
            logits = model(input_ids=x).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        zero = opt.zero_grad
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 49152, (BATCH, CTX), generator=gen)
    y = torch.randint(0, 49152, (BATCH, CTX), generator=gen)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_name == "bfloat16"):
            loss = loss_of(x, y)
        loss.backward()
        opt.step()
        zero()
        return loss.item()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_s": times[len(times) // 2], "trainable": trainable}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", nargs=3, metavar=("CONTENDER", "MODE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.threads)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"SmolLM2-135M shape, batch {BATCH} x {CTX} tokens, {args.threads} threads, median of {args.steps} steps")
    print(f"{'contender':<24}{'mode':<6}{'dtype':<10}{'trainable':>12}{'step (s)':>10}{'tokens/s':>10}")
    for dtype in args.dtypes:
        for mode in args.modes:
            got = {}
            for c in ("lmforge", "transformers+peft" if mode == "lora" else "transformers"):
                out = subprocess.run([sys.executable, __file__, "--worker", c.split("+")[0], mode, dtype,
                                      "--steps", str(args.steps), "--threads", str(args.threads)],
                                     capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    print(f"{c:<24}{mode:<6}{dtype:<10} failed: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                got[c] = r["median_s"]
                print(f"{c:<24}{mode:<6}{dtype:<10}{r['trainable']:>12,}{r['median_s']:>10.3f}"
                      f"{BATCH * CTX / r['median_s']:>10,.0f}")
            if len(got) == 2:
                ours, peer = got["lmforge"], next(v for k, v in got.items() if k != "lmforge")
                print(f"ratio lmforge / peer ({mode}, {dtype}): {peer / ours:.2f}x faster")


if __name__ == "__main__":
    main()
