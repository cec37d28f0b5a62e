"""The book's chapter-5 numbers, reproduced: pretrain the gpt2-124m shape on "The Verdict".

Settings are the book's: GPT-2 tokenizer, context 256, stride 256, batch 2, AdamW
(lr 4e-4, weight decay 0.1, betas 0.9/0.999), no schedule, no clipping, 10 epochs,
dropout 0.1, no QKV bias, a 90/10 character split, seed 123. The book reports a final
training loss of 0.569 and a validation loss of 6.373 (the model memorises the story
and does not generalise from 5,145 tokens); the band to land in is train < 1.0, val < 7.

    python benchmarks/verdict.py [--dtype float32|bfloat16|auto] [--epochs 10]

The text and GPT-2's vocabulary are read from --verdict / --gpt2-dir (defaulting to the
shared data folder beside the project); with internet they are fetched instead.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from lmforge.config import recipe_configs
from lmforge.data import SlidingWindows, eval_batches
from lmforge.evaluate import evaluate_loss
from lmforge.losses import next_token_loss
from lmforge.model import GPT
from lmforge.tokenizer import Tokenizer
from lmforge.train import fit

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
VERDICT_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/"
               "the-verdict.txt")
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def _fetch(path: Path | None, url: str, cache: Path) -> Path:
    if path is not None and path.exists():
        return path
    cache.parent.mkdir(parents=True, exist_ok=True)
    if not cache.exists():
        urllib.request.urlretrieve(url, cache)
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verdict", type=Path, default=SHARED / "the-verdict.txt")
    ap.add_argument("--gpt2-dir", type=Path, default=SHARED / "gpt2")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tied", action="store_true", help="tie the output head to the embedding (GPT-2 does; the book's "
                    "GPTModel does not)")
    ap.add_argument("--init", default="torch", choices=["torch", "gpt2"],
                    help="'torch': PyTorch's default initialisation, as the book's GPTModel; 'gpt2': lmforge's default")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path.home() / ".cache" / "lmforge" / "bench"
    text = _fetch(args.verdict, VERDICT_URL, cache / "the-verdict.txt").read_text(encoding="utf-8")
    tok = Tokenizer.from_gpt2_files(_fetch(args.gpt2_dir / "encoder.json", GPT2_URL + "encoder.json",
                                           cache / "encoder.json"),
                                    _fetch(args.gpt2_dir / "vocab.bpe", GPT2_URL + "vocab.bpe", cache / "vocab.bpe"))
    split = int(0.9 * len(text))
    train_tokens = np.array(tok.encode(text[:split]), dtype=np.uint16)
    val_tokens = np.array(tok.encode(text[split:]), dtype=np.uint16)
    print(f"the-verdict: {len(train_tokens) + len(val_tokens):,} GPT-2 tokens ({len(train_tokens):,} train, "
          f"{len(val_tokens):,} val)")

    torch.manual_seed(123)
    windows = SlidingWindows(train_tokens, 256, 256, batch_size=2, seed=123)
    steps = args.epochs * len(windows)
    # The `book` recipe (config.RECIPES: AdamW 4e-4, betas 0.9/0.999, weight decay 0.1, constant rate,
    # no warm-up, no clipping) at the book's GPT-2 124M with its context, dropout and qkv bias.
    cfg, train_cfg = recipe_configs("book", "gpt2-124m", context_length=256, dropout=0.1, qkv_bias=False,
                                    tie_embeddings=args.tied, batch_size=2, max_steps=steps, stride=256,
                                    dtype=args.dtype, eval_interval=len(windows), eval_batches=100,
                                    save_interval=10**9, log_interval=1, seed=123)
    model = GPT(cfg)
    if args.init == "torch":  # re-run each layer's own reset_parameters, as a model built from nn modules gets
        torch.manual_seed(123)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def loss_on(tokens, dtype):  # the book's calc_loss_loader: every window, eval mode
        return evaluate_loss(model, eval_batches(tokens, 256, 2, 10**6), dtype)["loss"]

    def evaluate(m, dtype):
        loss = loss_on(val_tokens, dtype)
        return {"loss": loss, "perplexity": math.exp(loss)}

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run:
        result = fit(model, windows.batch, next_token_loss, train_cfg, run, evaluate=evaluate)
    minutes = (time.perf_counter() - t0) / 60
    train_loss = loss_on(train_tokens, torch.float32)
    val_loss = loss_on(val_tokens, torch.float32)
    print(f"{result.step} steps ({args.epochs} epochs) in {minutes:.1f} min, precision {args.dtype}")
    print(f"final train loss {train_loss:.3f} (book 0.569, band < 1.0)   val loss {val_loss:.3f} (book 6.373, band < 7)")
    ok = train_loss < 1.0 and val_loss < 7.0
    print("in the book's band" if ok else "OUTSIDE the book's band")


if __name__ == "__main__":
    main()
