"""Format 1.4 chunk records: finalize reads nothing back, a killed write at any stage resumes to the same
bytes, verify names a damaged chunk (also in a sample), and info answers from statistics kept at write time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import logitstore
from logitstore import schema
from logitstore.tools.inspect_store import info, sample_chunks, verify

from conftest import REPO, TESTS, flip_byte, invoke

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}

# A writer of synthetic rows, run as its own process: 1,000 listed images (every 97th fails, with one of
# two reasons), C = 10, two views, 64 rows a chunk. KILL=<stage> ends the process with os._exit (as a
# SIGKILL would: nothing flushed, no cleanup) at that stage of the write or of finalize.
WRITER = r'''
import os, sys
import numpy as np
import zarr
import logitstore.writer as w
from logitstore import schema
from logitstore.rows import Rows
from logitstore.schema import CorpusInfo, Preprocess, StoreMeta, TeacherInfo, ViewSpec

out, kill = sys.argv[1], os.environ.get("KILL", "")
N, C, V = 1000, 10, 2
meta = StoreMeta(format_version=schema.FORMAT_VERSION, complete=False, classes=tuple(f"c{i}" for i in range(C)),
                 preprocess=Preprocess(size=(4, 4), mode="L"), views=ViewSpec(count=V, kind="random_resized_crop"),
                 teacher=TeacherInfo("synthetic", "factory", "", "0" * 64),
                 corpus=CorpusInfo("/nowhere", "directory", "0" * 64, N), dtype="float16", precision="fp32", seed=0,
                 chunk_rows=64, batch_size=50, created="2026-12-01T00:00:00+00:00", versions={})
rng = np.random.default_rng(0)
logits = (rng.standard_normal((N, V, C)) * rng.uniform(0.1, 6, (N, 1, 1))).astype(np.float16)

def die(stage):
    if kill == stage:
        os._exit(9)

def counted(stage, fn):
    calls = [0]
    def wrapped(*a, **k):
        calls[0] += 1
        if kill == f"{stage}:{calls[0]}":
            os._exit(9)
        return fn(*a, **k)
    return wrapped

w.write_rows = counted("write", w.write_rows)                       # chunks handed to zarr, not committed
w.StoreWriter._commit = counted("commit", w.StoreWriter._commit)    # records written, progress not yet
create, resize = zarr.Group.create_array, zarr.Array.resize
zarr.Group.create_array = lambda self, name, **k: (die("failures") if name == schema.FAILED_REASONS else None,
                                                   create(self, name, **k))[1]
zarr.Array.resize = lambda self, *a, **k: (die("resize"), resize(self, *a, **k))[1]
fbr = w.failures_by_reason
w.failures_by_reason = lambda f: (die("fingerprint"), fbr(f))[1]
sealed = StoreMeta.sealed
StoreMeta.sealed = lambda self: (die("seal"), sealed(self))[1]
delete = zarr.core.attributes.Attributes.__delitem__
zarr.core.attributes.Attributes.__delitem__ = lambda self, key: (die("progress"), delete(self, key))[1]

if w.already_complete(out, meta) is None:
    writer = w.open_writer(out, meta)
    start = writer.progress.next_source
    for a in range(start, N, 50):
        pos = np.arange(a, min(N, a + 50))
        ok = pos[pos % 97 != 5]
        failures = [(int(p), f"img{p:04d}.png", "decode" if p % 2 else "missing") for p in pos[pos % 97 == 5]]
        writer.submit(Rows(np.array([f"img{p:04d}.png" for p in ok], dtype=object), logits[ok],
                           np.tile(np.arange(32, dtype=np.uint8), (len(ok), 1)) + (ok % 200)[:, None].astype(np.uint8),
                           np.full((len(ok), 2), 8, np.int32), np.tile(np.array([0, 0, 4, 4, 0], np.int32), (len(ok), V, 1)),
                           source=ok, failures=failures))
    writer.close(finalize=True)
'''


def write(out: Path, kill: str = "") -> int:
    r = subprocess.run([sys.executable, "-c", WRITER, str(out)], env={**ENV, "KILL": kill}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode in (0, 9), r.stderr
    return r.returncode


def files(root: Path) -> dict[str, bytes]:
    """Every file's bytes; the root zarr.json by its `logitstore` attribute (R2 leaves a stale progress
    attribute harmless once `complete` is written)."""
    out = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
           if p.is_file() and p != root / "zarr.json" and p.name != ".logitstore.lock"}
    out["zarr.json"] = json.dumps(json.loads((root / "zarr.json").read_text())["attributes"][schema.ATTR_ROOT])
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    assert write(out) == 0
    return out


STAGES = ["write:2", "commit:3", "failures", "resize", "fingerprint", "seal", "progress"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_write_killed_at_any_stage_of_writing_or_finalize_resumes_to_the_same_bytes(tmp_path, reference, stage):
    out = tmp_path / "s.zarr"
    assert write(out, kill=stage) == 9, f"the writer never reached stage {stage}"
    assert write(out) == 0
    assert files(out) == files(reference)
    assert logitstore.open_store(out).meta.fingerprints == logitstore.open_store(reference).meta.fingerprints


def test_finalize_records_every_chunk_and_fingerprints_from_the_records(reference):
    import hashlib

    st = logitstore.open_store(reference)
    assert st.meta.format_version == schema.FORMAT_VERSION and len(st) == 1000 - 11
    rec = zarr.open_array(str(reference / schema.CHUNK_SHA256), mode="r")[:]
    names = [schema.LOGITS, schema.IDS, schema.DIGESTS, schema.IMAGE_HW, schema.VIEW_PARAMS]
    assert rec.shape == (st.n_chunks, len(names), 32)
    rows = st.read(64 * 3, 64 * 4)
    assert rec[3, 0].tobytes() == hashlib.sha256(rows.logits.astype("<f2").tobytes()).digest()
    assert rec[3, 1].tobytes() == hashlib.sha256(b"".join(i.encode() + b"\0" for i in rows.ids)).digest()
    assert st.meta.fingerprints["contents"] == "sha256:" + hashlib.sha256(rec.tobytes()).hexdigest()
    everything = st[:]
    corpus = b"".join(i.encode() + b"\0" + d.tobytes() for i, d in zip(everything.ids, everything.digests))
    assert st.meta.fingerprints["corpus"] == "sha256:" + hashlib.sha256(corpus).hexdigest()  # as in 1.0-1.3


def first_view_numbers(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = logits[:, 0].astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return p.max(1), -(p * np.log(p)).sum(1), p.argmax(1)


def test_stored_statistics_equal_a_direct_numpy_computation(reference):
    st = logitstore.open_store(reference)
    d = info(st)
    conf, ent, top = first_view_numbers(st[:].logits)
    c = st.meta.num_classes
    assert d["confidence_histogram"]["counts"] == np.histogram(conf, np.linspace(0, 1, 21))[0].tolist()
    assert d["entropy_histogram"]["counts"] == np.histogram(ent, np.linspace(0, np.log(c), 21))[0].tolist()
    assert d["confidence_histogram"]["edges"] == pytest.approx(np.linspace(0, 1, 21).tolist())
    assert d["class_histogram"] == {f"c{k}": int((top == k).sum()) for k in range(c)}
    assert d["confidence"]["mean"] == pytest.approx(conf.mean(), abs=1e-6)
    assert d["entropy_nats"]["mean"] == pytest.approx(ent.mean(), abs=1e-6)
    for q, key in ((10, "p10"), (50, "median"), (90, "p90")):  # a 1000-bin histogram: within 1/1000
        assert d["confidence"][key] == pytest.approx(np.percentile(conf, q), abs=2e-3)
    assert d["failures_by_reason"] == {"decode": 6, "missing": 5} and d["failed"] == 11
    assert d["teacher_agreement"] == []


def test_info_answers_from_the_statistics_without_reading_rows(tmp_path, reference):
    """With every row chunk of the logits gone, info still answers (and gives the same numbers)."""
    import shutil

    copy = tmp_path / "c.zarr"
    shutil.copytree(reference, copy)
    before = info(logitstore.open_store(copy))
    for f in (copy / schema.LOGITS / "c").rglob("*"):
        if f.is_file():
            f.write_bytes(b"broken")
    after = info(logitstore.open_store(copy))
    for key in ("confidence", "entropy_nats", "class_histogram", "confidence_histogram", "entropy_histogram",
                "failures_by_reason", "top_classes"):
        assert after[key] == before[key], key


def test_a_flipped_byte_is_named_by_chunk_and_rows_and_found_by_a_sample_that_includes_it(tmp_path, reference):
    import shutil

    bad = tmp_path / "bad.zarr"
    shutil.copytree(reference, bad)
    flip_byte(bad / schema.LOGITS / "c" / "5" / "0" / "0", 40, 0x10)
    rep = verify(logitstore.open_store(bad))
    assert not rep.ok and rep.chunks_checked == rep.chunks == 16
    first = str(logitstore.open_store(reference).read_array(schema.IDS, 320, 321)[0])
    assert any("chunk(s) 5" in p and "rows 320-383" in p and f"first ids '{first}'" in p for p in rep.problems), \
        rep.problems
    r = invoke("logitstore", "verify", str(bad))
    assert r.returncode == 1 and "chunk 5" in r.stderr
    with_it = next(s for s in range(100) if 5 in sample_chunks(16, 0.1, s))
    without = next(s for s in range(100) if 5 not in sample_chunks(16, 0.1, s))
    r = invoke("logitstore", "verify", str(bad), "--sample", "0.1", "--seed", str(with_it), "--json")
    d = json.loads(r.stdout)
    assert r.returncode == 1 and d["chunks_checked"] == 2 and any("chunk 5" in p for p in d["problems"])
    r = invoke("logitstore", "verify", str(bad), "--sample", "0.1", "--seed", str(without))
    assert r.returncode == 0 and "2 chunks checked (sample 0.1" in r.stdout


def test_a_chunk_rewritten_with_a_valid_checksum_still_differs_from_its_record(tmp_path, reference):
    import shutil

    bad = tmp_path / "bad.zarr"
    shutil.copytree(reference, bad)
    arr = zarr.open_array(str(bad / schema.IMAGE_HW), mode="r+")
    arr[130] = [9, 9]  # a plausible size, a fresh CRC32C: only the record tells
    rep = verify(logitstore.open_store(bad))
    assert any(f"array '{schema.IMAGE_HW}' chunk 2 (rows 128-191) differs from its record" in p
               for p in rep.problems), rep.problems


def test_copies_merges_and_selections_keep_valid_records(tmp_path, reference):
    c, z = tmp_path / "c.zarr", tmp_path / "p.zarr.zip"
    from logitstore.tools.transfer import copy_store

    copy_store(str(reference), str(c))
    copy_store(str(reference), str(z))  # pack: a .zip destination
    for s in (c, z):
        rep = verify(logitstore.open_store(s))
        assert rep.ok and rep.chunks_checked == 16, rep.problems
    from logitstore.tools.combine import merge, select

    merge([str(reference), str(c)], str(tmp_path / "m.zarr"), prefixes=["a", "b"])
    select(str(reference), str(tmp_path / "s.zarr"), min_confidence=0.5)
    for s in ("m.zarr", "s.zarr"):
        st = logitstore.open_store(tmp_path / s)
        assert verify(st).ok
        conf, _, top = first_view_numbers(st[:].logits)
        d = info(st)
        assert d["confidence_histogram"]["counts"] == np.histogram(conf, np.linspace(0, 1, 21))[0].tolist()
        assert list(d["class_histogram"].values()) == np.bincount(top, minlength=10).tolist()


@pytest.mark.parametrize("keep_bits", [None, 5])
def test_an_added_teacher_gets_records_and_its_agreement(tmp_path, corpus, teacher_ckpt, keep_bits):
    # --keep-bits rounds on the way into the store: records, statistics and fingerprints are of the
    # stored values, so a lossy store and its added teacher verify too.
    from conftest import save_teacher

    store = tmp_path / "e.zarr"
    logitstore.dump(str(teacher_ckpt), str(corpus), str(store), num_workers=0, chunk_rows=32, keep_bits=keep_bits)
    other = save_teacher(tmp_path / "t2.pt", seed=3)
    r = invoke("logitstore", "dump", "--teacher", str(other), "--out", str(store), "--add-teacher",
               "--teacher-name", "second", "--num-workers", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    st = logitstore.open_store(store)
    a = st.teacher_logits("primary", 0, len(st))[:, 0].astype(np.float32).argmax(1)
    b = st.teacher_logits("second", 0, len(st))[:, 0].astype(np.float32).argmax(1)
    d = info(st)
    assert d["teacher_agreement"] == [{"name": "second", "agreement": pytest.approx(float((a == b).mean()))}]
    assert d["class_histogram"] == {c: int((a == k).sum()) for k, c in enumerate(st.classes)}
    rep = verify(st)
    assert rep.ok, rep.problems
    zarr.open_array(str(store / "teachers" / "second" / "logits"), mode="r+")[40] = 0
    rep = verify(logitstore.open_store(store))
    assert any("teacher 'second' chunk 1 (rows 32-63) differs from its record" in p for p in rep.problems)


def test_a_1_3_golden_store_still_opens_infos_and_verifies():
    golden = TESTS / "golden" / "v1.3.zarr"
    st = logitstore.open_store(golden)
    d = info(st)
    assert d["format_version"] == "1.3" and sum(d["confidence_histogram"]["counts"]) == len(st)
    assert sum(d["class_histogram"].values()) == len(st) and d["teacher_agreement"] == []
    assert verify(st).ok and verify(st, sample=0.5).chunks_checked >= 1
    r = invoke("logitstore", "verify", str(golden), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True


def test_failures_are_counted_by_kind_of_reason():
    """statistics.failures_by_reason stays small on a dirty corpus: what a reason names (a key, a path, a
    number) is not its kind, and kinds past the 50 commonest are counted together."""
    from logitstore.records import failures_by_reason

    failures = [(f"s/{i:09d}", f"CorpusError: sample {i:09d} has no image member (.jpg, .png)") for i in range(300)]
    failures += [(f"d/{i}.png", f"FileNotFoundError: [Errno 2] No such file or directory: '/data/d/{i}.png'")
                 for i in range(200)]
    failures += [(f"k{i}", f"Kind{i}Error: odd") for i in range(60)]
    got = failures_by_reason(failures)
    assert got["CorpusError: sample … has no image member (.jpg, .png)"] == 300
    assert got["FileNotFoundError: [Errno …] No such file or directory: …"] == 200
    assert len(got) == 51 and got["other reasons"] == 12 and sum(got.values()) == 560

