"""Generation speed: lmforge against Hugging Face transformers and llama.cpp, side by side in one run.

Every contender decodes greedily from the same weights (lmforge's model, exported by lmforge to a
Hugging Face folder for transformers and to GGUF files for llama.cpp), batch 1, with the same
thread count, each in its own fresh subprocess. Printed per case: decode tokens/s (after the
first token), time to first token, the fraction of the memory-bandwidth bound (one decode step
reads every weight once: bound = read bandwidth / weight bytes), and lmforge's ratios.

    cases   gpt2-short   gpt2-124m shape, 32-token prompt + 200 new tokens (random weights)
            gpt2-long    gpt2-124m shape, 920-token prompt + 100 new tokens (within GPT-2's 1,024 positions)
            smollm2      SmolLM2-135M (the real weights when cached, else its shape), 7-token prompt + 128
            batch        lmforge: 8 prompts decoded together vs one alone (aggregate tokens/s)

    pip install -e ".[bench]"              # transformers; llama.cpp: pip install llama-cpp-python (compiles ~15 min)
    python benchmarks/decode_speed.py                          # every case, every contender installed
    python benchmarks/decode_speed.py --cases smollm2 --dtypes bfloat16
A peer that is not installed is skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {"gpt2-short": ("gpt2-124m", 32, 200), "gpt2-long": ("gpt2-124m", 920, 100),
         "smollm2": ("smollm2-135m", 7, 128)}


def _model(preset: str):
    """The case's lmforge model and a tokenizer for the exports (speed does not depend on either's
    values: prompts are random ids): SmolLM2's real weights and tokenizer when cached."""
    import torch

    from lmforge.config import ModelConfig, TokenizerConfig
    from lmforge.model import GPT
    from lmforge.tokenizer import Tokenizer

    if preset == "smollm2-135m":
        try:
            from lmforge.models import load_any

            return load_any("smollm2-135m-instruct")
        except Exception:  # noqa: BLE001  (not cached, no internet: its shape with random weights)
            pass
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(preset, context_length=2048 if preset != "gpt2-124m" else 1024)).eval()
    return model, Tokenizer.train(["a b c d e f g " * 50], TokenizerConfig(vocab_size=260))


def prepare(folder: Path, case: str) -> None:
    """Write the case's weights once for every contender: lmforge run, HF folder, GGUF f32 and f16."""
    import torch

    from lmforge.checkpoint import save_model
    from lmforge.convert import export_hf
    from lmforge.gguf_io import export_gguf

    model, tok = _model(CASES[case][0] if case in CASES else "smollm2-135m")
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder / "run", model, 0, {"task": "pretrain"})
    tok.save(folder / "run" / "tokenizer.json")
    try:
        export_hf(model, folder / "hf", tok)
    except Exception as e:  # noqa: BLE001
        print(f"  ({case}: no Hugging Face folder for transformers: {e})")
    for t in ("f32", "f16"):
        try:
            export_gguf(model, tok, folder / f"model-{t}.gguf", t)
        except Exception as e:  # noqa: BLE001
            print(f"  ({case}: no GGUF {t} file for llama.cpp: {e})")
    torch.save({"vocab": model.config.vocab_size}, folder / "meta.pt")


def worker(contender: str, folder: str, case: str, dtype: str, threads: int, compile: bool = False) -> dict:
    import torch

    torch.set_num_threads(threads)
    preset, prompt_len, new = CASES[case] if case in CASES else ("smollm2-135m", 7, 64)
    folder = Path(folder)
    g = torch.Generator().manual_seed(0)
    vocab = torch.load(folder / "meta.pt")["vocab"]
    prompt = torch.randint(0, min(vocab, 5000), (prompt_len,), generator=g).tolist()
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.float32}[dtype]
    if contender == "lmforge":
        from lmforge.checkpoint import load_model
        from lmforge.config import SampleConfig
        from lmforge.generate import Decoder

        model, _ = load_model(folder / "run")
        model = model.to(dt).eval()
        if dtype == "int8":  # weight-only int8 matrices, fp32 activations (lmforge --quantize int8)
            from lmforge.quantize import quantize_model

            quantize_model(model, "int8")
        rows = 8 if case == "batch" else 1

        def run_one_token() -> None:
            for _ in Decoder(model, [prompt], SampleConfig(max_new_tokens=1, temperature=0, stop_at_eos=False)):
                pass

        def run(n_rows: int) -> tuple[float, float, int]:
            cfg = SampleConfig(max_new_tokens=new, temperature=0, stop_at_eos=False)
            t0 = time.perf_counter()
            first = None
            n = 0
            for step in Decoder(model, [prompt] * n_rows, cfg, compile=compile):
                n += sum(t is not None for t in step)
                if first is None:
                    first = time.perf_counter() - t0
            return first, time.perf_counter() - t0, n

        t_warm = time.perf_counter()
        run(1)  # warm-up (with --compile: the compilation of every decode graph this case needs)
        t_warm = time.perf_counter() - t_warm
        if case == "batch":
            _, t1, n1 = run(1)
            _, t8, n8 = run(rows)
            return {"single_tok_s": n1 / t1, "batch_tok_s": n8 / t8}
        first, total, n = run(1)
        return {"ttft": _first_token(run_one_token), "tok_s": (n - 1) / (total - first), "bytes": _weight_bytes(model), "warm_up_s": t_warm}
    if contender == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder / "hf", torch_dtype=dt).eval()
        ids = torch.tensor([prompt])

        def gen(n: int) -> float:
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
            return time.perf_counter() - t0

        gen(4)  # warm-up
        first = _first_token(lambda: gen(1))
        total = gen(new)
        return {"ttft": first, "tok_s": (new - 1) / (total - first), "bytes": _weight_bytes(model)}
    if contender == "llama.cpp":
        from llama_cpp import Llama

        gguf = folder / ("model-f16.gguf" if dtype == "bfloat16" else "model-f32.gguf")
        llm = Llama(model_path=str(gguf), n_threads=threads, n_ctx=2048, verbose=False)
        t0 = time.perf_counter()
        first, n = None, 0
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            n += 1
            if first is None:
                first = time.perf_counter() - t0
            if n == new:
                break
        total = time.perf_counter() - t0
        one = _first_token(lambda: next(iter(llm.generate(prompt, temp=0.0, top_k=1, reset=True))))
        return {"ttft": one, "tok_s": (n - 1) / (total - first), "bytes": gguf.stat().st_size}
    raise ValueError(contender)


