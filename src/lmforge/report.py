"""Plots of a run's metrics.jsonl, and the run report: one self-contained HTML page.

``plot_losses`` and ``plot_confusion`` draw the single PNGs that pretraining and classification
write as they finish. ``write_report`` (``lmforge report RUN``) reads everything a run directory
holds and writes one page that needs nothing else to be viewed (plots embedded as base64 PNG, the
styles inline, no script, no network), with the plots also as PNG files beside it:

    loss curves (train and validation, by step and by tokens seen), learning rate, throughput and
    MFU, gradient norm, evaluation tables, the samples at each interval, the config, the hardware,
    timings; fine-tuning runs add their panels (classification: accuracy per epoch, scores per
    split and class, the confusion matrix; instruction tuning: scores and responses before and
    after; DPO: rewards and margin before and after, and over training).

Everything taken from the run (samples, responses, config values) is HTML-escaped, and the page
forbids scripts outright (Content-Security-Policy), so a sample that reads ``<script>`` is text.
A run still training, or with no metrics yet, gets a page with a warning saying so.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import statistics
import time
from pathlib import Path

from .config import LmforgeError, is_number, is_whole

REPORT = "report.html"
PLOTS_MARK = ".lmforge-report-plots"  # in a report's plots folder: the folder is the report's own
EVALUATIONS = "evaluations.json"  # extra evaluation tables a recipe records for the report (add_evaluations)
GENERATOR = '<meta name="generator" content="lmforge report">'  # marks a page this module wrote
RESPONSES_SHOWN = 20


# ---------------------------------------------------------------- reading a run

def load_metrics(path: str | Path) -> tuple[list[dict], list[str]]:
    """The records of a metrics.jsonl and warnings about what could not be read: a half-written
    last line (the run is still training, or was killed mid-write) or damaged lines."""
    p = Path(path)
    if not p.is_file():
        return [], []
    text = p.read_bytes().decode("utf-8", errors="replace")
    lines = text.splitlines()
    records, damaged, torn = [], 0, False
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            record = json.loads(ln)
        except ValueError:
            if i == len(lines) - 1 and not text.endswith("\n"):
                torn = True  # the writer has not finished this line (yet)
            else:
                damaged += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            damaged += 1
    warnings = []
    if torn:
        warnings.append(f"the last line of {p.name} is half-written (the run may still be training); it is left out")
    if damaged:
        warnings.append(f"{damaged} line(s) of {p.name} could not be read and are left out")
    return records, warnings


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl ([] when there is none); unreadable lines are skipped."""
    return load_metrics(path)[0]


