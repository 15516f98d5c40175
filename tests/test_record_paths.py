"""The writer's fast paths for records and statistics give the very bits of the plain computations they
replace: float16 converted through torch against NumPy's own cast, the ids and corpus bytes laid out in
one join / one NumPy mask against a join per row, on values chosen to break them."""
from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np

from logitstore import records, schema
from logitstore.rows import Rows
from logitstore.schema import CorpusInfo, Preprocess, StoreMeta, TeacherInfo, ViewSpec

C = 1000


def meta(views: int = 1) -> StoreMeta:
    return StoreMeta(format_version=schema.FORMAT_VERSION, complete=False, classes=tuple(f"c{i}" for i in range(C)),
                     preprocess=Preprocess(size=(4, 4), mode="L"), views=ViewSpec(count=views),
                     teacher=TeacherInfo("synthetic", "factory", "", "0" * 64),
                     corpus=CorpusInfo("/nowhere", "directory", "0" * 64, 10), dtype="float16", precision="fp32",
                     seed=0, chunk_rows=64, batch_size=64, created="2026-12-02T00:00:00+00:00", versions={})


def rows_of(logits: np.ndarray, ids: list[str] | None = None) -> Rows:
    n = len(logits)
    rng = np.random.default_rng(n)
    return Rows(np.array(ids if ids is not None else [f"d{i // 7}/{i:06d}.png" for i in range(n)], dtype=object),
                logits, rng.integers(0, 256, (n, 32), dtype=np.uint8), np.full((n, 2), 4, np.int32),
                np.zeros((n, logits.shape[1], 5), np.int32))


def hard_logits(views: int = 1) -> np.ndarray:
    """float16 logits at their edges: -inf classes, +-65504, ties for the top class, subnormals, all-equal
    rows, one-hot rows, and ordinary teacher-like rows; more rows than a statistics block and a torch piece."""
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((389, views, C)) * 4).astype(np.float16)
    z[0::7, 0, 3] = -np.inf
    z[1::11, 0] = 0                         # uniform: confidence 1/C, entropy log C
    z[2::13, 0, :5] = 65504                 # five-way tie at the float16 maximum
    z[3::17, 0, 10:20] = -65504
    z[4::19, 0, 1:3] = np.float16(6e-8)     # subnormal
    z[5::23, 0] = -65504
    z[5::23, 0, 42] = 65504                 # one-hot: confidence 1, entropy 0
    z[6::29, 0, :] = -np.inf
    z[6::29, 0, 7] = 0                      # every other class impossible
    z[8::31, 0, 900:] = 20                  # tie of 100 classes
    z[100, 0] = 0                           # and one row of each kind, alone
    z[101, 0], z[101, 0, 42] = -65504, 65504
    z[102, 0, :5] = 65504
    z[103, 0], z[103, 0, 900:] = 0, 20
    z[104, 0], z[104, 0, 7] = -np.inf, 0
    return z


