"""Dump throughput, side by side on one teacher and one data loader:

  (a) inference alone, logits discarded (the ceiling)
  (b) `logitstore.dump` (workers decode, teacher runs, a background thread compresses and writes)
  (c) the naive baseline of several public KD repos: one .npy file per image

    python -m benchmarks.dump_throughput [--images 4000] [--mnist ../shared/datasets/mnist.npz]

Each is run --repeats times, interleaved in rotating order; the best run counts (least disturbed by the machine).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader

import logitstore
from logitstore.corpus import list_corpus
from logitstore.teacher.job import _collate, _CorpusViews, forward
from logitstore.schema import Preprocess, ViewSpec

PRE = {"size": [28, 28], "mean": [0.1307], "std": [0.3081], "mode": "L"}


def teacher_net(num_classes: int = 10) -> nn.Module:
    """A small ResNet-like MNIST teacher (~0.3 GFLOP per 1000 images): realistic cost on a CPU."""
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(block(1, 32), block(32, 32), nn.MaxPool2d(2), block(32, 64), block(64, 64),
                         nn.MaxPool2d(2), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, num_classes))


def make_corpus(mnist: Path, n: int, root: Path) -> None:
    with np.load(mnist) as d:
        imgs = d["train_images"][:n]
    for i, img in enumerate(imgs):
        sub = root / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(sub / f"{i:06d}.png")


def loader(images: Path, batch_size: int, workers: int) -> DataLoader:
    corpus = list_corpus(images)
    ds = _CorpusViews(corpus, Preprocess.from_dict(PRE), ViewSpec(), 0)
    batches = [list(range(b, min(b + batch_size, len(ds)))) for b in range(0, len(ds), batch_size)]
    return DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                      prefetch_factor=4 if workers else None)


def run_inference(model: nn.Module, images: Path, batch_size: int, workers: int, out: Path | None) -> int:
    pre = Preprocess.from_dict(PRE)
    n = 0
    for batch in loader(images, batch_size, workers):
        ok = batch["ok"]
        logits = forward(model, ok["pixels"], pre, torch.device("cpu"), None)
        if out is not None:  # the naive baseline: one file per image
            for image_id, row in zip(ok["ids"], logits.numpy()):
                dst = out / (image_id + ".npy")
                dst.parent.mkdir(parents=True, exist_ok=True)
                np.save(dst, row)
        n += len(ok["ids"])
    return n


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--mnist", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/mnist.npz"))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = teacher_net().eval()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        make_corpus(Path(args.mnist), args.images, tmp / "images")
        ckpt = tmp / "teacher.pt"
        torch.save({"arch": "benchmarks.dump_throughput:teacher_net", "arch_kwargs": {},
                    "state_dict": model.state_dict(), "classes": [str(i) for i in range(10)], "preprocess": PRE},
                   ckpt)
        best: dict[str, float] = {}
        sizes: dict[str, int] = {}
        names = ["a", "b", "b32", "c"]
        for r in range(args.repeats):
            # Rotate the order each repeat and let the last run's worker processes exit first, so
            # no run always follows the same neighbour.
            for name in names[r % 4:] + names[:r % 4]:
                time.sleep(1.0)
                out = tmp / f"out-{name}-{r}"
                t0 = time.perf_counter()
                if name == "a":
                    n = run_inference(model, tmp / "images", args.batch_size, args.workers, None)
                elif name == "c":
                    n = run_inference(model, tmp / "images", args.batch_size, args.workers, out)
                else:
                    s = logitstore.dump(str(ckpt), str(tmp / "images"), str(out), batch_size=args.batch_size,
                                        num_workers=args.workers, device="cpu",
                                        dtype="float32" if name == "b32" else "float16",
                                        trust_modules=["benchmarks.dump_throughput"])
                    n = s.n_images
                dt = time.perf_counter() - t0
                best[name] = max(best.get(name, 0.0), n / dt)
                if out.exists():
                    sizes[name] = du(out)
                    shutil.rmtree(out)
    n = args.images
    t = Table(title=f"dump throughput: {n:,} MNIST PNGs, batch {args.batch_size}, {args.workers} decode worker(s), "
                    f"{os.cpu_count()} cores, torch {torch.__version__}")
    for col in ("run", "images/s", "x inference", "bytes/image"):
        t.add_column(col, justify="right")
    labels = {"a": "(a) inference only (ceiling)", "b": "(b) logitstore dump float16",
              "b32": "(b) logitstore dump float32", "c": "(c) naive .npy per image (float32)"}
    for k in ("a", "b", "b32", "c"):
        t.add_row(labels[k], f"{best[k]:,.0f}", f"{best[k] / best['a']:.3f}",
                  f"{sizes[k] / n:,.1f}" if k in sizes else "-")
    Console().print(t)


if __name__ == "__main__":
    main()
