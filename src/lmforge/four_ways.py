"""The four ways to solve a classification task with a pretrained model (the book's chapter 1),
side by side on the same test split:

    zero-shot     prompt with the labels, pick the most likely label
    few-shot      the same with k labelled examples from the training split in the prompt
    classifier    fine-tune a new classes head (``finetune_classify``)
    instruction   fine-tune on "classify this text" instructions whose answer is the label
                  (``finetune_instruct``), then pick the most likely label as the response

Every way reads the same data, balanced, subsampled and split with the same seed, and reports
test accuracy and minutes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import atomic, tasks
from .config import FinetuneConfig, LoRAConfig, TrainConfig
from .evaluate import classification_metrics, continuation_logprobs

INSTRUCTION = "Classify the text message as one of: {labels}. Answer with the label only."


def _records(rows: list[tuple[str, str]], labels: list[str]) -> list[dict]:
    instruction = INSTRUCTION.format(labels=", ".join(labels))
    return [{"instruction": instruction, "input": text, "output": label} for text, label in rows]


@torch.no_grad()
def predict_by_template(model, tok, records: list[dict], labels: list[str], template: str) -> list[int]:
    """The label whose text (and end token) is the most likely response to each record's prompt."""
    from .precision import resolve_dtype

    model.eval()
    dtype = resolve_dtype("auto", next(model.parameters()).device)  # bf16 where it is fast
    end = tasks.response_end(template, tok)
    choices = [tasks.plain_ids(tok, label) + end for label in labels]
    preds = []
    for rec in records:
        prompt = tasks.prompt_ids(tok, rec["instruction"], rec["input"], template)
        scores = continuation_logprobs(model, prompt, choices, dtype)
        preds.append(max(range(len(labels)), key=lambda i: scores[i]))
    return preds


def four_ways(base: str, data: str | Path, out: str | Path, text_column: str = "text", label_column: str = "label",
              balance: bool = True, limit: int | None = None, test_limit: int | None = None, shots: int = 4,
              epochs: float = 1.0, trainable: str = "lora", seed: int = 123, template: str = "alpaca",
              lr: float | None = None, progress: bool = True, overwrite: bool = False) -> dict:
    """Test accuracy and minutes of the four ways on ``data``; a results JSON and the runs in ``out``."""
    from .finetune import KNOWN_COLUMNS, finetune_classify, finetune_instruct, resolve_data
    from .checkpoint import load_model, load_tokenizer
    from .prompting import evaluate_prompting

    out = Path(out)
    if (text_column, label_column) == ("text", "label") and str(data) in KNOWN_COLUMNS:
        text_column, label_column = KNOWN_COLUMNS[str(data)]
    path = resolve_data(data)
    split = (0.7, 0.1, 0.2)
    rows = tasks.read_labelled(path, text_column, label_column)
    if balance:
        rows = tasks.balance(rows, seed)
    rows = tasks.subsample(rows, limit, seed)
    train_rows, _, test_rows = tasks.split(rows, split, seed)
    labels = sorted({label for _, label in train_rows})
    tests = test_rows[:test_limit] if test_limit is not None else test_rows
    results: dict = {"model": base, "data": str(data), "texts": len(rows), "train": len(train_rows),
                     "test": len(tests), "labels": labels, "ways": {}}
    out.mkdir(parents=True, exist_ok=True)
    # One data file for all four, the subsample already taken: every way splits it alike.
    table = out / "data.tsv"
    atomic.write_text(table, "".join(f"{label}\t{' '.join(text.split())}\n" for text, label in rows))

    def report(way: str, metrics: dict, seconds: float) -> None:
        results["ways"][way] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "n": metrics["n"],
                                "minutes": seconds / 60}
        print(f"{way}: test accuracy {metrics['accuracy']:.4f} ({metrics['n']} texts) in {seconds / 60:.1f} min")

    for k, way in ((0, "zero-shot"), (shots, f"{shots}-shot")):
        t0 = time.perf_counter()
        res = evaluate_prompting(base, table, "1", "0", shots=k, split=split, seed=seed, test_limit=test_limit,
                                 progress=progress)
        report(way, res["test"], time.perf_counter() - t0)
    ft = FinetuneConfig(trainable=trainable, epochs=epochs, split=split, seed=seed)
    lr = lr or (5e-4 if trainable == "lora" else 5e-5)
    lora = LoRAConfig(rank=16, alpha=16)
    t0 = time.perf_counter()
    res = finetune_classify(base, table, out / "classifier", ft,
                            TrainConfig(lr=lr, warmup_steps=0, batch_size=8),
                            lora, "1", "0", progress=progress, overwrite=overwrite)
    report("classifier fine-tuning", res["test"], time.perf_counter() - t0)
    records = _records(rows, labels)
    atomic.write_text(out / "instructions.json", json.dumps(records, ensure_ascii=False))
    t0 = time.perf_counter()
    finetune_instruct(base, out / "instructions.json", out / "instruction", ft,
                      TrainConfig(lr=lr, warmup_steps=0, batch_size=8), lora,
                      template=template, mask_prompt=True, respond_test=0, progress=progress, overwrite=overwrite)
    model, _ = load_model(out / "instruction")
    tok = load_tokenizer(out / "instruction")
    _, _, test_records = tasks.split(records, split, seed)
    test_records = test_records[:test_limit] if test_limit is not None else test_records
    preds = predict_by_template(model, tok, test_records, labels, template)
    metrics = classification_metrics(preds, [labels.index(r["output"]) for r in test_records], labels)
    report("instruction fine-tuning", metrics, time.perf_counter() - t0)
    atomic.write_text(out / "four_ways.json", json.dumps(results, indent=2) + "\n")
    return results


__all__ = ["INSTRUCTION", "four_ways", "predict_by_template"]