def _read_json(path: Path, warnings: list[str]):
    """A JSON file of the run, or None (absent; or unreadable, which is noted in ``warnings``)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        warnings.append(f"{path.name} could not be read ({type(e).__name__}); what it holds is left out")
        return None


def _run_config(run: Path, warnings: list[str]) -> dict | None:
    from .checkpoint import CheckpointError, read_run_config

    try:
        return read_run_config(run)
    except CheckpointError as e:
        if (run / "config.json").is_file() or (run / "checkpoints").is_dir():
            warnings.append(f"the run's config could not be read: {e}")
        else:
            warnings.append("the run has no checkpoint yet, so its config and hardware are not known")
        return None


def add_evaluations(run_dir: str | Path, tables: dict[str, list[dict]], step: int | None = None) -> Path:
    """Record evaluation tables (title -> rows) in the run's evaluations.json, for its report; a
    table of the same title is replaced. ``step``: the training step they were measured at
    (default: the step of the run's newest checkpoint), so that a later report can tell when
    the run has trained on since."""
    from . import atomic

    if step is None:
        step = (_run_config(Path(run_dir), []) or {}).get("step")
    path = Path(run_dir) / EVALUATIONS
    held = _read_json(path, [])
    held = held.get("tables") if isinstance(held, dict) else None
    kept = [t for t in (held if isinstance(held, list) else []) if isinstance(t, dict) and t.get("title") not in tables]
    kept += [{"title": title, "step": step, "rows": rows} for title, rows in tables.items()]
    return atomic.write_text(path, json.dumps({"tables": kept}, indent=2, default=str) + "\n")


# ---------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, dpi: float | str = 100) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def _number(v) -> bool:
    return is_number(v) and math.isfinite(v)


def _series(records: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    pairs = [(r[x], r[key]) for r in records if _number(r.get(key)) and _number(r.get(x))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _line_plot(title: str, xlabel: str, ylabel: str, lines: list[tuple[str, list, list, str]],
               log_y: bool = False) -> bytes | None:
    """One figure of named lines (label, xs, ys, style); None when no line has a point."""
    lines = [ln for ln in lines if ln[1]]
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for label, xs, ys, style in lines:
        ax.plot(xs, ys, style, label=label, lw=1.3, ms=4)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y and all(v > 0 for _, _, ys, _ in lines for v in ys):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def _loss_plot(records: list[dict], x: str) -> bytes | None:
    label = {"step": "step", "tokens": "tokens seen"}[x]
    return _line_plot(f"loss by {label}", label, "loss (cross-entropy, nats)",
                      [("train loss", *_series(records, "loss", x), "-"),
                       ("validation loss", *_series(records, "val_loss", x), "o-")])


def _throughput_plot(records: list[dict]) -> bytes | None:
    steps, tps = _series(records, "tokens_per_s")
    if not steps:
        return None
    m_steps, m = _series(records, "mfu")
    plt = _pyplot()
    # Two panels, not two axes on one: MFU is tokens/s times a constant, so the lines would coincide.
    fig, axes = plt.subplots(2 if m_steps else 1, 1, figsize=(7, 5 if m_steps else 3.8), sharex=True, squeeze=False)
    top = axes[0][0]
    top.plot(steps, tps, "-", color="tab:blue", lw=1.3)
    top.set_ylabel("tokens / s")
    top.set_title("throughput and MFU" if m_steps else "throughput")
    if m_steps:
        bottom = axes[1][0]
        bottom.plot(m_steps, [100 * v for v in m], "-", color="tab:orange", lw=1.3)
        bottom.set_ylabel("MFU (% of peak)")
    for ax in (row[0] for row in axes):
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    return _png(fig)


def _epochs(config: dict | None) -> float | None:
    """Epochs per optimiser step of a fine-tuning run (its config's epochs over its steps)."""
    try:
        return float(config["finetune"]["epochs"]) / int(config["train"]["max_steps"])
    except (TypeError, KeyError, ValueError, ZeroDivisionError):
        return None


def _accuracy_plot(records: list[dict], config: dict | None) -> bytes | None:
    per_step = _epochs(config)
    scale, xlabel = (per_step, "epoch") if per_step else (1.0, "step")

    def xs(key: str) -> tuple[list, list]:
        s, v = _series(records, key)
        return [scale * x for x in s], v

    return _line_plot(f"accuracy per {xlabel}", xlabel, "accuracy",
                      [("training batches", *xs("accuracy"), "-"), ("validation", *xs("val_accuracy"), "o-")])


def _dpo_plot(records: list[dict]) -> bytes | None:
    lines = []
    for key, label in (("chosen_reward", "chosen"), ("rejected_reward", "rejected"), ("reward_margin", "margin")):
        lines.append((f"{label} (training)", *_series(records, key), "-"))
        lines.append((f"{label} (validation)", *_series(records, f"val_{key}"), "o--"))
    return _line_plot("DPO rewards and margin", "step", "reward (β · log π/π_ref)", lines)


def _plots(records: list[dict], config: dict | None, results: dict | None, task: str) -> list[tuple[str, str, bytes]]:
    """(file name, title, PNG) of every plot the run has data for."""
    wanted = [
        ("loss-by-step.png", "Loss by step", lambda: _loss_plot(records, "step")),
        ("loss-by-tokens.png", "Loss by tokens seen", lambda: _loss_plot(records, "tokens")),
        ("learning-rate.png", "Learning rate", lambda: _line_plot(
            "learning rate", "step", "learning rate", [("lr", *_series(records, "lr"), "-"),
                                                        ("Muon lr", *_series(records, "muon_lr"), "--")])),
        ("throughput-mfu.png", "Throughput and MFU", lambda: _throughput_plot(records)),
        ("gradient-norm.png", "Gradient norm (before clipping)", lambda: _line_plot(
            "gradient norm", "step", "global L2 norm", [("grad norm", *_series(records, "grad_norm"), "-")],
            log_y=True)),
    ]
    if task == "classify":
        wanted.append(("accuracy.png", "Accuracy per epoch", lambda: _accuracy_plot(records, config)))
    if task == "dpo":
        wanted.append(("dpo-rewards.png", "DPO rewards and margin", lambda: _dpo_plot(records)))
    out = [(name, title, png) for name, title, make in wanted if (png := make()) is not None]
    test = (results or {}).get("test") if task == "classify" else None
    if isinstance(test, dict) and test.get("confusion") and test.get("labels"):
        try:
            out.append(("confusion.png", "Confusion matrix (test split)",
                        _confusion_png(test["confusion"], test["labels"])))
        except (TypeError, ValueError, IndexError):
            pass  # a results.json of another shape: the panel says so (render_report)
    return out


def _confusion_png(confusion: list[list[int]], labels: list[str],
                   title: str = "confusion matrix (test split)") -> bytes:
    plt = _pyplot()
    k = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.5, 1.2 * k + 2))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max((max(r) for r in confusion), default=0)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(confusion[i][j]), ha="center", va="center",
                    color="white" if confusion[i][j] > top / 2 else "black")
    ax.set_title(title)
    return _png(fig)


