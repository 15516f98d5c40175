"""Corpora where they live: WebDataset shards, object-store prefixes, URL listings and Parquet tables
dump the same logits as the same images in a folder, and their stores find each row's bytes again."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import logitstore
from logitstore.sources import open_reader, open_source
from logitstore.store import open_store

from conftest import assert_one_line_error, ctrl_c_at_call, invoke, run_cli

N = 90
SHARD_SIZES = (40, 40, 10)


def _png(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


@pytest.fixture(scope="module")
def images(mnist) -> list[bytes]:
    return [_png(a) for a in mnist["train_images"][:N]]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, images) -> dict[str, Path]:
    """The same images as a folder, as img2dataset's shards, and as Hugging Face-style Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    root = tmp_path_factory.mktemp("layouts")
    folder = root / "folder"
    folder.mkdir()
    for i, data in enumerate(images):
        (folder / f"{i:09d}.png").write_bytes(data)
    shards = root / "shards"
    shards.mkdir()
    i = 0
    for s, n in enumerate(SHARD_SIZES):
        with wds.TarWriter(str(shards / f"{s:05d}.tar")) as w:  # img2dataset's layout: KEY.jpg, KEY.json, KEY.txt
            for _ in range(n):
                w.write({"__key__": f"{i:09d}", "png": images[i], "txt": f"caption {i}",
                         "json": json.dumps({"key": f"{i:09d}", "status": "success"}).encode()})
                i += 1
    tables = root / "tables"
    tables.mkdir()
    for part, (a, b) in enumerate(((0, 50), (50, N))):
        t = pa.table({"image": [{"bytes": images[k], "path": f"{k}.png"} for k in range(a, b)],
                      "label": list(range(a, b)), "name": [f"img{k}" for k in range(a, b)]})
        pq.write_table(t, tables / f"train-{part:05d}.parquet", row_group_size=16)
    return {"folder": folder, "shards": shards, "tables": tables, "root": root}


@pytest.fixture(scope="module")
def reference(layouts, teacher_ckpt) -> np.ndarray:
    s = logitstore.dump(str(teacher_ckpt), str(layouts["folder"]), str(layouts["root"] / "folder.zarr"),
                        num_workers=0, batch_size=32)
    assert s.n_images == N and s.n_failed == 0
    return open_store(str(layouts["root"] / "folder.zarr")).read(0, N).logits


def _dump(teacher: Path, images: str, out: Path, **kw) -> tuple[np.ndarray, object]:
    s = logitstore.dump(str(teacher), images, str(out), num_workers=kw.pop("num_workers", 0), batch_size=32, **kw)
    assert (s.n_images, s.n_failed) == (N, 0), s.failures[:3]
    store = open_store(str(out))
    return store.read(0, N).logits, store


def test_shards_by_pattern_and_folder_dump_the_folder_logits(layouts, teacher_ckpt, reference, tmp_path):
    pattern = str(layouts["shards"]) + "/{00000..00002}.tar"
    logits, store = _dump(teacher_ckpt, pattern, tmp_path / "a.zarr", num_workers=2)
    np.testing.assert_array_equal(logits, reference)
    ids = store.read(0, N).ids
    assert ids[0] == "00000.tar/000000000" and ids[45] == "00001.tar/000000045"
    assert store.meta.corpus.source == {"kind": "webdataset"} and store.meta.format_version == "1.4"
    same, _ = _dump(teacher_ckpt, str(layouts["shards"]), tmp_path / "b.zarr")
    np.testing.assert_array_equal(same, reference)
    # The store finds a row's bytes again from its id, and they match the stored digest.
    reader = open_reader(store.meta.corpus.root, store.meta.corpus.source)
    import hashlib
    rows = store.read(0, N)
    for k in (0, 39, 40, 89):
        assert hashlib.sha256(reader.read(rows.ids[k])).digest() == bytes(rows.digests[k])


