"""Chunks the writer encodes itself (logitstore/chunk_io.py) are the very files zarr writes for the same
values; arrays of another codec chain, and rows short of a whole chunk, are left to zarr."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from logitstore.chunk_io import ChunkWriter, zstd_level
from logitstore.writer import chunk_codecs, every_chunk_written, logits_filters

R = 64


def arrays(root: Path, dtype: str = "float16", filters: list | None = None) -> tuple[zarr.Array, zarr.Array]:
    made = []
    for name in ("ours", "zarrs"):
        g = zarr.open_group(str(root / name), mode="w")
        made.append(every_chunk_written(g.create_array("logits", shape=(5 * R, 2, 37), chunks=(R, 2, 37), dtype=dtype,
                                                       fill_value=0, compressors=chunk_codecs(), filters=filters)))
    return made[0], made[1]


def chunk_files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("c/**/*")) if f.is_file()}


def teacher_values(n: int, dtype: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    v = np.round(rng.standard_normal((n, 2, 37)) * 6).astype(dtype)  # compressible: each Zstd level differs
    v[3, 0, :4] = [np.finfo(dtype).max, -np.finfo(dtype).max, 0, np.finfo(dtype).tiny]
    return v


def write_whole(w: ChunkWriter, arr: zarr.Array, a: int, values: np.ndarray) -> int:
    """Rows [a, ...) of one array through the writer's pool; how many leading rows it wrote (whole chunks)."""
    p = w.start({"a": arr}, a, {"a": values}, len(values), arr.chunks[0])
    p.results()
    return p.done["a"]


def test_whole_chunks_are_zarrs_bytes_and_the_rest_goes_to_zarr(tmp_path):
    for dtype in ("float16", "float32"):
        ours, theirs = arrays(tmp_path / dtype, dtype)
        values = teacher_values(4 * R + 9, dtype)
        w = ChunkWriter()
        try:
            assert zstd_level(ours) == 3
            assert write_whole(w, ours, 0, values[:2 * R + 5]) == 2 * R  # two whole chunks; 5 rows left for zarr
            ours[2 * R:2 * R + 5] = values[2 * R:2 * R + 5]
            assert write_whole(w, ours, 2 * R + 5, values[2 * R + 5:]) == 0  # not on a chunk boundary: zarr's
            ours[2 * R + 5:4 * R + 9] = values[2 * R + 5:]
            assert write_whole(w, ours, 4 * R, values[:2 * R]) == 0  # past the array's end (5 chunks): left to zarr
        finally:
            w.shutdown()
        theirs[:4 * R + 9] = values
        a, b = chunk_files(tmp_path / dtype / "ours"), chunk_files(tmp_path / dtype / "zarrs")
        assert len(a) == 5 and a.keys() == b.keys()
        for key in a:
            assert a[key] == b[key], key
        again = zarr.open_array(str(tmp_path / dtype / "ours"), path="logits", mode="r")
        assert np.array_equal(again[:4 * R + 9], values)


def test_other_codec_chains_are_left_to_zarr(tmp_path):
    rounded, _ = arrays(tmp_path / "bits", filters=logits_filters(7))
    assert zstd_level(rounded) is None
    g = zarr.open_group(str(tmp_path / "plain"), mode="w")
    plain = g.create_array("x", shape=(2 * R, 4), chunks=(R, 4), dtype="float32", fill_value=0)  # zarr's default codecs
    assert zstd_level(plain) is None
    w = ChunkWriter()
    try:
        assert write_whole(w, rounded, 0, teacher_values(R, "float16")) == 0
        assert write_whole(w, plain, 0, np.ones((R, 4), np.float32)) == 0
    finally:
        w.shutdown()
    assert not list((tmp_path / "bits").rglob("c/*/*/*"))


