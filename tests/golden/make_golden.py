"""Build the golden store of the current format version: `python tests/golden/make_golden.py`.

Run it only when releasing a new format version (then add, never replace, a golden store).
The rows are synthetic and fixed, so the bytes depend only on the format and the codecs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from logitstore import schema
from logitstore.writer import RowBatch, open_writer

HERE = Path(__file__).resolve().parent


def golden_meta() -> schema.StoreMeta:
    return schema.StoreMeta(
        format_version=schema.FORMAT_VERSION, complete=False, classes=("cat", "dog", "bird"),
        preprocess=schema.Preprocess((8, 8), None, (0.5,), (0.25,), "L"),
        views=schema.ViewSpec(2, "random_resized_crop", (0.5, 1.0), (0.75, 4 / 3), 0.5),
        teacher=schema.TeacherInfo("pkg.mod:net", "checkpoint", "teacher.pt", "ab" * 32, {"width": 4}),
        corpus=schema.CorpusInfo("/data/corpus", "directory", "cd" * 32, 11),
        dtype="float16", precision="fp32", seed=3, chunk_rows=4, batch_size=4,
        created="2026-11-25T00:00:00+00:00", versions={"logitstore": "golden"})


def golden_rows() -> list[RowBatch]:
    rng = np.random.default_rng(0)
    n, listed = 10, 11  # listing position 6 failed
    source = np.array([p for p in range(listed) if p != 6], dtype=np.int64)
    ids = [f"img{p:02d}.png" for p in source]
    logits = rng.normal(0, 3, size=(n, 2, 3)).astype(np.float16)
    digests = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    hw = np.tile(np.array([[12, 10]], np.int32), (n, 1))
    params = rng.integers(0, 8, size=(n, 2, 5)).astype(np.int32)
    params[..., 4] %= 2
    return [RowBatch(source[:6], ids[:6], logits[:6], digests[:6], hw[:6], params[:6], []),
            RowBatch(source[6:], ids[6:], logits[6:], digests[6:], hw[6:], params[6:],
                     [(6, "img06.png", "UnidentifiedImageError: cannot identify image file")])]


def build(out: Path) -> None:
    writer = open_writer(str(out), golden_meta(), overwrite=True)
    for batch in golden_rows():
        writer.submit(batch)
    writer.close(finalize=True)


if __name__ == "__main__":
    build(HERE / f"v{schema.FORMAT_VERSION}.zarr" if len(sys.argv) < 2 else Path(sys.argv[1]))