def plain_predictions(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Softmax confidence, entropy and top-1 in float64, the textbook way."""
    x = z.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=1, keepdims=True)
    ent = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
    return p.max(axis=1), ent, p.argmax(axis=1)


def test_statistics_through_torch_are_numpy_bits_and_the_textbook_values():
    for views in (1, 2):  # two views: the first view is a strided slice
        z = hard_logits(views)
        fast = records.first_view_predictions(rows_of(z), meta(views))
        frozen = z.copy()
        frozen.flags.writeable = False  # torch does not take read-only arrays: NumPy's own cast
        plain = records.first_view_predictions(rows_of(frozen), meta(views))
        for a, b in zip(fast, plain):
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
        conf, ent, top = plain_predictions(z[:, 0])
        assert np.array_equal(fast[2], top)  # ties: the first of the tied classes, like argmax
        np.testing.assert_allclose(fast[0], conf, rtol=2e-6, atol=1e-9)
        # A -inf class makes exp(z - max) * (z - max) = 0 * -inf: NaN entropy, as before (the histogram skips it)
        finite = np.isfinite(z[:, 0]).all(axis=1)
        assert np.isnan(fast[1][~finite]).all() and finite.sum() > 300
        np.testing.assert_allclose(fast[1][finite], ent[finite], rtol=0, atol=3e-5)
        conf, ent, top = fast
        assert np.isclose(conf[100], 1 / C) and np.isclose(ent[100], np.log(C), atol=1e-5) and top[100] == 0
        assert conf[101] == 1.0 and abs(ent[101]) < 1e-6 and top[101] == 42
        assert np.isclose(conf[102], 1 / 5) and np.isclose(ent[102], np.log(5), atol=1e-5) and top[102] == 0
        assert np.isclose(conf[103], 1 / 100, rtol=1e-3) and top[103] == 900
        assert conf[104] == 1.0 and top[104] == 7

        s_fast, s_plain = records.Statistics(C), records.Statistics(C)
        s_fast.add(rows_of(z), meta(views))
        s_plain.add(rows_of(frozen), meta(views))
        assert s_fast.to_dict() == s_plain.to_dict()
        assert s_fast.rows == len(z) and s_fast.top1.sum() == len(z)
        assert s_fast.conf_sum == int(np.rint(fast[0] * 1e9).astype(np.int64).sum())


def test_float32_logits_take_numpy_path_with_the_same_values():
    z = hard_logits().astype(np.float32) * np.float32(1.5)
    conf, ent, top = records.first_view_predictions(rows_of(z), meta())
    pc, pe, pt = plain_predictions(z[:, 0])
    assert np.array_equal(top, pt)
    np.testing.assert_allclose(conf, pc, rtol=2e-6, atol=1e-9)
    finite = np.isfinite(z[:, 0]).all(axis=1)
    np.testing.assert_allclose(ent[finite], pe[finite], rtol=0, atol=3e-5)


IDS = ["é/ü.png", "", "a", "日本/x.jpg", "b" * 300, "n01440764/ILSVRC2012_val_00000293.JPEG"]


def row_by_row(rows: Rows) -> bytes:
    return b"".join(str(i).encode("utf-8") + b"\0" + d.tobytes() for i, d in zip(rows.ids, rows.digests))


def test_ids_and_corpus_bytes_equal_a_join_per_row():
    z = np.zeros((len(IDS), 1, 4), np.float16)
    cases = [rows_of(z, IDS), rows_of(z[:1], IDS[1:2]), rows_of(z[:0], []),
             rows_of(np.zeros((3000, 1, 4), np.float16))]
    for rows in cases:
        assert bytes(records.corpus_entries(rows)) == row_by_row(rows)
        assert records.array_bytes(schema.IDS, rows.ids) == b"".join(str(i).encode("utf-8") + b"\0" for i in rows.ids)
    odd = rows_of(z[:2], ["a\0b", "c"])  # an id holding 0x00 (no corpus makes one) takes the row-by-row path
    assert bytes(records.corpus_entries(odd)) == row_by_row(odd) == b"a\0b\0" + odd.digests[0].tobytes() + b"c\0" + odd.digests[1].tobytes()
    strided = replace(cases[0], digests=np.repeat(cases[0].digests, 2, axis=0)[::2])  # not contiguous
    assert bytes(records.corpus_entries(strided)) == row_by_row(cases[0])
    h = hashlib.sha256(records.corpus_entries(cases[3])).hexdigest()
    assert h == hashlib.sha256(row_by_row(cases[3])).hexdigest()


def test_wide_logits_convert_row_by_row_with_the_same_bits():
    z = (np.random.default_rng(3).standard_normal((70, 1, 40_000)) * 8).astype(np.float16)  # > 32,000 values a row
    z[5, 0, 123] = 65504
    frozen = z.copy()
    frozen.flags.writeable = False
    fast, plain = (records.first_view_predictions(rows_of(a), meta()) for a in (z, frozen))
    for a, b in zip(fast, plain):
        assert np.array_equal(a, b)
    assert fast[2][5] == 123 and fast[0][5] == 1.0
