"""What a run tells its user: metrics.jsonl, curves.png, the progress bar's advance and the summary table.

The bar itself is logitstore.cli_common.progress_bar, the one both tools draw."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from rich.progress import Progress, TaskID
from rich.table import Table

T = TypeVar("T")


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


def log_every(items: Iterable[T], bar: Progress, task: TaskID, every: int,
              fields: Callable[[], dict[str, Any]]) -> Iterator[T]:
    """`items`, advancing `task` of `bar` as each one is consumed (after the caller's work on it).

    After the first item and every `every` items after it, the task also shows `fields()` (the rate and
    loss columns of logitstore.cli_common.progress_bar): reading them may wait for the device, so the
    caller says how often it can afford that.
    """
    for i, item in enumerate(items):
        yield item
        bar.update(task, completed=i + 1, **(fields() if i % every == 0 else {}))


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
