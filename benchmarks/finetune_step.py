"""Fine-tuning-step speed: lmforge against Hugging Face transformers + peft, side by side in one run.

The model is SmolLM2-135M's architecture (30 layers, width 576, grouped-query attention,
vocabulary 49,152; random weights: speed does not depend on their values). One step =
forward, next-token loss, backward, AdamW, on the same token batch, in the same precision:

    full: every parameter trains
    lora: rank-16 adapters (alpha 16) on the attention and MLP projections; the rest frozen
          (peft: q, k, v, o, gate, up, down; lmforge: the fused qkv, o, gate, up, down)

Each contender runs in its own fresh subprocess with the same thread count. ``--compile`` adds
both compiled: lmforge as ``--train.compile true`` does it (each block through torch.compile), and
transformers through ``model.compile()`` (what its Trainer's ``torch_compile=True`` does).

    pip install -e ".[bench]"
    python benchmarks/finetune_step.py                       # full and lora, fp32 and bf16
    python benchmarks/finetune_step.py --modes lora --dtypes bfloat16 --steps 3
    python benchmarks/finetune_step.py --device cuda --dtypes bfloat16 --compile
    python benchmarks/finetune_step.py --masked 0.5          # instruction batches: half of each row is prompt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BATCH, CTX = 4, 256


def worker(contender: str, mode: str, dtype_name: str, steps: int, threads: int, device: str = "cpu",
           compile: bool = False, masked: float = 0.0) -> dict:
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
        model.to(device)
        if compile:  # as fit() does with --train.compile true
            for block in model.h:
                block.compile()
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
        model.to(device)
        if compile:
            model.compile()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0,
                                fused=device == "cuda")

        def loss_of(x, y):
            logits = model(input_ids=x).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        zero = opt.zero_grad
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 49152, (BATCH, CTX), generator=gen).to(device)
    y = torch.randint(0, 49152, (BATCH, CTX), generator=gen)
    y[:, :int(masked * CTX)] = -100  # an instruction batch: no loss on the prompt (both skip it in the mean)
    y = y.to(device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype_name == "bfloat16"):
            loss = loss_of(x, y)
        loss.backward()
        opt.step()
        zero()
        return loss.item()

    for _ in range(3 if compile else 2):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_s": times[len(times) // 2], "trainable": trainable}


def main() -> None:
    global BATCH, CTX
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="times each contender runs, alternating; best kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=BATCH, help="rows per step")
    ap.add_argument("--ctx", type=int, default=CTX, help="tokens per row")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="also both contenders compiled")
    ap.add_argument("--masked", type=float, default=0.0,
                    help="fraction of each row's first positions with no target (-100), as an instruction "
                         "batch's prompt")
    ap.add_argument("--worker", nargs=3, metavar=("CONTENDER", "MODE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    BATCH, CTX = args.batch, args.ctx
    if args.worker:
        contender, compile = args.worker[0].removesuffix("+compile"), args.worker[0].endswith("+compile")
        print(json.dumps(worker(contender, *args.worker[1:], args.steps, args.threads, args.device, compile,
                                args.masked)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"SmolLM2-135M shape, batch {BATCH} x {CTX} tokens, {args.device}, {args.threads} threads, "
          f"median of {args.steps} steps, best of {args.rounds} alternating rounds"
          + (f", the first {args.masked:.0%} of each row's targets masked" if args.masked else ""))
    print(f"{'contender':<27}{'mode':<6}{'dtype':<10}{'trainable':>12}{'step (s)':>10}{'tokens/s':>10}")
    for dtype in args.dtypes:
        for mode in args.modes:
            peer = "transformers+peft" if mode == "lora" else "transformers"
            contenders = ("lmforge", peer, *(("lmforge+compile", peer + "+compile") if args.compile else ()))
            runs: dict[str, list[float]] = {c: [] for c in contenders}
            trainable: dict[str, int] = {}
            # Rounds alternate the contenders, so a slow spell of this shared machine lands on both;
            # each contender's best round is the one reported.
            for _ in range(args.rounds):
                for c in contenders:
                    worker_name = c.split("+")[0] + ("+compile" if c.endswith("+compile") else "")
                    out = subprocess.run([sys.executable, __file__, "--worker", worker_name, mode, dtype,
                                          "--steps", str(args.steps), "--threads", str(args.threads),
                                          "--device", args.device, "--batch", str(BATCH), "--ctx", str(CTX),
                                          "--masked", str(args.masked)],
                                         capture_output=True, text=True, env=env)
                    if out.returncode != 0:
                        print(f"{c:<27}{mode:<6}{dtype:<10} failed: {out.stderr.strip().splitlines()[-1:]}")
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    runs[c].append(r["median_s"])
                    trainable[c] = r["trainable"]
            got = {c: min(t) for c, t in runs.items() if t}
            for c, best in got.items():
                rounds = " ".join(f"{t:.2f}" for t in runs[c])
                print(f"{c:<27}{mode:<6}{dtype:<10}{trainable[c]:>12,}{best:>10.3f}{BATCH * CTX / best:>10,.0f}"
                      f"   rounds: {rounds}")
            for suffix in ("", "+compile"):
                if "lmforge" + suffix in got and peer + suffix in got:
                    print(f"ratio lmforge{suffix} / {peer}{suffix} ({mode}, {dtype}): "
                          f"{got[peer + suffix] / got['lmforge' + suffix]:.2f}x faster")


if __name__ == "__main__":
    main()
