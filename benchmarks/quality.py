"""Quality per compute: how good a model each training recipe makes from the same tokens.

Every recipe trains the same model size (the default run's, gpt-micro's shape unless --size)
on the same data (the built-in corpus, the default run's 4,096-token tokenizer and split), the
same batch (16 × 128) and the same number of steps, through lmforge's own ``fit``. Validation
loss is measured every --eval_every steps on the same held-out windows. Printed: validation
bits per byte at each third of the run (mean and spread over seeds), the tokens (and FLOPs)
each recipe needs to reach the ``book`` recipe's final loss and nanoGPT's, those as ratios, the
training tokens/s of each recipe measured in the same run (so a recipe that is better per token
but slower per second shows both) and the wall-clock ratio. A PNG of the curves (bits per byte
against tokens and against FLOPs) is written beside the JSON results.

    python benchmarks/quality.py                                   # book, nanogpt, modern; 2 seeds
    python benchmarks/quality.py --sweep                           # the learning-rate sweep
    python benchmarks/quality.py --recipes book modern --seeds 0 1 2 --steps 300
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SWEEP = {  # recipe: the learning rates tried (for muon recipes: Muon's rate; AdamW's stays the recipe's)
    "book": [4e-4, 1e-3, 2e-3],
    "nanogpt": [5e-4, 1e-3, 2e-3, 4e-3],
    "modern": [0.005, 0.01, 0.02, 0.04],
}


def prepare_data(work: Path, vocab: int, data: list[str]) -> tuple:
    """A tokenizer and shards of ``data`` (the default run's: the built-in corpus), made once, reused.
    ``data`` may name a known data set of lmforge's hub (fetched into its cache) or files."""
    from lmforge import hub
    from lmforge.config import DataConfig, TokenizerConfig
    from lmforge.data import ShardSet, prepare
    from lmforge.pipeline import train_tokenizer
    from lmforge.tokenizer import Tokenizer

    paths = [str(hub.fetch(d)) if d in hub.REGISTRY else d for d in data]
    work.mkdir(parents=True, exist_ok=True)
    tok_path = work / "tokenizer.json"
    if not tok_path.is_file():
        train_tokenizer(paths, tok_path, TokenizerConfig(vocab_size=vocab), DataConfig(), overwrite=True)
    tok = Tokenizer.load(tok_path)
    shards = prepare(paths, work / "data", tok, DataConfig(), quiet=True, save_tokenizer=True)
    val = shards.tokens("val")
    bytes_per_token = len(tok.decode_bytes(np.asarray(val).tolist())) / len(val)
    return tok, ShardSet.open(work / "data"), bytes_per_token


def train_one(recipe: str, lr: float | None, seed: int, a: argparse.Namespace, shards, bytes_per_token: float) -> dict:
    from lmforge.config import recipe_configs
    from lmforge.data import RandomWindows
    from lmforge.evaluate import evaluate_tokens
    from lmforge.losses import next_token_loss
    from lmforge.model import GPT
    from lmforge.train import fit

    model_cfg, train_cfg = recipe_configs(recipe, a.size, vocab_size=shards.index["vocab_size"],
                                          batch_size=a.batch, max_steps=a.steps, seed=seed,
                                          eval_interval=a.eval_every, log_interval=a.eval_every,
                                          save_interval=10**9, dtype="auto", rate=lr)
    torch.manual_seed(seed)
    model = GPT(model_cfg)
    train_tokens, val_tokens = shards.tokens("train"), shards.tokens("val")
    windows = RandomWindows(train_tokens, model_cfg.context_length, train_cfg.batch_size, seed)

    def evaluate(m, dtype) -> dict:
        return evaluate_tokens(m, val_tokens, 16, a.eval_batches, dtype)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fit(model, windows.batch, next_token_loss, train_cfg, tmp, evaluate=evaluate, progress=False, task=recipe)
        seconds = time.perf_counter() - t0
        recs = [json.loads(ln) for ln in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = train_cfg.batch_size * model_cfg.context_length * train_cfg.grad_accum
    curve = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
    return {"recipe": recipe, "lr": train_cfg.muon_lr if train_cfg.optimizer == "muon" else train_cfg.lr,
            "seed": seed, "tokens_per_step": tokens_per_step,
            "flops_per_token": model.flops_per_token(model_cfg.context_length),
            "steps": [s for s, _ in curve], "val_loss": [v for _, v in curve],
            "val_bpb": [v / math.log(2) / bytes_per_token for _, v in curve],
            "tokens_per_s": statistics.median(speeds[1:] or speeds), "seconds": seconds,
            "params": model.num_params()}


def steps_to_reach(steps: list[int], losses: list[float], target: float) -> float | None:
    """The (interpolated) step at which a validation curve first reaches ``target``."""
    for i, (s, v) in enumerate(zip(steps, losses)):
        if v <= target:
            if i == 0:
                return float(s)
            s0, v0 = steps[i - 1], losses[i - 1]
            return s0 + (s - s0) * (v0 - target) / (v0 - v)
    return None


def mean_curve(runs: list[dict], key: str) -> list[float]:
    return [statistics.mean(vals) for vals in zip(*(r[key] for r in runs))]


def report(results: list[dict], a: argparse.Namespace, out: Path) -> None:
    by = {}
    for r in results:
        by.setdefault(r["recipe"], []).append(r)
    steps = results[0]["steps"]
    marks = sorted({s for s in steps if s in {round(a.steps * f / 3) for f in (1, 2, 3)}} | {steps[-1]})
    finals = {name: statistics.mean(r["val_loss"][-1] for r in runs) for name, runs in by.items()}
    print(f"\ndata {' '.join(a.data)}; size {a.size}, batch {a.batch} x 128, {a.steps} steps, seeds {a.seeds}; validation bits per byte")
    head = " | ".join(f"step {s}" for s in marks)
    print(f"| recipe | params | {head} | seed spread (final) | tokens/s |")
    print("| --- | ---: |" + " ---: |" * len(marks) + " ---: | ---: |")
    for name, runs in by.items():
        bpb = mean_curve(runs, "val_bpb")
        cells = " | ".join(f"{bpb[steps.index(s)]:.3f}" for s in marks)
        spread = max(r["val_bpb"][-1] for r in runs) - min(r["val_bpb"][-1] for r in runs)
        tps = statistics.mean(r["tokens_per_s"] for r in runs)
        print(f"| {name} | {runs[0]['params'] / 1e6:.2f} M | {cells} | {spread:.3f} | {tps:,.0f} |")
    for ref in ("book", "nanogpt"):
        if ref not in finals:
            continue
        print(f"\nto reach {ref}'s final validation loss ({finals[ref]:.3f} nats):")
        print("| recipe | steps | tokens | fewer tokens than " + ref + " | FLOPs | wall-clock ratio |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        ref_runs = by[ref]
        ref_tokens = a.steps * ref_runs[0]["tokens_per_step"]
        ref_seconds = ref_tokens / statistics.mean(r["tokens_per_s"] for r in ref_runs)
        for name, runs in by.items():
            s = steps_to_reach(steps, mean_curve(runs, "val_loss"), finals[ref])
            if s is None:
                print(f"| {name} | not reached | | | | |")
                continue
            tokens = s * runs[0]["tokens_per_step"]
            seconds = tokens / statistics.mean(r["tokens_per_s"] for r in runs)
            print(f"| {name} | {s:.0f} | {tokens:,.0f} | {ref_tokens / tokens:.2f}× | "
                  f"{tokens * runs[0]['flops_per_token']:.3g} | {ref_seconds / seconds:.2f}× |")
    plot(by, out.with_suffix(".png"))
    out.write_text(json.dumps(results, indent=1))
    print(f"\nresults: {out}; curves: {out.with_suffix('.png')}")


def plot(by: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in by.items():
        bpb = mean_curve(runs, "val_bpb")
        tokens = [s * runs[0]["tokens_per_step"] for s in runs[0]["steps"]]
        axes[0].plot(tokens, bpb, label=name)
        axes[1].plot([t * runs[0]["flops_per_token"] for t in tokens], bpb, label=name)
    for ax, xlabel in zip(axes, ("training tokens", "training FLOPs")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation bits per byte")
        ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["book", "nanogpt", "modern"])
    ap.add_argument("--size", default="gpt-micro", help="a model preset giving the shape")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--eval_every", type=int, default=20)
    ap.add_argument("--eval_batches", type=int, default=8, help="validation batches of 16 × 128 per evaluation")
    ap.add_argument("--sweep", action="store_true", help="try each recipe at the rates in SWEEP (first seed only)")
    ap.add_argument("--rates", type=float, nargs="+", default=None, help="with --sweep: only these rates")
    ap.add_argument("--data", nargs="+", default=["builtin"], help="the corpus: builtin (the default run's), "
                    "a data set of lmforge's hub (tiny-shakespeare, the-verdict) or text files")
    ap.add_argument("--work", default="runs/quality", help="where the tokenizer, shards and results go")
    a = ap.parse_args()
    work = Path(a.work)
    _, shards, bytes_per_token = prepare_data(work, 4096, a.data)
    results = []
    for recipe in a.recipes:
        rates = (a.rates or SWEEP.get(recipe, [None])) if a.sweep else [None]
        for lr in rates:
            for seed in (a.seeds[:1] if a.sweep else a.seeds):
                r = train_one(recipe, lr, seed, a, shards, bytes_per_token)
                label = f"{recipe}@{r['lr']:g}" if a.sweep else recipe
                r["recipe"] = label
                print(f"{label} seed {seed}: final val loss {r['val_loss'][-1]:.4f} "
                      f"({r['val_bpb'][-1]:.3f} bits/byte), {r['tokens_per_s']:,.0f} tok/s, {r['seconds']:.0f} s",
                      flush=True)
                results.append(r)
    report(results, a, work / ("sweep.json" if a.sweep else "quality.json"))


if __name__ == "__main__":
    main()
