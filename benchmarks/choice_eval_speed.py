"""Multiple-choice scoring speed: lmforge against lm-evaluation-harness' own ``hf`` backend, side by side.

The task is HellaSwag-like and synthetic, made with a seed: N items of 4 choices, contexts of
40-80 tokens and endings of 10-30 tokens (counted in the model's tokenizer), written once as
plain JSONL (what ``lmforge eval choice`` reads) with a harness task YAML over the same file.
The model is SmolLM2-135M: the real weights of smollm2-135m-instruct when lmforge's hub cache
has them, else its shape with random weights; saved once as an lmforge run and exported by
lmforge to a Hugging Face folder for transformers. Contenders, each in its own fresh subprocess
with the same thread count, precision and batch size (continuations per forward pass):

    lmforge          choice_eval.evaluate_choice: each context run once, its keys and values
                     shared by its choices
    lmforge-harness  the same model through the harness: lm_eval.simple_evaluate(model="lmforge")
    hf               the harness' own backend: simple_evaluate(model="hf", model_args="pretrained=
                     <exported folder>,dtype=...")

Timed: scoring alone (the harness' ``loglikelihood`` call, which tokenizes too, or the whole of
``evaluate_choice``), after a warm-up on a few items; loading the model and building the task are
not counted. Printed per precision: items/s of each, lmforge / hf, and whether the accuracies
agree (with the largest per-choice log-likelihood difference to hf). The issue's target:
lmforge at least 2x the hf backend.

    pip install -e ".[bench,eval]"          # transformers and lm-eval
    python benchmarks/choice_eval_speed.py                                  # 200 items, fp32 and bf16
    python benchmarks/choice_eval_speed.py --items 40 --dtypes float32 --threads 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK = "synthetic_choice"
WORDS = ("the a man woman dog child team chef player crowd camera boy girl person group driver people "
         "walks runs jumps sits stands holds throws catches opens pours cuts mixes paints climbs rides "
         "slowly quickly carefully then again together outside inside around across into onto under "
         "water ball rope bike horse kitchen table bowl knife paper wall ladder street field river "
         "snow sand tree door car window stage mat bar pool board brush glass box hat shirt shoes "
         "red blue green small large old new bright heavy wet dry long short happy tired").split()
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _model():
    """SmolLM2-135M and its tokenizer (as benchmarks/decode_speed.py gets them)."""
    import torch

    from lmforge.config import ModelConfig
    from lmforge.model import GPT

    try:
        from lmforge.models import load_any

        model, tok = load_any("smollm2-135m-instruct")
        return model, tok, "smollm2-135m-instruct (real weights)"
    except Exception:  # noqa: BLE001  (not cached, no internet: its shape with random weights)
        pass
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("smollm2-135m", context_length=2048)).eval()
    from lmforge import hub
    from lmforge.tokenizer import Tokenizer

    try:  # a real vocabulary, so that token counts are realistic
        vocab = hub.fetch("gpt2-tokenizer").parent
        tok = Tokenizer.from_gpt2_files(vocab / "encoder.json", vocab / "vocab.bpe")
    except Exception:  # noqa: BLE001
        from lmforge.config import TokenizerConfig

        tok = Tokenizer.train([" ".join(WORDS) * 20], TokenizerConfig(vocab_size=400))
    return model, tok, "SmolLM2-135M shape, random weights"


def _words_of(tok, rng: random.Random, lo: int, hi: int, capital: bool) -> str:
    """Random words until the text is between lo and hi tokens long (a target drawn in that range)."""
    target = rng.randint(lo, hi)
    words: list[str] = []
    while len(tok.encode(" ".join(words))) < target:
        words.append(rng.choice(WORDS))
    text = " ".join(words)
    return (text[0].upper() + text[1:] if capital else text) + "."


def make_task(tok, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        context = _words_of(tok, rng, 40, 80, True)
        choices = [_words_of(tok, rng, 10, 30, False) for _ in range(4)]
        if len(set(choices)) < 4:
            continue
        items.append({"context": context, "choices": choices, "label": rng.randrange(4)})
    return items


def prepare(folder: Path, n: int, seed: int) -> None:
    """The model as an lmforge run and a Hugging Face folder; the task as JSONL and a harness YAML."""
    from lmforge.checkpoint import save_model
    from lmforge.convert import export_hf

    model, tok, what = _model()
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder / "run", model, 0, {"task": "pretrain"})
    tok.save(folder / "run" / "tokenizer.json")
    export_hf(model, folder / "hf", tok)
    items = make_task(tok, n, seed)
    (folder / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")
    (folder / "tasks").mkdir(exist_ok=True)
    (folder / "tasks" / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(folder / 'items.jsonl'))}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n",
        encoding="utf-8")
    ctx = [len(tok.encode(x["context"])) for x in items]
    end = [len(tok.encode(" " + c)) for x in items for c in x["choices"]]
    (folder / "meta.json").write_text(json.dumps({"model": what, "items": len(items), "context_tokens":
                                                  [min(ctx), sum(ctx) / len(ctx), max(ctx)],
                                                  "ending_tokens": [min(end), sum(end) / len(end), max(end)]}))


def _timed(lm, clock: dict):
    """Wrap the harness model's loglikelihood so that only the scoring is timed."""
    inner = lm.loglikelihood

    def loglikelihood(requests, *args, **kwargs):
        t0 = time.perf_counter()
        out = inner(requests, *args, **kwargs)
        clock["seconds"] = clock.get("seconds", 0.0) + time.perf_counter() - t0
        return out

    lm.loglikelihood = loglikelihood
    return lm


