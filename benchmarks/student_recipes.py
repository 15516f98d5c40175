"""What the student recipes cost, side by side on one store: `trainer.fit` samples/s of the same student
plain, with --ema 0.999, with --compile, and with --distill hard, and the one-off compile time.

    python -m benchmarks.student_recipes [--images 4000] [--epochs 3] [--repeats 2] [--student cifar_resnet]

Runs are interleaved and the best steady-state epoch counts (epochs after the first, which decodes
every image once); ratios are against the plain run of the same round. --compile's first epoch also
holds the compilation (the probe before the first step), reported apart as its extra seconds.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import trainer

from .fit_throughput import TEACHER, machine, make_corpus, make_store, make_teacher

RECIPES = {"plain": {}, "--ema 0.999": {"ema": 0.999}, "--compile": {"compile": True},
           "--distill hard": {"distill": "hard"}}
STUDENTS = {"lenet": ("lenet", {}), "cifar_resnet": ("cifar_resnet", {"depth": 8, "width": 16})}


def run(store: Path, out: Path, args: argparse.Namespace, options: dict) -> tuple[float, float]:
    """(best steady samples/s, wall seconds of the whole fit)."""
    student, kwargs = STUDENTS[args.student]
    t0 = time.perf_counter()
    res = trainer.fit([store], out, student=student, student_kwargs=kwargs, epochs=args.epochs,
                      batch_size=args.batch_size, num_workers=args.workers, overwrite=True, warmup_epochs=0,
                      seed=0, **options)
    return max(r["samples_per_s"] for r in res.history[1:]), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets/mnist.npz")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/logitstore-recipes-bench"))
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=3, help="Per run; the first (cold decode cache) is not counted.")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads.")
    ap.add_argument("--student", choices=sorted(STUDENTS), default="lenet")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.workdir = args.workdir / f"{args.images}"  # a corpus and its store per size: never a stale store
    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus, teacher, store = args.workdir / "corpus", args.workdir / "teacher.pt", args.workdir / "store.zarr"
    make_corpus(args.mnist, args.images, corpus)
    make_teacher(teacher, *TEACHER)
    make_store(teacher, corpus, store)

    best: dict[str, float] = {k: 0.0 for k in RECIPES}
    wall: dict[str, list[float]] = {k: [] for k in RECIPES}
    for _ in range(args.repeats):
        for name, options in RECIPES.items():
            rate, seconds = run(store, args.workdir / "run", args, options)
            best[name] = max(best[name], rate)
            wall[name].append(seconds)
    table = Table(title=f"trainer fit, {args.student}, {args.images} images, batch {args.batch_size}, "
                        f"{args.threads} thread(s), best of {args.repeats}")
    for col in ("recipe", "samples/s (steady)", "x plain", "wall s (first run, last run)"):
        table.add_column(col, justify="right" if col != "recipe" else "left")
    for name in RECIPES:
        table.add_row(name, f"{best[name]:,.0f}", f"{best[name] / best['plain']:.2f}",
                      f"{wall[name][0]:.1f}, {wall[name][-1]:.1f}")
    Console().print(table)
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
