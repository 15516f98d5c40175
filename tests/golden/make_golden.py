"""Build the golden stores: `python tests/golden/make_golden.py` (writes every one that is missing).

Run it only when releasing a new format version (then add, never replace, a golden store).
The rows are synthetic and fixed, so the bytes depend only on the format and the codecs.
One store per kind of teacher target and version: full logits (1.0), top-K and sampled classes (1.1),
all three again with the metadata checksum (1.2), and with a registry teacher's preprocessing (1.3:
bicubic, antialias, a [h, w] resize, the floor centre crop), and with chunk records, statistics and
failures written as they come (1.4; one of them a corpus read from Parquet, `corpus.source`). The writer rebuilds the current version's
stores byte for byte; the older ones are kept to prove they still read.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from logitstore import schema
from logitstore.teacher.job import encode_targets
from logitstore.rows import Rows
from logitstore.writer import open_writer

HERE = Path(__file__).resolve().parent
# golden store name (without .zarr) -> what each row keeps of the teacher's output
_FULL, _TOPK = schema.TargetSpec(), schema.TargetSpec(schema.TARGET_TOPK, 2, (1.0, 2.0, 4.0, 8.0))
_SAMPLE = schema.TargetSpec(schema.TARGET_SAMPLE, 4, (1.0, 4.0), 4.0)
TARGETS = {"v1.0": _FULL, "v1.1-topk": _TOPK, "v1.1-sample": _SAMPLE,
           "v1.2": _FULL, "v1.2-topk": _TOPK, "v1.2-sample": _SAMPLE,
           "v1.3": _FULL, "v1.3-topk": _TOPK, "v1.3-sample": _SAMPLE,
           "v1.4": _FULL, "v1.4-topk": _TOPK, "v1.4-sample": _SAMPLE, "v1.4-parquet": _FULL,
           "v1.5-augment": _FULL}


def golden_views(name: str) -> schema.ViewSpec:
    """1.5: RandAugment, erasing and mixup/cutmix in groups of 4 for the -augment store; plain views otherwise."""
    extras = {}
    if name.endswith("-augment"):
        extras = dict(augment=schema.AugmentPolicy("rand_augment", 2, 9), erasing=schema.ErasingPolicy(0.25),
                      mix=schema.MixPolicy(0.2, 1.0, group=4))
    kind = schema.AUGMENTED_RESIZED_CROP if extras else "random_resized_crop"
    return schema.ViewSpec(2, kind, (0.5, 1.0), (0.75, 4 / 3), 0.5, **extras)


# The stores this writer writes today: the version it records for each (1.4 for a store without 1.5 views).
KINDS = {name: t for name, t in TARGETS.items()
         if name.split("-")[0] == f"v{schema.version_for(t, golden_views(name))}"}


def golden_preprocess(name: str) -> schema.Preprocess:
    if name.split("-")[0] in ("v1.0", "v1.1", "v1.2"):
        return schema.Preprocess((8, 8), None, (0.5,), (0.25,), "L")  # "bilinear-antialias"
    return schema.Preprocess((8, 8), (10, 9), (0.5,), (0.25,), "L", "bicubic", True, "center_floor")


def golden_corpus(name: str) -> schema.CorpusInfo:
    if name.endswith("-parquet"):
        return schema.CorpusInfo("/data/table.parquet", "parquet", "cd" * 32, 11,
                                 source={"kind": "parquet", "image_column": "image", "id_column": None})
    return schema.CorpusInfo("/data/corpus", "directory", "cd" * 32, 11)


def golden_meta(name: str = "v1.0") -> schema.StoreMeta:
    targets = TARGETS[name]
    return schema.StoreMeta(
        format_version=name[1:].split("-")[0], complete=False, classes=("cat", "dog", "bird"),
        preprocess=golden_preprocess(name),
        views=golden_views(name),
        teacher=schema.TeacherInfo("pkg.mod:net", "checkpoint", "teacher.pt", "ab" * 32, {"width": 4}),
        corpus=golden_corpus(name),
        dtype="float16", precision="fp32", seed=3, chunk_rows=4, batch_size=4,
        created="2026-11-25T00:00:00+00:00", versions={"logitstore": "golden"}, targets=targets)


def golden_rows(name: str = "v1.0") -> list[Rows]:
    rng = np.random.default_rng(0)
    n, listed = 10, 11  # listing position 6 failed
    source = np.array([p for p in range(listed) if p != 6], dtype=np.int64)
    ids = [f"img{p:02d}.png" for p in source]
    logits = rng.normal(0, 3, size=(n, 2, 3)).astype(np.float16)
    digests = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    hw = np.tile(np.array([[12, 10]], np.int32), (n, 1))
    params = rng.integers(0, 8, size=(n, 2, 5)).astype(np.int32)
    params[..., 4] %= 2
    if schema.parse_version(name[1:].split("-")[0]) >= schema.SIZES_CHECKED_SINCE:
        params[..., 2:4] = np.maximum(params[..., 2:4], 1)  # readers refuse a view of no pixels (R6)
    targets = encode_targets(golden_meta(name), torch.from_numpy(logits.astype(np.float32)), ids)
    extras = None
    if name.endswith("-augment"):  # 1.5, from its own generator so the other stores' rows stay as they were
        r2 = np.random.default_rng(15)
        ops = np.stack([r2.integers(0, 14, size=(n, 2, 2)), r2.integers(-9, 10, size=(n, 2, 2))], axis=-1).astype(np.int8)
        erase = np.zeros((n, 2, 5), np.int16)
        erase[::3, :, :4] = (1, 2, 3, 4)
        mix = np.zeros((n, 2, 5), np.int16)
        mix[0::2, :, 0], mix[1::2, :, 0] = 1, -1  # pairs of rows within groups of 4 positions
        mix[::4, 1, 1:] = (2, 2, 4, 4)
        lam = np.where(mix[..., 0] != 0, r2.uniform(0, 1, size=(n, 2)), 1.0).astype(np.float32)
        extras = {schema.AUGMENT_OPS: ops, schema.ERASE_BOXES: erase, schema.MIX_PARAMS: mix, schema.MIX_LAMBDA: lam}
    full = Rows(np.array(ids, dtype=object), None if targets else logits, digests, hw, params, None, targets,
                source=source, view_extras=extras)
    first, rest = full.take(slice(0, 6)), full.take(slice(6, None))
    return [first, replace(rest, failures=[(6, "img06.png", "UnidentifiedImageError: cannot identify image file")])]


def build(out: Path, name: str = "v1.0") -> None:
    writer = open_writer(str(out), golden_meta(name), overwrite=True)
    for batch in golden_rows(name):
        writer.submit(batch)
    writer.close(finalize=True)


if __name__ == "__main__":
    for name in KINDS:
        if not (HERE / f"{name}.zarr").exists():
            build(HERE / f"{name}.zarr", name)
