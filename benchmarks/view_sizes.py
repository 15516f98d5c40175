"""Bytes per image per view: what many views cost, with and without 1.5 augmentation parameters.

    python -m benchmarks.view_sizes                    # N = 256 images, V = 16 views (about a minute)
    python -m benchmarks.view_sizes --images 512 --views 64

Stores are written by the real writer (zarr, Zstd-3, CRC32C, chunk records, finalize) from synthetic
rows: logits shaped like a trained teacher's (benchmarks/storage_size.py `teacher_like`), crops and
flips drawn by `sample_view_params` from 375 x 500 originals, and the 1.5 parameters drawn by
`logitstore.augment.sample_extras` for a 224 x 224 input (partners settled in groups of 64, as the
dump does). For C = 10 and C = 1000 and each target kind (full float16 logits, --topk 5, --sample 8)
it prints the stored bytes per image per view of the targets, of the view parameters (view_params
and the 1.5 arrays) and in all, for plain crops, crops + RandAugment + erasing, and those + mixup/cutmix.
Per-image arrays (ids, digests, image_hw) are listed apart: they do not grow with V.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from logitstore import schema
from logitstore.augment import partner_rank, sample_extras
from logitstore.rows import Rows
from logitstore.schema import (AugmentPolicy, CorpusInfo, ErasingPolicy, MixPolicy, Preprocess, StoreMeta, TargetSpec,
                               TeacherInfo, ViewSpec)
from logitstore.teacher.job import encode_targets
from logitstore.views import sample_view_params
from logitstore.writer import open_writer

from .storage_size import teacher_like

TARGETS = {"full float16": TargetSpec(), "--topk 5": TargetSpec(schema.TARGET_TOPK, 5, (1.0, 2.0, 4.0, 8.0)),
           "--sample 8": TargetSpec(schema.TARGET_SAMPLE, 8, (1.0, 2.0, 4.0, 8.0), 4.0)}
POLICIES = {"crops + flips": {},
            "+ rand-augment, erase": dict(augment=AugmentPolicy("rand_augment", 2, 9), erasing=ErasingPolicy(0.25)),
            "+ mixup/cutmix": dict(augment=AugmentPolicy("rand_augment", 2, 9), erasing=ErasingPolicy(0.25),
                                   mix=MixPolicy(0.2, 1.0))}
PER_IMAGE = (schema.IDS, schema.DIGESTS, schema.IMAGE_HW)
VIEW_ARRAYS = (schema.VIEW_PARAMS, schema.AUGMENT_OPS, schema.ERASE_BOXES, schema.MIX_PARAMS, schema.MIX_LAMBDA)


def rows_for(meta: StoreMeta, n: int, seed: int = 0) -> Rows:
    v, c, spec = meta.views.count, meta.num_classes, meta.views
    rng = np.random.default_rng(seed)
    ids = [f"train/n{i // 100:04d}/img{i:06d}.JPEG" for i in range(n)]
    logits = teacher_like(n * v, c, seed).reshape(n, v, c)
    params = np.stack([sample_view_params(375, 500, spec, meta.seed, i) for i in ids])
    extras = None
    if spec.augmented:
        drawn = [sample_extras(spec, meta.seed, i, meta.preprocess.size) for i in ids]
        extras = {k: np.stack([d[0][k] for d in drawn]) for k in drawn[0][0]}
        if spec.mix is not None:  # partners in groups of `group` rows, as the dump settles them
            u = np.stack([d[1] for d in drawn])
            g = spec.mix.group
            for a in range(0, n, g):
                m = min(n, a + g) - a
                for r in range(m):
                    for j in range(v):
                        p = partner_rank(float(u[a + r, j]), r, m)
                        extras[schema.MIX_PARAMS][a + r, j, 0] = 0 if p < 0 else p - r
    targets = encode_targets(meta, torch.from_numpy(logits), ids)
    return Rows(np.array(ids, dtype=object), None if targets else logits.astype(np.float16),
                rng.integers(0, 256, (n, 32), dtype=np.uint8), np.tile(np.array([[375, 500]], np.int32), (n, 1)),
                params, None, targets, source=np.arange(n, dtype=np.int64), view_extras=extras)


def measure(out: Path, n: int, v: int, c: int, targets: TargetSpec, policy: dict) -> dict[str, int]:
    views = ViewSpec(v, schema.AUGMENTED_RESIZED_CROP if policy else "random_resized_crop", **policy)
    meta = StoreMeta(
        format_version=schema.version_for(targets, views), complete=False, classes=tuple(str(i) for i in range(c)),
        preprocess=Preprocess((224, 224), 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "RGB"), views=views,
        teacher=TeacherInfo("bench:net", "checkpoint", "t.pt", "ab" * 32), corpus=CorpusInfo("/c", "directory", "cd" * 32, n),
        dtype="float16", precision="fp32", seed=0, chunk_rows=1, batch_size=64, created="", versions={},
        targets=targets)
    row_bytes = sum(v * last * np.dtype(d).itemsize for last, d in meta.target_arrays().values())
    row_bytes += sum(v * int(np.prod(t)) * np.dtype(d).itemsize for t, d in schema.view_extra_arrays(views).values())
    from dataclasses import replace

    meta = replace(meta, chunk_rows=schema.chunk_rows_for(row_bytes, views.augmented))
    writer = open_writer(str(out), meta)
    writer.submit(rows_for(meta, n))
    final = writer.close(finalize=True)
    return dict(final.statistics["stored_bytes"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--views", type=int, default=16)
    args = ap.parse_args()
    n, v = args.images, args.views
    table = Table(title=f"bytes per image per view, stored (N = {n} images, V = {v} views, float16)")
    for col in ("C", "targets", "views", "targets B/view", "view params B/view", "total B/view",
                "vs crops + flips", "per image (ids, digests, sizes)"):
        table.add_column(col, justify="right" if col not in ("targets", "views") else "left")
    k = 0
    with tempfile.TemporaryDirectory() as tmp:
        for c in (10, 1000):
            for tname, targets in TARGETS.items():
                base = None
                for pname, policy in POLICIES.items():
                    k += 1
                    b = measure(Path(tmp) / f"s{k}.zarr", n, v, c, targets, policy)
                    tb = sum(x for k, x in b.items() if k not in PER_IMAGE and k not in VIEW_ARRAYS)
                    vb = sum(b.get(k, 0) for k in VIEW_ARRAYS)
                    per_image = sum(b[k] for k in PER_IMAGE) / n
                    total = (tb + vb) / (n * v)
                    base = base or total
                    table.add_row(str(c), tname, pname, f"{tb / (n * v):,.1f}", f"{vb / (n * v):,.2f}",
                                  f"{total:,.1f}", f"{total / base:.3f}x", f"{per_image:,.1f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