def _warm_up(lm, items: list[dict]) -> None:
    from lm_eval.api.instance import Instance

    reqs = [Instance("loglikelihood", {}, (x["context"], " " + c), 0) for x in items[:4] for c in x["choices"]]
    lm.loglikelihood(reqs, disable_tqdm=True)


def worker(contender: str, folder: str, dtype: str, threads: int, batch_size: int, device: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    folder = Path(folder)
    items = [json.loads(line) for line in (folder / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    if contender == "lmforge":
        from lmforge.choice_eval import evaluate_choice, read_task
        from lmforge.models import load_language_model

        model, tok = load_language_model(str(folder / "run"), device)
        task = read_task(folder / "items.jsonl")
        dt = getattr(torch, dtype)
        evaluate_choice(model, tok, task[:4], batch_size=batch_size, dtype=dt)  # warm-up
        t0 = time.perf_counter()
        res = evaluate_choice(model, tok, task, batch_size=batch_size, dtype=dt)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "total": seconds, "acc": res["acc"], "acc_norm": res["acc_norm"],
                "logprobs": [r["logprobs"] for r in res["items"]]}
    import lm_eval
    from lm_eval.tasks import TaskManager

    if contender == "lmforge-harness":
        from lmforge.lm_eval_bridge import LmforgeLM

        lm = LmforgeLM(pretrained=str(folder / "run"), dtype=dtype, batch_size=batch_size, device=device)
    elif contender == "hf":
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=str(folder / "hf"), dtype=dtype, batch_size=batch_size, device=device)
    else:
        raise ValueError(contender)
    _warm_up(lm, items)
    clock: dict = {}
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=_timed(lm, clock), tasks=[TASK], log_samples=True, verbosity="ERROR",
                                  task_manager=TaskManager(include_path=str(folder / "tasks"), include_defaults=False))
    total = time.perf_counter() - t0
    by_doc = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in out["samples"][TASK]}
    res = out["results"][TASK]
    return {"seconds": clock["seconds"], "total": total, "acc": res["acc,none"], "acc_norm": res["acc_norm,none"],
            "logprobs": [by_doc[i] for i in range(len(items))]}


def _agreement(a: dict, b: dict) -> str:
    diff = max(abs(x - y) for ra, rb in zip(a["logprobs"], b["logprobs"]) for x, y in zip(ra, rb))
    picks = sum(max(range(4), key=ra.__getitem__) != max(range(4), key=rb.__getitem__)
                for ra, rb in zip(a["logprobs"], b["logprobs"]))
    same = a["acc"] == b["acc"] and a["acc_norm"] == b["acc_norm"]
    return (f"accuracy {'equal' if same else 'DIFFERENT'} to hf ({a['acc']:.4f} / {a['acc_norm']:.4f} vs "
            f"{b['acc']:.4f} / {b['acc_norm']:.4f}), {picks} different picks, max |d logprob| {diff:.2e}")


def _drift(r: dict, fp32: dict) -> str:
    d = [abs(x - y) for ra, rb in zip(r["logprobs"], fp32["logprobs"]) for x, y in zip(ra, rb)]
    return f"against fp32 hf: mean |d logprob| {sum(d) / len(d):.3f}, max {max(d):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--limit", type=int, default=None, help="alias of --items (a quick smoke run)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--contenders", nargs="*", default=["lmforge", "lmforge-harness", "hf"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    n = a.limit or a.items
    if a.prepare:
        prepare(Path(a.prepare), n, a.seed)
        return
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], a.worker[2], a.threads, a.batch_size, a.device)))
        return
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": str(a.threads)}
    for module, why in (("lm_eval", "pip install lm-eval==0.4.13"), ("transformers", "pip install transformers")):
        try:
            __import__(module)
        except ImportError:
            sys.exit(f"{module} is not installed: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        subprocess.run([sys.executable, __file__, "--prepare", str(folder), "--items", str(n), "--seed", str(a.seed)],
                       check=True, env=env)
        meta = json.loads((folder / "meta.json").read_text())
        c, e = meta["context_tokens"], meta["ending_tokens"]
        print(f"{meta['model']}; {meta['items']} items x 4 choices, contexts {c[0]}-{c[2]} tokens (mean {c[1]:.0f}), "
              f"endings {e[0]}-{e[2]} (mean {e[1]:.0f}); {a.threads} threads, batch {a.batch_size}, {a.device}")
        reference = None  # fp32 hf's log-likelihoods: how far each half-precision contender drifts from them
        for dtype in a.dtypes:
            res = {}
            for contender in a.contenders:
                proc = subprocess.run([sys.executable, __file__, "--threads", str(a.threads), "--batch_size",
                                       str(a.batch_size), "--device", a.device, "--worker", contender, str(folder),
                                       dtype], capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    print(f"  {dtype} {contender}: failed: {proc.stderr.strip().splitlines()[-1:]}")
                    continue
                res[contender] = json.loads(proc.stdout.strip().splitlines()[-1])
            for contender, r in res.items():
                line = (f"{dtype:<9} {contender:<16} {meta['items'] / r['seconds']:7.2f} items/s  scoring "
                        f"{r['seconds']:7.2f} s  (end to end {r['total']:7.2f} s)")
                if contender != "hf" and "hf" in res:
                    line += f"   {contender} / hf: {res['hf']['seconds'] / r['seconds']:.2f}x   " + \
                        _agreement(r, res["hf"])
                if reference is not None:
                    line += "   " + _drift(r, reference)
                print(line)
            if dtype == "float32" and "hf" in res:
                reference = res["hf"]


if __name__ == "__main__":
    main()