def plot_losses(metrics_path: str | Path, out_png: str | Path, title: str = "lmforge training") -> Path | None:
    """Training and validation loss against steps (and tokens seen, on the top axis)."""
    plt = _pyplot()
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"], r["tokens"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot([s for s, _, _ in train], [v for _, v, _ in train], label="train loss", lw=1.2)
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if len(train) >= 2 and train[-1][0] > train[0][0]:
        tokens_per_step = (train[-1][2] - train[0][2]) / (train[-1][0] - train[0][0])
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step, lambda t: t / tokens_per_step))
        top.set_xlabel("tokens seen")
    from . import atomic

    # a full disk leaves the old plot, never half of one
    return atomic.write_bytes(out_png, _png(fig, dpi="figure"))


def plot_confusion(confusion: list[list[int]], labels: list[str], out_png: str | Path,
                   title: str = "confusion matrix (test split)") -> Path:
    """The confusion matrix as a picture: rows the true class, columns the predicted one."""
    from . import atomic

    return atomic.write_bytes(out_png, _confusion_png(confusion, labels, title))


# ---------------------------------------------------------------- HTML

# Control characters (a sample of an untrained model has plenty) as their visible symbols: ␀ ␁ ... ␟ ␡.
_CONTROL = {c: 0x2400 + c for c in range(32) if chr(c) not in "\t\n\r"} | {0x7F: 0x2421}


def _esc(value) -> str:
    # A lone surrogate (from undecodable bytes kept by json or argv) cannot be written as UTF-8: shown as "?".
    text = str(value).encode("utf-8", "replace").decode("utf-8")
    return html.escape(text.translate(_CONTROL), quote=True)


