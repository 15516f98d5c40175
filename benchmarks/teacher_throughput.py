"""A registry teacher's dump against its bare forward pass (issue 13):

  (a) the teacher's forward pass on pre-decoded, preprocessed tensors (the ceiling)
  (b) `logitstore dump --teacher timm:NAME --weights FILE`: read, decode, resize and crop (timm's
      preprocessing: bicubic, crop_pct) in a worker, the teacher, float16 logits compressed and written

and where (b)'s time goes, stage by stage, measured one stage at a time in this process.

    python -m benchmarks.teacher_throughput [--model resnet50] [--images 96] [--batch-size 32] [--workers 1]

Random weights (safetensors), photo-like JPEGs of ImageNet's usual sizes. Each of (a), (b) runs
--repeats times, alternating; the best run counts.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

import logitstore
from logitstore.corpus import decode_image
from logitstore.teacher.load import prepare_teacher
from logitstore.views import apply_view, normalize
from logitstore.writer import open_writer

SIZES = [(375, 500), (500, 375), (333, 500), (500, 400), (480, 640)]  # ImageNet's common shapes (h, w)


def photo(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(rng.uniform(3, 9) * x + rng.uniform(0, 6)) + np.cos(rng.uniform(2, 7) * y)
                    for _ in range(3)], -1)
    img = (img - img.min()) / (np.ptp(img) + 1e-9) * 255 + rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import timm
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "images").mkdir()
        for i in range(args.images):
            h, w = SIZES[i % len(SIZES)]
            Image.fromarray(photo(h, w, rng)).save(tmp / "images" / f"{i:05d}.jpg", quality=90)
        weights = tmp / "w.safetensors"
        save_file(timm.create_model(args.model).state_dict(), str(weights))
        spec = f"timm:{args.model}"
        t, pre, width = prepare_teacher(spec, str(weights), None, {})
        model = t.model
        paths = sorted((tmp / "images").iterdir())

        # Stage by stage, in this process: what one image costs at each arrow of the data flow.
        t0 = time.perf_counter()
        data = [p.read_bytes() for p in paths]
        t1 = time.perf_counter()
        decoded = [decode_image(d, pre.mode) for d in data]
        t2 = time.perf_counter()
        views = [apply_view(img, None, pre, "eval") for img in decoded]
        t3 = time.perf_counter()
        x = normalize(torch.stack(views), pre)
        t4 = time.perf_counter()
        stage = {"read files": t1 - t0, "decode JPEG": t2 - t1, f"resize + crop ({pre.interpolation})": t3 - t2,
                 "normalise": t4 - t3}

        def forward_all() -> torch.Tensor:
            outs = []
            with torch.inference_mode():
                for b in range(0, len(x), args.batch_size):
                    outs.append(model(x[b:b + args.batch_size]).float())
            return torch.cat(outs)

        forward_all()  # warm-up: first-call allocations and kernel selection
        best: dict[str, float] = {}
        for r in range(args.repeats):
            for name in (["a", "b"] if r % 2 == 0 else ["b", "a"]):
                time.sleep(1.0)
                start = time.perf_counter()
                if name == "a":
                    logits = forward_all()
                else:
                    summary = logitstore.dump(spec, str(tmp / "images"), str(tmp / f"out{r}.zarr"),
                                              weights=str(weights), batch_size=args.batch_size,
                                              num_workers=args.workers, device="cpu")
                    best["loop"] = max(best.get("loop", 0.0), summary.images_per_s)
                dt = time.perf_counter() - start
                best[name] = max(best.get(name, 0.0), args.images / dt)
        stage["teacher forward"] = args.images / best["a"]
        done = logitstore.open_store(tmp / "out0.zarr")
        rows = replace(done[:], source=np.arange(len(done)))  # the rows as the dump hands them over
        start = time.perf_counter()
        writer = open_writer(str(tmp / "write.zarr"), replace(done.meta, complete=False, fingerprints={}))
        writer.submit(rows)
        writer.close(finalize=True)
        stage["float16 compress + write + finalize"] = time.perf_counter() - start
        del logits

    c = Console()
    t = Table(title=f"{spec} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {width} classes) "
                    f"at {pre.size[0]} px: {args.images} JPEGs, batch {args.batch_size}, {args.workers} decode "
                    f"worker(s), {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for col in ("run", "images/s", "x forward"):
        t.add_column(col, justify="right")
    t.add_row("(a) forward on pre-decoded tensors", f"{best['a']:.2f}", "1.000")
    t.add_row("(b) logitstore dump: its loop (decode, resize, forward, write)", f"{best['loop']:.2f}",
              f"{best['loop'] / best['a']:.3f}")
    t.add_row("(b) logitstore dump: the whole call (+ load, hash, probe)", f"{best['b']:.2f}",
              f"{best['b'] / best['a']:.3f}")
    c.print(t)
    s = Table(title="where (b)'s time goes, each stage alone in one process (per image)")
    for col in ("stage", "ms / image", "share of the sum"):
        s.add_column(col, justify="right")
    total = sum(stage.values())
    for k, v in stage.items():
        s.add_row(k, f"{1e3 * v / args.images:.2f}", f"{100 * v / total:.1f}%")
    s.add_row("sum (serial, no overlap)", f"{1e3 * total / args.images:.2f}", "100%")
    c.print(s)


if __name__ == "__main__":
    main()
