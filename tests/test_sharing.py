"""Sharing caches: zip and S3 (a real S3-protocol server on 127.0.0.1), copy, merge, select, fingerprints."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import logitstore
from logitstore.tools.combine import MismatchError, merge, select
from logitstore.errors import IntegrityError, StoreStateError
from logitstore.tools.transfer import copy_store

from conftest import assert_one_line_error, ctrl_c_at_call, flip_byte, invoke, run_cli, save_teacher


@pytest.fixture(scope="module")
def store(tmp_path_factory, corpus, teacher_ckpt) -> Path:
    out = tmp_path_factory.mktemp("share") / "s.zarr"
    logitstore.dump(str(teacher_ckpt), str(corpus), str(out), num_workers=0, chunk_rows=32, views=2, seed=3)
    return out


def all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_round_trip_local_zip_s3_local_keeps_every_byte(tmp_path, store, s3):
    z = tmp_path / "s.zarr.zip"
    run_cli("logitstore", "pack", str(store), str(z))
    assert logitstore.open_store(z).meta.fingerprints == logitstore.open_store(store).meta.fingerprints
    url = "s3://caches/team-a/s.zarr"
    r = run_cli("logitstore", "copy", str(z), url, "--storage-option", f"endpoint_url={s3}")
    assert "every chunk checksum verified" in r.stdout
    back = tmp_path / "back.zarr"
    run_cli("logitstore", "copy", url, str(back))
    assert all_bytes(back) == all_bytes(store)
    info = json.loads(run_cli("logitstore", "info", url, "--json").stdout)
    assert info["fingerprints"] == logitstore.open_store(store).meta.fingerprints and info["images"] == 120
    assert "OK" in run_cli("logitstore", "verify", url).stdout
    assert np.array_equal(logitstore.open_store(url)[:].logits, logitstore.open_store(store)[:].logits)


def test_dump_writes_straight_to_object_storage(tmp_path, corpus, teacher_ckpt, s3):
    url = "s3://caches/direct/s.zarr"
    logitstore.dump(str(teacher_ckpt), str(corpus), url, num_workers=0, chunk_rows=64)
    local = tmp_path / "local.zarr"
    logitstore.dump(str(teacher_ckpt), str(corpus), str(local), num_workers=0, chunk_rows=64)
    a, b = logitstore.open_store(url), logitstore.open_store(local)
    assert a.meta.fingerprints == b.meta.fingerprints and len(a) == 120


def test_object_storage_outputs_never_overlap_inputs_and_its_failures_are_one_line(tmp_path, store, s3, monkeypatch):
    """W1 on object storage as on disk: an output at or inside a prefix the command reads is refused (a copy into
    its own source nested its objects, and every later copy carried them); a missing bucket is one line."""
    url = "s3://caches/overlap/s.zarr"
    assert invoke("logitstore", "copy", str(store), url).returncode == 0
    for cmd in (["copy", url, url + "/inner.zarr"], ["copy", url, url + "/"],
                ["select", url, "-o", url + "/sel.zarr", "--limit", "5"]):
        assert_one_line_error(invoke("logitstore", *cmd), "overlaps", "which this command reads")
    assert invoke("logitstore", "copy", url, url + "2").returncode == 0  # a name that only starts alike
    assert_one_line_error(invoke("logitstore", "copy", str(store), "s3://caches/p.zarr.zip"), "a local .zip file")
    r = invoke("logitstore", "info", "s3://caches/overlap/s.zarr", "--storage-option", "endpoint_url=http://127.0.0.1:9",
               "--storage-option", 'config_kwargs={"retries": {"max_attempts": 1}}')  # nothing listens on port 9
    assert_one_line_error(r, "storage failed (EndpointConnectionError", "endpoint_url", code=1)
    monkeypatch.setenv("LOGITSTORE_TRACEBACK", "1")  # the way to the traceback the line names
    with pytest.raises(Exception, match="Could not connect to the endpoint URL"):
        invoke("logitstore", "info", "s3://caches/overlap/s.zarr", "--storage-option", "endpoint_url=http://127.0.0.1:9",
               "--storage-option", 'config_kwargs={"retries": {"max_attempts": 1}}')


def test_interrupted_copy_resumes_and_never_looks_complete(tmp_path, store):
    dst = tmp_path / "dst.zarr"
    stop_after_five = ctrl_c_at_call(5)
    with pytest.raises(KeyboardInterrupt):
        copy_store(str(store), str(dst), on_key=stop_after_five, jobs=1)  # many jobs: test_copy_concurrent.py
    with pytest.raises(StoreStateError, match="incomplete"):
        logitstore.open_store(dst)
    with pytest.raises(StoreStateError, match="already holds another store"):
        copy_store_other(tmp_path, dst)
    rep = copy_store(str(store), str(dst))
    assert rep.skipped == 5 and rep.copied == rep.keys - 5  # on_key runs after each key is written
    assert all_bytes(dst) == all_bytes(store)
    again = copy_store(str(store), str(dst))
    assert again.copied == 0 and again.skipped == again.keys


def copy_store_other(tmp_path: Path, dst: Path) -> None:
    """A different complete store may not be copied over a half-copied one without --overwrite."""
    other = tmp_path / "other.zarr"
    ckpt = save_teacher(tmp_path / "o.pt", seed=5)
    imgs = tmp_path / "few"
    imgs.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(imgs / "z.png")
    logitstore.dump(str(ckpt), str(imgs), str(other), num_workers=0)
    copy_store(str(other), str(dst))


def test_a_corrupted_chunk_is_caught_by_copy_verify_and_readers(tmp_path, store):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    chunk = bad / "logits" / "c" / "2" / "0" / "0"
    flip_byte(chunk, 5, 0xFF)
    with pytest.raises(IntegrityError, match="logits/c/2/0/0"):
        copy_store(str(bad), str(tmp_path / "copy.zarr"))
    with pytest.raises(IntegrityError, match="logits/c/2/0/0"):
        copy_store(str(bad), str(tmp_path / "packed.zip"))
    assert not (tmp_path / "packed.zip").exists() and not (tmp_path / "packed.zip.partial").exists()
    r = run_cli("logitstore", "verify", str(bad), check=False)
    assert r.returncode == 1 and "'logits' chunk(s) 2 (rows " in r.stderr and "'logits/c/2/0/0'" in r.stderr
    with pytest.raises(IntegrityError, match="chunk"):
        logitstore.open_store(bad)[:]


def test_merge_prefixes_ids_and_dedupes_by_digest(tmp_path, store, corpus, teacher_ckpt):
    twin = tmp_path / "twin.zarr"
    shutil.copytree(store, twin)
    out = tmp_path / "m.zarr"
    r = run_cli("logitstore", "merge", str(store), str(twin), "-o", str(out), "--prefix", "a,b")
    assert "240 rows" in r.stdout
    m = logitstore.open_store(out)
    ids = list(m[:].ids)
    assert ids[:2] == ["a/part0/img00000.png", "a/part0/img00003.png"] and ids[120].startswith("b/")
    assert np.array_equal(m[:120].logits, logitstore.open_store(store)[:].logits)
    d = merge([str(store), str(twin)], str(tmp_path / "d.zarr"), prefixes=["a", "b"], dedupe=True)
    assert d.rows == 120 and d.dropped_duplicates == 120


def test_merge_refuses_other_teachers_classes_and_preprocessing(tmp_path, store, corpus):
    other = save_teacher(tmp_path / "other.pt", seed=1)
    o = tmp_path / "o.zarr"
    logitstore.dump(str(other), str(corpus), str(o), num_workers=0, chunk_rows=32, views=2, seed=3)
    with pytest.raises(MismatchError, match="the teacher differs"):
        merge([str(store), str(o)], str(tmp_path / "x.zarr"), prefixes=["a", "b"])
    ckpt = Path(logitstore.open_store(store).meta.teacher.file)
    rev = tmp_path / "rev.zarr"
    logitstore.dump(str(ckpt), str(corpus), str(rev), num_workers=0, chunk_rows=32, views=2, seed=3,
                    classes=[str(i) for i in range(9, -1, -1)])
    r = run_cli("logitstore", "merge", str(store), str(rev), "-o", str(tmp_path / "y.zarr"), "--prefix", "a,b",
                check=False)
    assert r.returncode == 2 and "the class order differs" in r.stderr
    big = tmp_path / "big.zarr"
    logitstore.dump(str(ckpt), str(corpus), str(big), num_workers=0, chunk_rows=32, views=2, seed=3, size=(32, 32))
    with pytest.raises(MismatchError, match="preprocessing differs"):
        merge([str(store), str(big)], str(tmp_path / "z.zarr"), prefixes=["a", "b"])


def test_select_gives_the_counts_asked_for(tmp_path, store):
    src = logitstore.open_store(store)
    logits = src[:].logits.astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).mean(1)
    conf, arg = p.max(1), p.argmax(1)
    rep = select(str(store), str(tmp_path / "k.zarr"), per_class=3)
    expected = {str(c): min(3, int((arg == c).sum())) for c in range(10)}
    assert rep.per_class == expected and rep.rows_out == sum(expected.values())
    k = logitstore.open_store(tmp_path / "k.zarr")
    assert len(k) == rep.rows_out and k.meta.corpus.root == src.meta.corpus.root
    thr = float(np.median(conf))
    r = select(str(store), str(tmp_path / "c.zarr"), min_confidence=thr, limit=10)
    assert r.rows_out == min(10, int((conf >= thr).sum()))
    chosen = set(logitstore.open_store(tmp_path / "c.zarr")[:].ids)
    top = set(np.asarray(src[:].ids)[np.argsort(-conf, kind="stable")[:10]])
    assert chosen == top


def test_info_json_fingerprints_tell_caches_apart(tmp_path, store, corpus, teacher_ckpt):
    a = json.loads(run_cli("logitstore", "info", str(store), "--json").stdout)["fingerprints"]
    other = tmp_path / "o.zarr"
    logitstore.dump(str(teacher_ckpt), str(corpus), str(other), num_workers=0, chunk_rows=32, views=2, seed=4)
    b = json.loads(run_cli("logitstore", "info", str(other), "--json").stdout)["fingerprints"]
    assert a["teacher"] == b["teacher"] and a["corpus"] == b["corpus"] and a["contents"] != b["contents"]
    assert all(v.startswith("sha256:") and len(v) == 71 for v in a.values())


def test_embedded_images_are_the_teachers_inputs(tmp_path, corpus, teacher_ckpt):
    from logitstore.corpus import read_and_decode
    from logitstore.schema import Preprocess
    from logitstore.views import apply_view

    out = tmp_path / "e.zarr"
    run_cli("logitstore", "dump", "--teacher", str(teacher_ckpt), "--images", str(corpus), "--out", str(out),
            "--views", "2", "--embed-images", "--quiet", "--num-workers", "0")
    st = logitstore.open_store(out)
    rows = st[:8]
    assert st.meta.embedded_pixels and rows.pixels.shape == (8, 2, 1, 28, 28) and rows.pixels.dtype == np.uint8
    pre = Preprocess.from_dict(st.meta.preprocess.to_dict())
    _, img = read_and_decode(corpus / rows.ids[3], "L")
    for v in range(2):
        expect = apply_view(img, rows.view_params[3, v], pre, "random_resized_crop").numpy()
        assert np.array_equal(rows.pixels[3, v], expect)
    assert "OK" in run_cli("logitstore", "verify", str(out)).stdout


def test_a_second_teacher_joins_by_digest_and_replays_the_views(tmp_path, store, corpus):
    from conftest import load_module
    from logitstore.corpus import read_and_decode
    from logitstore.schema import Preprocess
    from logitstore.views import apply_view, normalize

    st_path = tmp_path / "two.zarr"
    shutil.copytree(store, st_path)
    moved = tmp_path / "moved"
    for i, p in enumerate(sorted(corpus.rglob("*.png"))):  # same bytes, another layout
        (moved / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, moved / f"d{i % 4}" / f"x{i}.png")
    second = save_teacher(tmp_path / "second.pt", seed=9)
    r = run_cli("logitstore", "dump", "--teacher", str(second), "--out", str(st_path), "--add-teacher",
                "--teacher-name", "second", "--images", str(moved), "--num-workers", "0", "--quiet")
    assert "120 images found by digest" in r.stdout
    st = logitstore.open_store(st_path)
    assert st.teacher_names == ["primary", "second"]
    assert np.array_equal(st.teacher_logits("primary", 0, 120), logitstore.open_store(store)[:].logits)
    lg = st.teacher_logits("second", 0, 120).astype(np.float32)
    rows = st[:]
    model, pre = load_module(ckpt=second), Preprocess.from_dict(st.meta.preprocess.to_dict())
    for i in (0, 57, 119):
        _, img = read_and_decode(corpus / rows.ids[i], "L")
        x = torch.stack([apply_view(img, p, pre, "random_resized_crop") for p in rows.view_params[i]])
        np.testing.assert_allclose(lg[i], model(normalize(x, pre)).detach().numpy(), atol=2e-3)
    assert "OK" in run_cli("logitstore", "verify", str(st_path)).stdout
    again = run_cli("logitstore", "dump", "--teacher", str(second), "--out", str(st_path), "--add-teacher",
                    "--teacher-name", "second", check=False)
    assert again.returncode == 2 and "already has a teacher 'second'" in again.stderr


def test_a_teacher_with_other_classes_cannot_join(tmp_path, store):
    st_path = tmp_path / "x.zarr"
    shutil.copytree(store, st_path)
    ckpt = save_teacher(tmp_path / "five.pt", num_classes=5)
    r = run_cli("logitstore", "dump", "--teacher", str(ckpt), "--out", str(st_path), "--add-teacher",
                "--classes", "a,b,c,d,e", check=False)
    assert r.returncode == 2 and "an ensemble needs the same class list" in r.stderr