def _fmt(v) -> str:
    """A value for a table cell, escaped."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return _esc(f"{v:.4g}") if math.isfinite(v) else _esc(v)
    if isinstance(v, (dict, list)):
        return _esc(json.dumps(v, default=str))
    return _esc(v)


def _table(headers: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _kv_table(pairs: list[tuple[str, object]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_esc(title)}</h2>{body}</section>'


def _duration(seconds) -> str | None:
    if not _number(seconds):
        return None
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {seconds % 60:.0f} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def _flops(v) -> str | None:
    if not _number(v):
        return None
    for scale, unit in ((1e15, "PFLOP/s"), (1e12, "TFLOP/s"), (1e9, "GFLOP/s"), (1e6, "MFLOP/s")):
        if v >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.3g} FLOP/s"


def _last(records: list[dict], key: str):
    return next((r[key] for r in reversed(records) if _number(r.get(key))), None)


def _params(config: dict | None) -> int | None:
    """The model's parameter count, from its config (a model on the meta device: no memory, no time)."""
    try:
        import torch

        from .config import ModelConfig
        from .model import GPT

        with torch.device("meta"):
            model = GPT(ModelConfig.from_dict(config["model"]))
        return model.num_params()
    except Exception:  # noqa: BLE001  a config of another version: the count is only shown, never needed
        return None


def _summary(run: Path, task: str, records: list[dict], config: dict | None, results: dict | None) -> str:
    train = [r for r in records if _number(r.get("loss"))]
    val = [r["val_loss"] for r in records if _number(r.get("val_loss"))]
    train_config = config.get("train") if isinstance(config, dict) else None
    max_steps = train_config.get("max_steps") if isinstance(train_config, dict) else None
    if not (is_whole(max_steps) and max_steps > 0):
        max_steps = None  # a hand-edited or damaged config: the status says less, the page is still made
    step = max((r["step"] for r in records), default=None)
    saved = config.get("step") if isinstance(config, dict) else None  # the newest checkpoint's step
    if is_whole(saved) and saved > (step or 0):
        step = saved  # metrics.jsonl lost its last lines (truncated, damaged): the checkpoint still tells
    if step is None:
        status = "no training steps logged yet"
    elif max_steps and step >= max_steps:
        status = f"finished: {step:,} of {max_steps:,} steps"
    elif max_steps:
        status = f"at step {step:,} of {max_steps:,} (still training, or stopped; `--resume true` continues it)"
    else:
        status = f"at step {step:,}"
    model = (config or {}).get("model") if isinstance(config, dict) else None
    shape = None
    if isinstance(model, dict):
        shape = (f"{model.get('n_layer')} layers, width {model.get('d_model')}, {model.get('n_head')} heads, "
                 f"context {model.get('context_length')}, vocabulary {model.get('vocab_size')}")
    mfus = [r["mfu"] for r in train if _number(r.get("mfu"))]
    pairs = [("run directory", str(run)), ("task", task), ("status", status), ("model", shape),
             ("parameters", _params(config)), ("tokens seen", _last(records, "tokens")),
             ("final train loss", train[-1]["loss"] if train else None),
             ("final validation loss", val[-1] if val else None), ("best validation loss", min(val) if val else None),
             ("training time", _duration(_last(train, "elapsed_s") or (results or {}).get("seconds"))),
             # the median: the first interval pays for warm-up (allocation, kernel choice) and would drag a mean
             ("MFU, median of the log intervals", f"{100 * statistics.median(mfus):.2f} %" if mfus else None)]
    if isinstance(config, dict) and isinstance(config.get("base"), dict):
        pairs.insert(2, ("base model", config["base"].get("spec")))
    return _kv_table([(k, v) for k, v in pairs if v is not None])


def _figures(plots: list[tuple[str, str, bytes]], folder_name: str) -> str:
    parts = []
    for name, title, png in plots:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure><img alt="{_esc(title)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{_esc(title)} · <code>{_esc(folder_name)}/{_esc(name)}</code></figcaption>"
                     "</figure>")
    return '<div class="figures">' + "".join(parts) + "</div>" if parts else "<p>No training records to plot yet.</p>"