def _first_token(once, repeats: int = 5) -> float:
    """Time to the first token: the median of a few prompts run for one token (a single one is
    noisy on a shared machine)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _weight_bytes(model) -> int:
    """Bytes one decode step reads: every matrix once (a tied matrix counted once; int8 buffers too)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen and t.dim() == 2:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def read_bandwidth(threads: int) -> float:
    """Measured read bandwidth, bytes/s: a sum over a 512 MB buffer (what a decode step does to
    its weights: read each once), with the benchmark's thread count."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(128 * 2**20, dtype=torch.float32)
    a.sum()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.numel() * 4 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=[*CASES, "batch"])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16", "int8"],
                    help="int8: lmforge's weight-only int8 (the peers run their best precision, bf16, beside it)")
    ap.add_argument("--contenders", nargs="*", default=["lmforge", "transformers", "llama.cpp"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also lmforge with --compile true (decode step compiled)")
    ap.add_argument("--worker", nargs=4, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", nargs=2, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.prepare:
        prepare(Path(a.prepare[0]), a.prepare[1])
        return
    if a.worker:
        name = a.worker[0]
        print(json.dumps(worker(name.split("+")[0], a.worker[1], a.worker[2], a.worker[3], a.threads,
                                compile=name.endswith("+compile"))))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    bw = read_bandwidth(a.threads)
    print(f"read bandwidth {bw / 1e9:.1f} GB/s, {a.threads} threads")
    missing = {}
    for name, module in (("transformers", "transformers"), ("llama.cpp", "llama_cpp")):
        try:
            __import__(module)
        except ImportError:
            missing[name] = f"{module} is not installed"
    for c in missing:
        if c in a.contenders:
            print(f"skipped {c}: {missing[c]}")
    with tempfile.TemporaryDirectory() as tmp:
        for case in a.cases:
            folder = Path(tmp) / case
            subprocess.run([sys.executable, __file__, "--prepare", str(folder), case], check=True, env=env)
            for dtype in a.dtypes:
                res = {}
                for c in [*a.contenders, *(["lmforge+compile"] if a.compile else [])]:
                    if c in missing or (case == "batch" and c != "lmforge") or (dtype == "int8" and not c.startswith("lmforge")):
                        continue
                    if c == "llama.cpp" and not any(folder.glob("*.gguf")):
                        continue  # no GGUF of this architecture (prepare said why)
                    proc = subprocess.run([sys.executable, __file__, "--threads", str(a.threads), "--worker", c,
                                           str(folder), case, dtype], capture_output=True, text=True, env=env)
                    if proc.returncode != 0:
                        print(f"  {case} {dtype} {c}: failed: {proc.stderr.strip().splitlines()[-1:]}")
                        continue
                    res[c] = json.loads(proc.stdout.strip().splitlines()[-1])
                if case == "batch" and "lmforge" in res:
                    r = res["lmforge"]
                    print(f"{case:<11} {dtype:<9} 1 stream {r['single_tok_s']:6.1f} tok/s, 8 streams "
                          f"{r['batch_tok_s']:6.1f} tok/s aggregate: {r['batch_tok_s'] / r['single_tok_s']:.2f}x")
                    continue
                for c, r in res.items():
                    bound = bw / r["bytes"]
                    if c.startswith("lmforge"):  # an lmforge row: its ratios to the peers measured
                        ratios = "".join(f"   {c} / {p}: {r['tok_s'] / res[p]['tok_s']:.2f}x"
                                         for p in ("transformers", "llama.cpp") if p in res)
                    else:
                        ratios = "" if "lmforge" not in res else \
                            f"   lmforge / {c}: {res['lmforge']['tok_s'] / r['tok_s']:.2f}x"
                    print(f"{case:<11} {dtype:<9} {c:<12} {r['tok_s']:6.1f} tok/s  first token {r['ttft'] * 1e3:7.0f} ms"
                          f"  {r['tok_s'] / bound:5.1%} of the bandwidth bound{ratios}"
                          + (f"   (first generation, compiling: {r['warm_up_s']:.0f} s)" if c.endswith("+compile") else ""))


if __name__ == "__main__":
    main()
