"""Tokenizer speed: BPE training on 10 MB and encoding throughput, lmforge's two paths side by side.

    python benchmarks/tokenizer.py [--corpus FILE] [--vocab 8192]

Training: 10 MB of text to an 8,192-token vocabulary (target: under 60 s on 2 cores).
Encoding: lmforge's tiktoken fast path vs its pure-Python reference (which must agree),
10 MB whitespace runs, and worker processes on the whole corpus.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lmforge.config import TokenizerConfig
from lmforge.data import builtin_corpus
from lmforge.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=SHARED / "corpora" / "sotu.txt",
                    help="a text file (default: the shared State of the Union corpus; else the built-in corpus)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--mb", type=float, default=10.0)
    args = ap.parse_args()
    text = (args.corpus.read_text(encoding="utf-8") if args.corpus.exists() else "\n\n".join(builtin_corpus()))
    text = text[: int(args.mb * 1_000_000)]
    print(f"corpus: {len(text.encode()) / 1e6:.1f} MB")
    t0 = time.perf_counter()
    tok = Tokenizer.train(text, TokenizerConfig(vocab_size=args.vocab))
    print(f"BPE training to {args.vocab} tokens: {time.perf_counter() - t0:.1f} s")

    sample = text[:1_000_000]
    t0 = time.perf_counter()
    ref = tok.encode_reference(sample)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = tok.encode(sample)
    t_fast = time.perf_counter() - t0
    assert ref == fast, "fast path and reference disagree"
    print(f"encode 1 MB: reference {t_ref:.2f} s, tiktoken fast path {t_fast:.3f} s ({t_ref / t_fast:.0f}× faster), "
          "identical ids")
    # Runs that tiktoken alone cannot take (a regex stack overflow near a million whitespace
    # characters): lmforge cuts them before the regex, on both paths.
    for label, unit in (("spaces", " "), ("CRLF", "\r\n")):
        run = "x" + unit * (10_000_000 // len(unit)) + "y"
        t0 = time.perf_counter()
        fast = tok.encode_ordinary(run)
        t_fast = time.perf_counter() - t0
        assert tok.decode(fast) == run
        print(f"encode a 10 MB run of {label}: {t_fast:.2f} s, {len(fast):,} ids")
    docs = [text[i:i + 100_000] for i in range(0, len(text), 100_000)]
    t0 = time.perf_counter()
    tok.encode_batch(docs, workers=1)
    t1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok.encode_batch(docs, workers=2, min_chars=0)
    t2 = time.perf_counter() - t0
    print(f"encode {len(text) / 1e6:.0f} MB: 1 process {t1:.2f} s, 2 worker processes {t2:.2f} s ({t1 / t2:.2f}×)")


if __name__ == "__main__":
    main()