def _evaluation(records: list[dict], evaluations: dict | None, step: int | None) -> str:
    val = [r for r in records if any(k.startswith("val_") for k in r)]
    parts = []
    if val:
        keys = sorted({k for r in val for k in r if k.startswith("val_") and k != "val_tokens"})
        parts.append("<h3>Validation during training</h3>")
        parts.append(_table(["step", "tokens seen", *(k.removeprefix("val_").replace("_", " ") for k in keys)],
                            [[r["step"], r.get("tokens"), *(r.get(k) for k in keys)] for r in val]))
    tables = (evaluations or {}).get("tables", []) if isinstance(evaluations, dict) else []
    for t in tables:
        rows = [r for r in t.get("rows", []) if isinstance(r, dict)] if isinstance(t, dict) else []
        if not rows:
            continue
        headers = list(dict.fromkeys(k for r in rows for k in r))
        note = ""
        if t.get("step") is not None and step is not None and t["step"] != step:
            note = (f' <span class="warn">(measured at step {_fmt(t["step"])}; the run is now at step '
                    f"{_fmt(step)})</span>")
        parts.append(f"<h3>{_esc(t.get('title', 'evaluation'))}{note}</h3>")
        parts.append(_table(headers, [[r.get(h) for h in headers] for r in rows]))
    return "".join(parts) or "<p>No evaluations recorded.</p>"


def _samples(records: list[dict]) -> str:
    parts = []
    for r in records:
        samples = r.get("samples")
        if not isinstance(samples, list):
            continue
        rows = "".join(f'<tr><td><pre class="prompt">{_esc(s.get("prompt", ""))}</pre></td>'
                       f'<td><pre class="sample">{_esc(s.get("text", ""))}</pre></td></tr>'
                       for s in samples if isinstance(s, dict))
        parts.append(f'<h3>step {_fmt(r["step"])}</h3><table class="samples"><thead><tr><th>prompt</th>'
                     f"<th>continuation</th></tr></thead><tbody>{rows}</tbody></table>")
    return "".join(parts) or "<p>This run stored no samples (pretraining stores the samples of its prompts).</p>"


def _classify_panel(results: dict) -> str:
    parts = []
    rows = [[split, results[split].get("n"), results[split].get("accuracy"), results[split].get("macro_f1")]
            for split in ("train", "val", "test") if isinstance(results.get(split), dict)]
    if rows:
        parts.append("<h3>Scores per split</h3>" + _table(["split", "texts", "accuracy", "macro F1"], rows))
    test = results.get("test")
    if isinstance(test, dict) and isinstance(test.get("per_class"), dict):
        parts.append("<h3>Per class (test split)</h3>" + _table(
            ["class", "precision", "recall", "F1", "texts"],
            [[name, c.get("precision"), c.get("recall"), c.get("f1"), c.get("support")]
             for name, c in test["per_class"].items() if isinstance(c, dict)]))
    if isinstance(test, dict) and test.get("confusion") and test.get("labels"):
        labels = test["labels"]
        parts.append("<h3>Confusion matrix (test split; rows: true class, columns: predicted)</h3>" + _table(
            ["true \\ predicted", *labels], [[labels[i], *row] for i, row in enumerate(test["confusion"])],
            cls="confusion"))
    return "".join(parts)


def _before_after(results: dict, keys: list[tuple[str, str]]) -> str:
    before, after = results.get("before") or {}, results.get("after") or {}

    def get(d: dict, path: str):
        for part in path.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    rows = [[label, get(before, path), get(after, path)] for path, label in keys
            if get(before, path) is not None or get(after, path) is not None]
    return "<h3>Before and after fine-tuning</h3>" + _table(["", "before", "after"], rows) if rows else ""