def test_every_row_array_a_writer_writes_is_zarrs_bytes(tmp_path):
    """The writer's pool encodes whole chunks of every row array (ids through VLen UTF-8, digests, sizes, view
    parameters, logits); each chunk file equals the one zarr writes for the same rows, the partial last one too,
    and so do the chunk records' files (one partial record chunk: 6 records in chunks of 64)."""
    from logitstore import schema
    from logitstore.rows import Rows
    from logitstore.schema import CorpusInfo, Preprocess, StoreMeta, TeacherInfo, ViewSpec
    from logitstore.store import row_array_names
    from logitstore.writer import create_arrays, open_writer, write_rows

    n, c, v = 5 * R + 17, 10, 2
    meta = StoreMeta(format_version=schema.FORMAT_VERSION, complete=False, classes=tuple(f"c{i}" for i in range(c)),
                     preprocess=Preprocess(size=(4, 4), mode="L"), views=ViewSpec(count=v, kind="random_resized_crop"),
                     teacher=TeacherInfo("synthetic", "factory", "", "0" * 64),
                     corpus=CorpusInfo("/nowhere", "directory", "0" * 64, n), dtype="float16", precision="fp32",
                     seed=0, chunk_rows=R, batch_size=50, created="2026-12-02T00:00:00+00:00", versions={})
    rng = np.random.default_rng(3)
    rows = Rows(np.array([f"dïr/日本-{i:05d}.png" for i in range(n)], dtype=object),
                (rng.standard_normal((n, v, c)) * 4).astype(np.float16),
                rng.integers(0, 256, (n, 32), dtype=np.uint8), rng.integers(1, 900, (n, 2), dtype=np.int32),
                np.stack([rng.integers(0, 4, (n, v)), rng.integers(0, 4, (n, v)), rng.integers(1, 5, (n, v)),
                          rng.integers(1, 5, (n, v)), rng.integers(0, 2, (n, v))], axis=-1).astype(np.int32),
                source=np.arange(n))
    w = open_writer(str(tmp_path / "ours.zarr"), meta)
    for a in range(0, n, 50):
        w.submit(rows.take(slice(a, a + 50)))
    w.close(finalize=True)

    g = zarr.open_group(str(tmp_path / "zarrs.zarr"), mode="w")
    create_arrays(g, meta, n)
    names = row_array_names(meta)
    assert write_rows({name: every_chunk_written(g[name]) for name in names}, 0, rows) is None  # zarr alone
    for name in names:
        ours, theirs = chunk_files(tmp_path / "ours.zarr" / name), chunk_files(tmp_path / "zarrs.zarr" / name)
        assert len(ours) == 6 and ours.keys() == theirs.keys(), name
        for key in ours:
            assert ours[key] == theirs[key], (name, key)
    # the chunk records, written whole from memory, are the bytes zarr writes for the same records
    recs = zarr.open_array(str(tmp_path / "ours.zarr" / schema.CHUNK_SHA256), mode="r")[:]
    assert recs.shape[0] == 6 and recs.any(axis=(1, 2)).all()
    g[schema.CHUNK_SHA256][:] = recs
    assert chunk_files(tmp_path / "ours.zarr" / schema.CHUNK_SHA256) == chunk_files(tmp_path / "zarrs.zarr" / schema.CHUNK_SHA256)
    assert list(logitstore_ids(tmp_path / "ours.zarr")) == list(rows.ids)


def logitstore_ids(path: Path) -> np.ndarray:
    import logitstore

    return logitstore.open_store(path)[:].ids


def test_statistics_gathered_chunk_by_chunk_equal_one_pass_over_every_row(tmp_path):
    """With chunks of whole 128-row blocks each pool job adds up its own chunk's statistics; merged, they are
    the numbers one pass over all the rows gives (every count and both sums), the partial last chunk included."""
    import logitstore
    from logitstore import schema
    from logitstore.records import STAT_BLOCK_ROWS, Statistics
    from logitstore.rows import Rows
    from logitstore.schema import CorpusInfo, Preprocess, StoreMeta, TeacherInfo, ViewSpec
    from logitstore.writer import open_writer

    r, c = 2 * STAT_BLOCK_ROWS, 50
    n = 5 * r + 40
    meta = StoreMeta(format_version=schema.FORMAT_VERSION, complete=False, classes=tuple(f"c{i}" for i in range(c)),
                     preprocess=Preprocess(size=(4, 4), mode="L"), views=ViewSpec(),
                     teacher=TeacherInfo("synthetic", "factory", "", "0" * 64),
                     corpus=CorpusInfo("/nowhere", "directory", "0" * 64, n), dtype="float16", precision="fp32",
                     seed=0, chunk_rows=r, batch_size=64, created="2026-12-02T00:00:00+00:00", versions={})
    rng = np.random.default_rng(5)
    rows = Rows(np.array([f"img{i:05d}.png" for i in range(n)], dtype=object),
                (rng.standard_normal((n, 1, c)) * rng.uniform(0.1, 8, (n, 1, 1))).astype(np.float16),
                rng.integers(0, 256, (n, 32), dtype=np.uint8), np.full((n, 2), 8, np.int32),
                np.tile(np.array([0, 0, 4, 4, 0], np.int32), (n, 1, 1)), source=np.arange(n))
    w = open_writer(str(tmp_path / "s.zarr"), meta)
    for a in range(0, n, 64):
        w.submit(rows.take(slice(a, a + 64)))
    w.close(finalize=True)
    one_pass = Statistics(c)
    one_pass.add(rows, meta)
    stored = logitstore.open_store(tmp_path / "s.zarr").meta.statistics
    assert stored["rows"] == n and sum(stored["top1_counts"]) == n
    for key, value in one_pass.to_dict().items():
        if key != "failures_by_reason":
            assert stored[key] == value, key