def test_parquet_with_an_image_struct_dumps_the_folder_logits(layouts, teacher_ckpt, reference, tmp_path):
    logits, store = _dump(teacher_ckpt, str(layouts["tables"]), tmp_path / "p.zarr", image_column="image")
    np.testing.assert_array_equal(logits, reference)
    rows = store.read(0, N)
    assert rows.ids[0] == "train-00000.parquet/0" and rows.ids[50] == "train-00001.parquet/0"
    assert store.meta.corpus.source == {"kind": "parquet", "image_column": "image", "id_column": None}
    by_name, named = _dump(teacher_ckpt, str(layouts["tables"]) + "/train-{00000..00001}.parquet",
                           tmp_path / "q.zarr", image_column="image", id_column="name")
    np.testing.assert_array_equal(by_name, reference)
    reader = open_reader(named.meta.corpus.root, named.meta.corpus.source)
    assert reader.read("train-00001.parquet/img77") == open_reader(
        store.meta.corpus.root, store.meta.corpus.source).read("train-00001.parquet/27")


def test_s3_shards_prefix_and_url_listing_dump_the_folder_logits(s3, layouts, images, teacher_ckpt, reference,
                                                                  tmp_path):
    import boto3

    client = boto3.client("s3")
    for tar in sorted(layouts["shards"].glob("*.tar")):
        client.upload_file(str(tar), "caches", f"wds/{tar.name}")
    for i, data in enumerate(images):
        client.put_object(Bucket="caches", Key=f"loose/{i // 30}/{i:09d}.png", Body=data)
    shards, _ = _dump(teacher_ckpt, "s3://caches/wds/{00000..00002}.tar", tmp_path / "s.zarr")
    np.testing.assert_array_equal(shards, reference)
    prefix, store = _dump(teacher_ckpt, "s3://caches/loose/", tmp_path / "l.zarr")
    np.testing.assert_array_equal(prefix, reference)
    assert store.meta.corpus.root == "s3://caches/loose" and store.read(0, 1).ids[0] == "0/000000000.png"
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"s3://caches/loose/{i // 30}/{i:09d}.png\n" for i in range(N)))
    urls, _ = _dump(teacher_ckpt, str(listing), tmp_path / "u.zarr")
    np.testing.assert_array_equal(urls, reference)
    # Shards on the object store are read back through the local cache, concurrently.
    reader = open_reader("s3://caches/wds", {"kind": "webdataset"}, cache_bytes=1 << 20)
    got = reader.read_many(["00000.tar/000000003", "00002.tar/000000085", "00001.tar/000000041"])
    assert got == [images[3], images[85], images[41]]
    reader.close()


def test_local_corpora_keep_their_ids_and_listing(layouts, corpus):
    from logitstore.corpus import list_corpus

    src = open_source(corpus)
    old = list_corpus(corpus)
    assert src.ids == old.ids and src.listing_sha256() == old.listing_sha256() and src.record() is None


def test_a_bad_source_is_one_line(layouts, teacher_ckpt, tmp_path):
    proc = invoke("logitstore", "dump", "--teacher", "x.pt", "--images", str(layouts["tables"]) + "/train-00000.parquet",
                  "--out", str(tmp_path / "x.zarr"))
    assert_one_line_error(proc, "--image-column")
    # Tables are listed while the teacher loads and starts: a real teacher, so the listing's error is the one
    proc = invoke("logitstore", "dump", "--teacher", str(teacher_ckpt), "--images", str(layouts["tables"]),
                  "--image-column", "pixels", "--out", str(tmp_path / "x.zarr"))
    assert_one_line_error(proc, "no column 'pixels'")
    assert not (tmp_path / "x.zarr").exists()  # nothing written before the listing ends
    proc = invoke("logitstore", "dump", "--teacher", "x.pt", "--images", str(layouts["folder"]),
                  "--max-failure-share", "1.5", "--out", str(tmp_path / "x.zarr"))
    assert proc.returncode == 2 and "--max-failure-share" in proc.stderr