def _responses(responses) -> str:
    if not isinstance(responses, list) or not responses:
        return ""
    shown = [r for r in responses[:RESPONSES_SHOWN] if isinstance(r, dict)]
    has_before = any("response_before" in r for r in shown)
    head = ["instruction", "reference", *(["before fine-tuning"] if has_before else []), "after fine-tuning"]
    rows = []
    for r in shown:
        task = str(r.get("instruction", r.get("prompt", "")))
        if r.get("input"):
            task += "\n\n" + str(r["input"])
        cells = [task, r.get("output", ""), *([r.get("response_before", "")] if has_before else []),
                 r.get("model_response", "")]
        rows.append("<tr>" + "".join(f"<td><pre>{_esc(c)}</pre></td>" for c in cells) + "</tr>")
    count = f"<p>{len(shown)} of {len(responses)} test responses (all are in responses.json).</p>"
    return (f"<h3>Responses</h3>{count}<table class=\"responses\"><thead><tr>"
            + "".join(f"<th>{_esc(h)}</th>" for h in head) + f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _finetune_panel(task: str, results: dict | None, responses) -> str:
    if not isinstance(results, dict):
        return ""
    if task == "classify":
        return _classify_panel(results)
    if task == "instruct":
        return _before_after(results, [("val.loss", "validation loss"), ("val.perplexity", "validation perplexity"),
                                       ("rouge_l", "test ROUGE-L")]) + _responses(responses)
    if task == "dpo":
        return _before_after(results, [("loss", "validation DPO loss"), ("chosen_reward", "chosen reward"),
                                       ("rejected_reward", "rejected reward"), ("reward_margin", "reward margin")])
    return ""


def _hardware(config: dict | None) -> str:
    hw = (config or {}).get("hardware") if isinstance(config, dict) else None
    if not isinstance(hw, dict):
        return "<p>Not recorded (the run has no checkpoint yet, or an older lmforge trained it).</p>"
    pairs = [("device", hw.get("device")), ("name", hw.get("name")), ("GPUs", hw.get("gpus")),
             ("CPU threads", hw.get("threads")), ("precision", hw.get("dtype")), ("torch", hw.get("torch")),
             ("peak for MFU", _flops(hw.get("peak_flops"))), ("peak from", hw.get("peak_source")),
             ("training FLOPs per token", hw.get("flops_per_token"))]
    return _kv_table([(k, v) for k, v in pairs if v is not None]) + (
        "<p>MFU = tokens/s × FLOPs per token ÷ peak FLOP/s; FLOPs per token = 6 × matmul weights + "
        "12 × layers × width × context (PaLM, appendix B).</p>")


def _timings(records: list[dict], results: dict | None) -> str:
    train = [r for r in records if _number(r.get("loss"))]
    elapsed = _last(train, "elapsed_s")
    steps = train[-1]["step"] if train else None
    tokens = _last(train, "tokens")
    tps = [r["tokens_per_s"] for r in train if _number(r.get("tokens_per_s"))]
    pairs = [("training time", _duration(elapsed)),
             ("time per step", _duration(elapsed / steps) if elapsed and steps else None),
             ("tokens/s, whole run", f"{tokens / elapsed:,.0f}" if tokens and elapsed else None),
             ("tokens/s, last interval", f"{tps[-1]:,.0f}" if tps else None),
             ("validation runs", sum(1 for r in records if any(k.startswith("val_") for k in r)) or None),
             ("fine-tuning, total", _duration((results or {}).get("seconds")) if isinstance(results, dict) else None),
             ("report written", time.strftime("%Y-%m-%d %H:%M:%S"))]
    return _kv_table([(k, v) for k, v in pairs if v is not None])


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #ddd; padding: .25rem .55rem; text-align: left; vertical-align: top; }
thead th, table.kv th { background: #f4f5f7; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; } figure img { max-width: 520px; width: 100%; border: 1px solid #eee; }
figcaption { font-size: .8rem; color: #555; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font-size: .85rem; }
pre.config { background: #f8f8f8; padding: .8rem; border: 1px solid #eee; max-height: 40rem; overflow: auto; }
.warnings { background: #fff4e5; border: 1px solid #f0b45a; padding: .4rem 1rem; }
.warn { color: #a05a00; font-weight: normal; font-size: .85rem; }
"""


def render_report(run: Path, plots: list[tuple[str, str, bytes]], folder_name: str, records: list[dict],
                  config: dict | None, results: dict | None, responses, evaluations: dict | None,
                  warnings: list[str], task: str) -> str:
    """The page's HTML: every value from the run escaped, no script, images inline."""
    step = max((r["step"] for r in records), default=None)
    body = [f"<h1>Run report: {_esc(run.resolve().name)}</h1>",
            f'<p class="meta">{_esc(task)} run in <code>{_esc(run)}</code></p>']
    if warnings:
        body.append('<div class="warnings" id="warnings"><h2>Warnings</h2><ul>'
                    + "".join(f"<li>{_esc(w)}</li>" for w in warnings) + "</ul></div>")
    body.append(_section("summary", "Summary", _summary(run, task, records, config, results)))
    body.append(_section("curves", "Training curves", _figures(plots, folder_name)))
    body.append(_section("evaluation", "Evaluation", _evaluation(records, evaluations, step)))
    try:
        panel = _finetune_panel(task, results, responses)
    except (TypeError, ValueError, IndexError, KeyError, AttributeError):
        panel = '<p class="warn">results.json or responses.json has an unexpected shape; this panel is left out.</p>'
    if panel:
        body.append(_section("finetune", f"Fine-tuning: {task}", panel))
    body.append(_section("samples", "Samples", _samples(records)))
    shown = {k: v for k, v in (config or {}).items() if k != "hardware"} if isinstance(config, dict) else None
    config_text = _esc(json.dumps(shown, indent=2, default=str))
    body.append(_section("config", "Configuration", f'<pre class="config">{config_text}</pre>'
                         if shown else "<p>Not known yet (no checkpoint).</p>"))
    body.append(_section("hardware", "Hardware", _hardware(config)))
    body.append(_section("timings", "Timings", _timings(records, results)))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n" + GENERATOR + "\n"
            # No script may run, whatever a sample or a config value holds; images come only from the page itself.
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
            "style-src 'unsafe-inline'\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>lmforge report: {_esc(run.resolve().name)}</title>\n<style>{STYLE}</style></head>\n"
            "<body>\n" + "\n".join(body) + "\n</body></html>\n")


# ---------------------------------------------------------------- writing the report

def _check_run(run_dir: str | Path) -> Path:
    from .checkpoint import METRICS, is_run_dir

    run = Path(run_dir)
    if not run.exists():
        raise LmforgeError(f"no run directory at {run}; give the --out folder of `lmforge pretrain` or "
                           "`lmforge finetune`")
    if not run.is_dir():
        raise LmforgeError(f"{run} is a file; give a run directory (the --out folder of `lmforge pretrain` or "
                           "`lmforge finetune`)")
    if not (is_run_dir(run) or (run / METRICS).is_file()):
        raise LmforgeError(f"{run} is not a run directory (no metrics.jsonl, config.json or checkpoints/); give "
                           "the --out folder of `lmforge pretrain` or `lmforge finetune`")
    return run


def is_report(path: str | Path) -> bool:
    """Whether ``path`` is a page this module wrote (only those are replaced without --overwrite)."""
    try:
        with open(path, "rb") as f:
            return GENERATOR.encode() in f.read(4096)
    except OSError:
        return False


def _check_out(run: Path, out: Path, plots_dir: Path, overwrite: bool) -> None:
    from .outputs import OutputError, holds_a_run, inside, is_data_file

    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; give a file path such as {out / REPORT}")
    if is_data_file(out.resolve()):
        raise OutputError(f"--out {out} is a file of a prepared data folder, which only `lmforge prepare` writes; "
                          "choose another path")
    foreign = (out.exists() or out.is_symlink()) and not is_report(out)
    # Inside the run every file but the report is an input (metrics, config, results, weights...).
    if foreign and (inside(out.absolute(), run.absolute()) or inside(out.resolve(), run.resolve())):
        raise OutputError(f"--out {out} is a file of the run itself; writing the report there would destroy it. "
                          "Choose another path")
    checkpoints = (run / "checkpoints").resolve()
    if inside(out.resolve(), checkpoints) or inside(plots_dir.resolve(), checkpoints):
        raise OutputError(f"--out {out} is inside the run's checkpoints, which only training writes; choose another "
                          "path")
    # Another run's files are no more ours to replace, --overwrite or not (a checkpoint's weights were)
    if foreign and any(holds_a_run(p) for p in Path(os.path.abspath(out)).parents):  # (".." collapsed)
        raise OutputError(f"--out {out} is a file of another training run, which only training writes; choose "
                          "another path")
    if any(p.name == "checkpoints" and holds_a_run(p.parent)  # (the plots go beside the page)
           for p in (*Path(os.path.abspath(out)).parents, *out.resolve().parents)):
        raise OutputError(f"--out {out} is inside the checkpoints of another training run, which only training "
                          "writes; choose another path")
    if foreign and not overwrite:
        raise OutputError(f"--out {out} already exists and is not an lmforge report; choose another --out, or "
                          "pass --overwrite true to replace it")
    if plots_dir.exists() and not plots_dir.is_dir():
        raise OutputError(f"{plots_dir} (where the report's PNG plots go) is a file; move it away or choose "
                          "another --out")
    if plots_dir.is_dir() and any(plots_dir.iterdir()) and not (plots_dir / PLOTS_MARK).is_file() and not overwrite:
        raise OutputError(f"{plots_dir} (where the report's PNG plots go) holds files that are not a report's; "
                          "choose another --out, or pass --overwrite true to write the plots among them")


def write_report(run_dir: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the run report of ``run_dir`` to ``out`` (default RUN/report.html), with its plots as
    PNG files in a folder beside it (``report-plots/`` for ``report.html``); returns the page's path."""
    from . import atomic
    from .checkpoint import METRICS
    from .outputs import write_error

    run = _check_run(run_dir)
    if out is not None and not Path(out).name:  # "", ".", "/": no file name to write the page under
        from .outputs import OutputError

        raise OutputError(f"--out {str(out)!r} names no file; give a file path such as {Path(out) / REPORT}")
    out = Path(out) if out is not None else run / REPORT
    plots_dir = out.with_name(out.stem + "-plots")
    _check_out(run, out, plots_dir, overwrite)
    records, warnings = load_metrics(run / METRICS)
    if not (run / METRICS).is_file():
        warnings.append("the run has no metrics.jsonl yet (training has not started, or logged nothing)")
    elif not records and not warnings:  # (a damaged file has its own warning: it did not just start)
        warnings.append("metrics.jsonl holds no records yet (the run has just started)")
    config = _run_config(run, warnings)
    results = _read_json(run / "results.json", warnings)
    results = results if isinstance(results, dict) else None  # fine-tuning runs write it
    responses = _read_json(run / "responses.json", warnings)
    evaluations = _read_json(run / EVALUATIONS, warnings)
    task = str((config or {}).get("task") or (results or {}).get("task") or "pretrain")
    plots = _plots(records, config, results, task)
    page = render_report(run, plots, plots_dir.name, records, config, results, responses, evaluations, warnings, task)
    made = not plots_dir.exists()
    try:
        plots_dir.mkdir(parents=True, exist_ok=True)
        ours = (plots_dir / PLOTS_MARK).is_file()
        (plots_dir / PLOTS_MARK).touch()
        for name, _, png in plots:
            atomic.write_bytes(plots_dir / name, png)
        atomic.write_text(out, page)  # last: the page appears whole, after its plots
        if ours:  # our own folder: plots of an earlier report that this one lacks go, once it is written
            for old in set(plots_dir.glob("*.png")) - {plots_dir / name for name, _, _ in plots}:
                old.unlink()
    except BaseException as e:
        if made:  # a first report that failed (a full disk) leaves no half folder of plots
            import shutil

            shutil.rmtree(plots_dir, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(out, e) from None
        raise
    return out


__all__ = ["EVALUATIONS", "REPORT", "add_evaluations", "is_report", "load_metrics", "plot_confusion", "plot_losses",
           "read_metrics", "render_report", "write_report"]
