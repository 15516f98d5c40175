"""What a run tells its user: metrics.jsonl, curves.png, the progress bar and the summary table."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(ln) for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]


def write_metrics(path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> None:
    """Rewrite the whole file (it is small): a resumed run drops epochs past its checkpoint."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def plot_curves(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Loss (left) and accuracies (right) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train loss"), ("holdout_kd", "held-out distillation loss")):
        if any(r.get(key) is not None for r in records):
            ax_loss.plot(epochs, [r.get(key) for r in records], marker="o", label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    for key, label in (("eval_top1", "eval top-1"), ("eval_top5", "eval top-5"),
                       ("agree", "agreement with teacher (held-out)")):
        if any(r.get(key) is not None for r in records):
            ax_acc.plot(epochs, [r.get(key) for r in records], marker="o", label=label)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    if ax_acc.lines:
        ax_acc.legend()
    fig.tight_layout()
    tmp = Path(f"{path}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


class _Rate(TextColumn):
    def __init__(self) -> None:
        super().__init__("")

    def render(self, task: Any) -> Any:
        from rich.text import Text

        rate = task.fields.get("rate")
        loss = task.fields.get("loss")
        text = f"{rate:,.0f} samples/s" if rate else "- samples/s"
        return Text(text + (f"  loss {loss:.4f}" if loss is not None else ""))


def progress_bar(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if pct else f"{value:.4f}"


def summary_table(records: Sequence[dict[str, Any]], info: dict[str, Any] | None = None) -> Table:
    """One row per epoch; the run's facts (stores, student, cache, skipped images) as a caption."""
    table = Table(title="trainer fit", caption_justify="left")
    for col in ("epoch", "lr", "train loss", "samples/s", "eval top-1", "eval top-5", "teacher agreement"):
        table.add_column(col, justify="right")
    for r in records:
        table.add_row(str(r["epoch"]), f"{r['lr']:.3g}", _fmt(r.get("train_loss")),
                      f"{r.get('samples_per_s', 0):,.0f}", _fmt(r.get("eval_top1"), True),
                      _fmt(r.get("eval_top5"), True), _fmt(r.get("agree"), True))
    if info:
        table.caption = "\n".join(f"{k}: {v}" for k, v in info.items())
    return table


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)
