"""Fine-tuning quality with the real pretrained SmolLM2-135M-Instruct, on this CPU, offline.

    sms       the book's chapter 6 task: balanced SMS spam (642 + 642, 70/10/20 split, seed 123),
              classification fine-tuning with the last block trained and with LoRA; test accuracy
              and minutes (the book: 95.67 % and 96.67 % with GPT-2 124M)
    fourways  zero-shot, few-shot, classifier and instruction fine-tuning on the same SMS split
    instruct  the book's 1,100 instruction records (85/5/10): validation loss and test ROUGE-L
              before and after instruction fine-tuning (and the judge score with --judge_url)
    dpo       one epoch of DPO on the preference records: validation reward margin before and after

Each part writes its runs under --out and prints its numbers; --limit subsamples for a quick run.

    python benchmarks/finetune_quality.py sms
    python benchmarks/finetune_quality.py fourways --limit 400
    python benchmarks/finetune_quality.py instruct --limit 300 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"


def sms(args) -> None:
    from lmforge.config import FinetuneConfig, LoRAConfig, TrainConfig
    from lmforge.finetune import finetune_classify

    for mode, lr in (("last", 1e-4), ("lora", 5e-4)):
        if args.modes and mode not in args.modes:
            continue
        lr = args.lr or lr
        t0 = time.perf_counter()
        res = finetune_classify(MODEL, "sms-spam", Path(args.out) / (f"sms-{mode}" + (f"-lr{lr:g}" if args.lr else "")),
                                FinetuneConfig(trainable=mode, epochs=args.epochs or 5.0, limit=args.limit),
                                TrainConfig(lr=lr, warmup_steps=0, batch_size=8), LoRAConfig(rank=16, alpha=16),
                                balance=True, overwrite=True, progress=not args.quiet)
        print(f"SMS spam, {mode}: test accuracy {res['test']['accuracy']:.4f} ({res['test']['n']} texts), "
              f"val {res['val']['accuracy']:.4f}, {(time.perf_counter() - t0) / 60:.1f} min")


def fourways(args) -> None:
    from lmforge.four_ways import four_ways

    res = four_ways(MODEL, "sms-spam", Path(args.out) / "four-ways", limit=args.limit, shots=args.shots,
                    epochs=args.epochs or 1.0, progress=not args.quiet, overwrite=True)
    print(json.dumps(res["ways"], indent=1))


def instruct(args) -> None:
    from lmforge.config import FinetuneConfig, LoRAConfig, TrainConfig
    from lmforge.finetune import finetune_instruct

    t0 = time.perf_counter()
    run = Path(args.out) / "instruct"
    res = finetune_instruct(MODEL, "instruction-data", run,
                            FinetuneConfig(trainable=args.trainable, epochs=args.epochs or 2.0,
                                           split=(0.85, 0.05, 0.10), limit=args.limit, max_length=args.max_length),
                            TrainConfig(lr=5e-5 if args.trainable != "lora" else 5e-4, warmup_steps=0, batch_size=8),
                            LoRAConfig(rank=16, alpha=16), template=args.template, respond_test=args.respond_test,
                            overwrite=True, progress=not args.quiet)
    for when in ("before", "after"):
        r = res[when]
        print(f"{when}: val loss {r['val']['loss']:.4f}, test ROUGE-L {r.get('rouge_l', float('nan')):.4f}")
    print(f"{(time.perf_counter() - t0) / 60:.1f} min")
    if args.judge_url:
        from lmforge.judge import http_judge, judge_responses

        score = judge_responses(run / "responses.json", http_judge(args.judge_url, args.judge_model))
        print(f"judge score: {score['mean']}")


def dpo(args) -> None:
    from lmforge.config import FinetuneConfig, LoRAConfig, TrainConfig
    from lmforge.finetune import finetune_dpo

    t0 = time.perf_counter()
    res = finetune_dpo(MODEL, "instruction-data-with-preference", Path(args.out) / "dpo",
                       FinetuneConfig(trainable=args.trainable, epochs=args.epochs or 1.0, split=(0.85, 0.05, 0.10),
                                      limit=args.limit, max_length=args.max_length),
                       TrainConfig(lr=5e-6 if args.trainable != "lora" else 5e-5, warmup_steps=0, batch_size=8,
                                   weight_decay=0.01),
                       LoRAConfig(rank=16, alpha=16), template=args.template, beta=0.1, overwrite=True,
                       progress=not args.quiet)
    for when in ("before", "after"):
        r = res[when]
        print(f"{when}: val loss {r['loss']:.4f}, reward margin {r['reward_margin']:.4f}")
    print(f"{(time.perf_counter() - t0) / 60:.1f} min")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["sms", "fourways", "instruct", "dpo"])
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--limit", type=int, default=None, help="records used (a subsample), before splitting")
    ap.add_argument("--epochs", type=float, default=None)
    ap.add_argument("--modes", nargs="*", default=None, help="sms: last, lora")
    ap.add_argument("--trainable", default="all", help="instruct / dpo: all, last, lora")
    ap.add_argument("--template", default="alpaca")
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--respond_test", type=int, default=None)
    ap.add_argument("--judge_url", default=None)
    ap.add_argument("--judge_model", default="llama3")
    ap.add_argument("--lr", type=float, default=None, help="sms: learning rate (default 1e-4 last, 5e-4 lora)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    {"sms": sms, "fourways": fourways, "instruct": instruct, "dpo": dpo}[args.part](args)


if __name__ == "__main__":
    main()