def test_an_id_column_must_name_every_row_once(layouts, images, teacher_ckpt, tmp_path):
    """Store ids are unique: --id-column values repeated (a label column), null or empty are refused in one line
    naming the value or row, before any store is written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cells = [{"bytes": images[k], "path": f"{k}.png"} for k in range(4)]
    pq.write_table(pa.table({"image": cells, "name": ["a", "b", None, "d"], "empty": ["a", "", "c", "d"],
                             "label": [3, 1, 3, 0]}), tmp_path / "odd.parquet")
    cases = ((str(tmp_path / "odd.parquet"), "label", "the value '3' of --id-column 'label' names more than one row"),
             (str(tmp_path / "odd.parquet"), "name", "row 2 has no value in --id-column 'name'"),
             (str(tmp_path / "odd.parquet"), "empty", "row 1 has an empty value in --id-column 'empty'"))
    for i, (source, column, words) in enumerate(cases):
        out = tmp_path / f"x{i}.zarr"
        proc = invoke("logitstore", "dump", "--teacher", str(teacher_ckpt), "--images", source, "--image-column",
                      "image", "--id-column", column, "--out", str(out), "--num-workers", "0", "--quiet")
        assert_one_line_error(proc, words, "drop --id-column")
        assert not out.exists()


def test_a_truncated_shard_reads_up_to_the_damage_then_says_so(layouts, images, tmp_path):
    """Readers of a stored corpus (show, card, verify --images, fit): the samples before a shard's damage read
    as before, a sample past it is an OSError naming the shard and the tar error, not tarfile's traceback."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(layouts["shards"], shards)
    with open(shards / "00001.tar", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    reader = open_reader(str(shards), {"kind": "webdataset"})
    assert reader.read("00001.tar/000000040") == images[40]
    with pytest.raises(OSError, match=r"00001\.tar cannot be read through to 000000079 \(ReadError: .*\): the shard "
                                      r"is truncated or damaged; restore it"):
        reader.read("00001.tar/000000079")
    with pytest.raises(FileNotFoundError, match="holds no 000000079"):  # an intact shard without that key
        reader.read("00002.tar/000000079")


def test_ctrl_c_on_a_fresh_shard_dump_says_what_was_saved(layouts, teacher_ckpt, tmp_path, monkeypatch):
    """The message of an interrupted dump whose store was created once its shards were listed counts the rows the
    store keeps (it said 0: the store's progress was read from the object it had when the store was created)."""
    import re

    import logitstore.teacher.local as local
    from logitstore.errors import DumpInterrupted

    monkeypatch.setattr(local, "WAITING_ROWS_BYTES", 0)  # the store is made at the first batch, not by a race
    out = tmp_path / "i.zarr"
    on_batch = ctrl_c_at_call(6)
    with pytest.raises(DumpInterrupted) as exc:
        logitstore.dump(str(teacher_ckpt), str(layouts["shards"]), str(out), num_workers=0, batch_size=8,
                        chunk_rows=8, on_batch=on_batch)
    kept = len(open_store(str(out), allow_incomplete=True))
    assert kept >= 8 and re.search(rf"\b{kept} images? (are|is) saved", str(exc.value)), (kept, str(exc.value))


def _broken_shard(path: Path, images: list[bytes], good: int, bad: int) -> None:
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for i in range(good + bad):
            data = images[i % len(images)] if i % (good + bad) < good else b"not an image at all"
            w.write({"__key__": f"{i:09d}", "png": data})


def test_a_mostly_failing_dump_stops_with_its_first_reasons(tmp_path, images, teacher_ckpt):
    shard = tmp_path / "dirty.tar"
    _broken_shard(shard, images, good=300, bad=900)
    proc = invoke("logitstore", "dump", "--teacher", str(teacher_ckpt), "--images", str(shard),
                  "--out", str(tmp_path / "d.zarr"), "--num-workers", "0", "--quiet")
    err = assert_one_line_error(proc, "of the first", "--max-failure-share 0.5", "000000300: UnidentifiedImageError")
    assert "incomplete" in err
    from logitstore.store import open_store as open_any
    partial = open_any(str(tmp_path / "d.zarr"), allow_incomplete=True)
    assert not partial.meta.complete
    # Failures go to the growing arrays, not the progress attribute (none is final before a chunk is).
    progress = dict(partial.group.attrs["logitstore_progress"])
    assert {k: progress[k] for k in ("rows", "next_source", "n_failures")} == {"rows": 0, "next_source": 0,
                                                                            "n_failures": 0}
    assert "failures" not in progress and progress["statistics"]["rows"] == 0
    # A tolerant share lets the same corpus through, recording every failure in the arrays.
    s = logitstore.dump(str(teacher_ckpt), str(shard), str(tmp_path / "ok.zarr"), num_workers=0,
                        max_failure_share=0.8)
    store = open_store(str(tmp_path / "ok.zarr"))
    assert (s.n_images, s.n_failed) == (300, 900) and len(store.failures()) == 900
    assert store.failures()[0][0] == "dirty.tar/000000300" and store.failures()[899][0] == "dirty.tar/000001199"
    assert store.group["failed_ids"].chunks == (4096,)


def test_a_dump_whose_images_all_fail_writes_no_complete_store(tmp_path, teacher_ckpt):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(5):
        (folder / f"b{i}.png").write_bytes(b"junk")
    proc = invoke("logitstore", "dump", "--teacher", str(teacher_ckpt), "--images", str(folder),
                  "--out", str(tmp_path / "e.zarr"), "--num-workers", "0", "--quiet")
    assert_one_line_error(proc, "all 5 images failed", "b0.png")
    from logitstore.store import open_store as open_any
    assert not open_any(str(tmp_path / "e.zarr"), allow_incomplete=True).meta.complete


def _weights(res) -> dict:
    import torch

    ckpt = torch.load(res.checkpoint, weights_only=False)
    # The student's weights and its optimizer state (the RNG state also counts DataLoader workers' seeds).
    return {k: v for k, v in ckpt.items() if k != "rng" and isinstance(v, dict)
            and any(hasattr(t, "dtype") for t in v.values())}


def test_students_from_shard_and_table_stores_equal_the_folder_student(s3, layouts, teacher_ckpt, reference,
                                                                      tmp_path):
    import boto3
    import torch

    import trainer

    root = layouts["root"]
    client = boto3.client("s3")
    for tar in sorted(layouts["shards"].glob("*.tar")):
        client.upload_file(str(tar), "caches", f"fit/{tar.name}")
    stores = {"folder": str(root / "folder.zarr")}
    for name, images, kw in (("shards", str(layouts["shards"]), {}),
                             ("tables", str(layouts["tables"]), {"image_column": "image"}),
                             ("s3", "s3://caches/fit/", {})):
        stores[name] = str(tmp_path / f"{name}.zarr")
        logitstore.dump(str(teacher_ckpt), images, stores[name], num_workers=0, batch_size=32, **kw)
    # No decode cache: every epoch reads each image again from its shard, table or object.
    fast = dict(student="lenet", batch_size=16, warmup_epochs=0.2, epochs=1, seed=3, cache_images=0, holdout=0.1)
    runs = {name: trainer.fit([s], tmp_path / f"run-{name}", num_workers=2 if name == "s3" else 0, **fast)
            for name, s in stores.items()}
    want = _weights(runs["folder"])
    assert want
    for name in ("shards", "tables", "s3"):
        got = _weights(runs[name])
        for part in want:
            for k, v in want[part].items():
                if hasattr(v, "dtype"):
                    assert torch.equal(v, got[part][k]), (name, part, k)
        assert runs[name].final["train_loss"] == runs["folder"].final["train_loss"]


def test_show_and_verify_read_pixels_from_shards_and_object_storage(s3, layouts, teacher_ckpt, tmp_path):
    import boto3

    client = boto3.client("s3")
    for tar in sorted(layouts["shards"].glob("*.tar")):
        client.upload_file(str(tar), "caches", f"show/{tar.name}")
    store = tmp_path / "s.zarr"
    logitstore.dump(str(teacher_ckpt), str(layouts["shards"]), str(store), num_workers=0)
    ok = run_cli("logitstore", "verify", str(store), "--images", "s3://caches/show")
    assert f"{N:,} of {N:,} images read matched their digests" in ok.stdout
    ok = run_cli("logitstore", "verify", str(store), "--images", str(layouts["shards"]) + "/{00000..00002}.tar")
    assert f"{N:,} of {N:,} images read matched their digests" in ok.stdout
    # Moved elsewhere with one shard replaced: verify names the rows whose bytes differ.
    client.upload_file(str(layouts["shards"] / "00002.tar"), "caches", "moved/00000.tar")
    for name in ("00001.tar", "00002.tar"):
        client.upload_file(str(layouts["shards"] / name), "caches", f"moved/{name}")
    bad = run_cli("logitstore", "verify", str(store), "--images", "s3://caches/moved", check=False)
    assert bad.returncode == 1 and "s3://caches/moved/00000.tar/000000000: cannot be read" in bad.stderr
    out = tmp_path / "sheet.png"
    run_cli("logitstore", "show", str(store), "--images", "s3://caches/show", "--out", str(out), "--per-class", "2")
    assert out.stat().st_size > 1000
    # A store and a corpus that need storage options (no AWS_ENDPOINT_URL): show takes --storage-option.
    run_cli("logitstore", "copy", str(store), "s3://caches/show-store.zarr")
    out2 = tmp_path / "sheet2.png"
    run_cli("logitstore", "show", "s3://caches/show-store.zarr", "--images", "s3://caches/show", "--out", str(out2),
            "--per-class", "2", "--storage-option", f"endpoint_url={s3}", env={"AWS_ENDPOINT_URL": None})
    assert out2.stat().st_size > 1000


def test_torchrun_over_shards_cuts_at_shards_and_a_killed_rank_resumes_to_the_one_process_store(tmp_path, images):
    import subprocess

    import webdataset as wds
    import zarr

    from logitstore import schema
    from conftest import save_teacher
    from test_distributed import _env, _torchrun, kill_rank_one

    shards = tmp_path / "shards"
    shards.mkdir()
    i = 0
    for s, n in enumerate((29, 27, 21, 13)):  # bounds at 29, 56, 77: inside teacher batches of 8
        with wds.TarWriter(str(shards / f"{s:05d}.tar")) as w:
            for _ in range(n):
                w.write({"__key__": f"{i:09d}", "png": images[i] if i != 33 else b"broken", "txt": "x"})
                i += 1
    ckpt = save_teacher(tmp_path / "slow.pt", arch="nets:slow_cnn", seconds=0.2)
    args = ["--teacher", str(ckpt), "--images", str(shards), "--batch-size", "8", "--chunk-rows", "8",
            "--num-workers", "0", "--quiet"]
    ref, out = tmp_path / "ref.zarr", tmp_path / "out.zarr"
    run_cli("logitstore", "dump", *args, "--out", str(ref))

    cmd = _torchrun(2, *args, "--out", str(out))

    def one_segment_a_shard() -> None:
        plan = dict(zarr.open_group(str(out), mode="r").attrs[schema.ATTR_PROGRESS])
        assert plan["segment_bounds"] == [0, 29, 56, 77, 90]

    proc = kill_rank_one(cmd, out, 8, one_segment_a_shard)
    assert proc.returncode != 0
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = open_store(str(ref)), open_store(str(out))
    ra, rb = a.read(0, len(a)), b.read(0, len(b))
    assert len(a) == N - 1 and list(ra.ids) == list(rb.ids)
    assert ra.logits.tobytes() == rb.logits.tobytes() and np.array_equal(ra.digests, rb.digests)
    assert a.failures() == b.failures() == [("00001.tar/000000033", a.failures()[0][1])]
    assert a.meta.fingerprints == b.meta.fingerprints


def test_add_teacher_replays_the_views_of_a_table_store(layouts, teacher_ckpt, tmp_path):
    from logitstore.teacher.add import add_teacher

    out = tmp_path / "t.zarr"
    logitstore.dump(str(teacher_ckpt), str(layouts["tables"]), str(out), num_workers=0, image_column="image",
                    views=2, seed=5)
    s = add_teacher(str(out), str(teacher_ckpt), name="again", num_workers=0)
    store = open_store(str(out))
    assert s.rows == N and store.teacher_logits("again", 0, N).tobytes() == store.read(0, N).logits.tobytes()


def test_a_listing_mixing_paths_and_urls_is_one_line(layouts, tmp_path):
    listing = tmp_path / "mixed.txt"
    listing.write_text(f"{layouts['folder']}/000000000.png\ns3://caches/loose/0/000000001.png\n")
    proc = invoke("logitstore", "dump", "--teacher", "x.pt", "--images", str(listing), "--out", str(tmp_path / "x.zarr"))
    assert_one_line_error(proc, "mixes URLs and local paths")


def test_a_missing_or_broken_shard_is_one_line(layouts, teacher_ckpt, tmp_path):
    (tmp_path / "00000.tar").write_bytes((layouts["shards"] / "00000.tar").read_bytes()[:5000])
    proc = invoke("logitstore", "dump", "--teacher", str(teacher_ckpt), "--images", str(tmp_path / "00000.tar"),
                  "--out", str(tmp_path / "x.zarr"))
    assert_one_line_error(proc, "00000.tar: cannot be read")
    proc = invoke("logitstore", "dump", "--teacher", "x.pt", "--images", str(tmp_path) + "/{00000..00003}.tar",
                  "--out", str(tmp_path / "y.zarr"))
    assert_one_line_error(proc, "3 of its 4 files are missing")


def test_a_broken_shard_among_several_is_one_line(layouts, teacher_ckpt, tmp_path):
    """Several local shards are listed in processes (one a core), while the teacher runs on the first: a
    child's error is the same one line, and no store is left."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        data = (layouts["shards"] / name).read_bytes()
        (corpus / name).write_bytes(data[:5000] if name == "00001.tar" else data)
    proc = invoke("logitstore", "dump", "--teacher", str(teacher_ckpt), "--images", str(corpus), "--out",
                  str(tmp_path / "x.zarr"))
    assert_one_line_error(proc, "00001.tar: cannot be read")
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize("cores", [1, 2])
def test_shards_listed_in_processes_or_not_agree_and_name_a_broken_shard(layouts, tmp_path, monkeypatch, cores):
    import logitstore.sources as sources
    from logitstore.errors import CorpusError

    monkeypatch.setattr(sources, "_cores", lambda: cores)  # 2: the process pool, on a runner of any size
    src = open_source(str(layouts["shards"]))
    assert src.counts == list(SHARD_SIZES) and sorted(src.indexes) == [0, 1, 2]
    monkeypatch.setattr(sources, "LISTED_INDEX_BYTES", 0)
    assert open_source(str(layouts["shards"])).listing_sha256() == src.listing_sha256()
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        data = (layouts["shards"] / name).read_bytes()
        (tmp_path / name).write_bytes(data[:5000] if name == "00002.tar" else data)
    with pytest.raises(CorpusError, match=r"00002\.tar: cannot be read"):
        open_source(str(tmp_path))


def test_shards_are_read_through_once_and_the_dump_reads_their_indexes(layouts, images, teacher_ckpt, reference,
                                                                       tmp_path, monkeypatch):
    import logitstore.sources as sources

    src = open_source(str(layouts["shards"]))
    assert sorted(src.indexes) == [0, 1, 2]  # kept from the listing's one pass over the headers
    items = list(src.items(38))
    assert src.indexes == {}  # each index is let go once its shard is streamed
    assert [it.pos for it in items] == list(range(38, N))
    for it in items:  # where the index says, the worker finds the very bytes the shard holds
        assert isinstance(it.data, sources.Member) and it.data.read() == images[it.pos]
    assert items[0].id == "00000.tar/000000038" and items[2].id == "00001.tar/000000040"
    # Past the index budget the shards' headers are read again by the dump, to the same store.
    monkeypatch.setattr(sources, "LISTED_INDEX_BYTES", 0)
    assert open_source(str(layouts["shards"])).indexes == {}
    logits, _ = _dump(teacher_ckpt, str(layouts["shards"]), tmp_path / "c.zarr", num_workers=2)
    np.testing.assert_array_equal(logits, reference)


def test_the_listing_identity_is_composed_of_units_listed_anywhere(layouts):
    whole = open_source(str(layouts["shards"]))
    parts = open_source(str(layouts["shards"]), listed=False)
    assert parts.counts == [] and parts.units == ["00000.tar", "00001.tar", "00002.tar"]
    listed = {k: parts.list_unit(k) for k in (2, 0, 1)}  # as processes would, each its own units
    parts.settle([listed[k] for k in range(3)])
    assert parts.counts == whole.counts == list(SHARD_SIZES)
    assert parts.listing_sha256() == whole.listing_sha256() and whole.n_listed == N


def test_select_and_merge_keep_the_row_sources(layouts, teacher_ckpt, tmp_path):
    import hashlib

    from logitstore.tools.combine import merge, select

    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    logitstore.dump(str(teacher_ckpt), str(layouts["shards"]), str(a), num_workers=0)
    logitstore.dump(str(teacher_ckpt), str(layouts["tables"]), str(b), num_workers=0, image_column="image")
    select(str(a), str(tmp_path / "s.zarr"), limit=10)
    picked = open_store(str(tmp_path / "s.zarr"))
    assert picked.meta.corpus.source == {"kind": "webdataset"}
    rows = picked.read(0, len(picked))
    reader = open_reader(picked.meta.corpus.root, picked.meta.corpus.source)
    assert all(hashlib.sha256(reader.read(i)).digest() == bytes(d) for i, d in zip(rows.ids, rows.digests))
    with pytest.raises(Exception, match="different kinds of corpus"):
        merge([str(a), str(b)], str(tmp_path / "m.zarr"))


def test_a_row_source_of_an_unknown_kind_is_refused():
    from logitstore.errors import FormatError
    from logitstore.schema import row_source

    assert row_source({"kind": "parquet", "image_column": "img", "id_column": None}) == {
        "kind": "parquet", "image_column": "img", "id_column": None}
    for bad in ({"kind": "zip"}, {"kind": "parquet"}, "webdataset", {"kind": "parquet", "image_column": 3}):
        with pytest.raises(FormatError):
            row_source(bad)


def test_a_fresh_dump_runs_its_teacher_while_its_shards_are_listed(layouts, teacher_ckpt, reference, tmp_path,
                                                                    monkeypatch):
    """The teacher starts on the first shards while the others are listed; the store, created once the
    listing ends (its identity needs every shard), is the one an eager listing gives, whatever is held."""
    import threading

    import logitstore.sources as sources
    import logitstore.teacher.local as local

    teacher_ran = threading.Event()
    list_unit = sources.Source.list_unit

    def last_shard_waits(self, k, *args, **kw):
        if k == len(SHARD_SIZES) - 1:  # listed only once the teacher has made rows from the first shard
            assert teacher_ran.wait(120)
        return list_unit(self, k, *args, **kw)

    monkeypatch.setattr(sources.Source, "list_unit", last_shard_waits)
    out = tmp_path / "w.zarr"
    store_existed = []

    def on_batch(n):
        store_existed.append((out / "zarr.json").exists())
        teacher_ran.set()

    logits, store = _dump(teacher_ckpt, str(layouts["shards"]), out, on_batch=on_batch)
    assert store_existed[0] is False  # the teacher ran on the first shard before the store existed
    assert store.meta.complete
    np.testing.assert_array_equal(logits, reference)
    eager = open_source(str(layouts["shards"]))
    assert (store.meta.corpus.n_listed, store.meta.corpus.listing_sha256) == (N, eager.listing_sha256())
    # Nothing may be held: the first rows wait for the listing, with the same store as the outcome.
    monkeypatch.setattr(local, "WAITING_ROWS_BYTES", 0)
    same, _ = _dump(teacher_ckpt, str(layouts["shards"]), tmp_path / "w0.zarr", num_workers=2)
    np.testing.assert_array_equal(same, reference)
