"""Plots and summaries of a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    records = []
    for ln in p.read_text().splitlines():
        try:
            records.append(json.loads(ln))
        except ValueError:
            continue  # a line torn by a kill mid-write (resume drops it too)
    return [r for r in records if isinstance(r, dict) and "step" in r]


def plot_losses(metrics_path: str | Path, out_png: str | Path, title: str = "lmforge training") -> Path | None:
    """Training and validation loss against steps (and tokens seen, on the top axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    import io

    from . import atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic.write_bytes(out_png, buf.getvalue())  # a full disk leaves the old plot, never half of one


def plot_confusion(confusion: list[list[int]], labels: list[str], out_png: str | Path,
                   title: str = "confusion matrix (test split)") -> Path:
    """The confusion matrix as a picture: rows the true class, columns the predicted one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    import io

    from . import atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic.write_bytes(out_png, buf.getvalue())
