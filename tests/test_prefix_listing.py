"""A prefix of loose images is listed as a stream (logitstore/listing.py): in the order, ids and listing
sha256 a whole sorted `find` gives, in slices (name ranges) of equal count, and a dump that starts at a
position (a resumed one, or a torchrun rank's segment) lists only the slices from there on."""
from __future__ import annotations

import io
import logging
import re
import subprocess
from urllib.parse import parse_qs

import fsspec
import numpy as np
import pytest
from PIL import Image

import logitstore
from logitstore import listing
from logitstore import sources
from logitstore.errors import CorpusError
from logitstore.sources import open_source
from logitstore.store import open_store

from conftest import run_cli

N = 60
# Names whose sorted order is not a directory-by-directory walk's: '-' < '.' < '/' (so "a-b/..." and
# "a.png" come before "a/..."), a file name that prefixes a directory's, a non-ASCII name.
SUBS = ("a-b", "a", "a.png.d", "b/c", "", "é")


def _key(i: int) -> str:
    sub = SUBS[i % len(SUBS)]
    return f"{sub}/{i:04d}.png" if sub else f"{i:04d}.png"


@pytest.fixture(scope="module")
def loose(mnist, tmp_path_factory):
    """N images as a local folder (the same names go under s3://caches/px/ in `s3_loose`)."""
    images = []
    for a in mnist["train_images"][:N]:
        b = io.BytesIO()
        Image.fromarray(a).save(b, format="PNG")
        images.append(b.getvalue())
    folder = tmp_path_factory.mktemp("loose") / "folder"
    for i, data in enumerate(images):
        (folder / _key(i)).parent.mkdir(parents=True, exist_ok=True)
        (folder / _key(i)).write_bytes(data)
    return folder, images


@pytest.fixture(scope="module")
def s3_loose(s3, loose):
    """The folder's images under s3://caches/px/, with objects a dump skips beside them."""
    import boto3

    folder, images = loose
    client = boto3.client("s3")
    for i, data in enumerate(images):
        client.put_object(Bucket="caches", Key=f"px/{_key(i)}", Body=data)
    client.put_object(Bucket="caches", Key="px/notes.txt", Body=b"not an image")
    client.put_object(Bucket="caches", Key="px/b/.hidden.png", Body=b"skipped")
    client.put_object(Bucket="caches", Key="px/a/", Body=b"")  # a "directory" marker
    client.put_object(Bucket="caches", Key="pxy/0000.png", Body=images[0])  # a sibling sharing the stem
    return "s3://caches/px/"


def _slices(fs, base: str, bounds: list[str]) -> list[list[str]]:
    return [list(listing.walk_sorted(fs, base, lo, bounds[k + 1] if k + 1 < len(bounds) else None))
            for k, lo in enumerate(bounds)]


def _tree(fs, base: str) -> None:
    for name in ("a.jpg", "a-b/1.jpg", "a/x.jpg", "a/y/z.png", "a.jpg.d/q.jpg", "b/.h.jpg", "b/c/d/e.png",
                 "é/1.png", "Z.png", "a b/1.png", "a/x.jpgx/1.png", "b/c.png", "b/c/0.png"):
        fs.makedirs(f"{base}/{name}".rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(f"{base}/{name}", b"x")


@pytest.mark.parametrize("protocol", ["file", "memory"])
def test_a_walk_in_slices_is_the_sorted_find(protocol, tmp_path):
    fs = fsspec.filesystem(protocol)
    base = str(tmp_path) if protocol == "file" else "/walk"
    _tree(fs, base)
    whole = sorted(fs.find(base))
    assert list(listing.walk_sorted(fs, base)) == whole
    assert whole[:3] == [f"{base}/Z.png", f"{base}/a b/1.png", f"{base}/a-b/1.jpg"] and whole[3] == f"{base}/a.jpg"
    rel = [p[len(base) + 1:] for p in whole]
    for step in (1, 2, 3, 5):  # slices that begin at files, in and out of directories
        parts = _slices(fs, base, [""] + rel[step::step])
        assert sum(parts, []) == whole and all(len(p) == step for p in parts[:-1])
    parts = _slices(fs, base, ["", "a-b/", "a/", "b/c/", "c"])  # bounds that name no file
    assert sum(parts, []) == whole and parts[1] == [f"{base}/a-b/1.jpg", f"{base}/a.jpg", f"{base}/a.jpg.d/q.jpg"]


def test_s3_pages_and_slices_are_the_sorted_find(s3_loose, monkeypatch):
    fs, path = fsspec.core.url_to_fs(s3_loose)
    monkeypatch.setattr(listing, "PAGE_KEYS", 7)  # many pages on a small prefix
    whole = [p for p in sorted(fs.find(path)) if not p.endswith("/")]  # find lists the "a/" marker too
    assert list(listing.walk_sorted(fs, path)) == whole
    rel = [p[len(path) + 1:] for p in whole]
    for step in (1, 4, 9):
        parts = _slices(fs, path, [""] + rel[step::step])
        assert sum(parts, []) == whole and all(len(p) == step for p in parts[:-1])


def test_an_s3_prefix_dumps_the_folder_store_and_streams_from_any_position(s3_loose, loose, teacher_ckpt,
                                                                          tmp_path, monkeypatch):
    folder, _ = loose
    monkeypatch.setattr(listing, "PAGE_KEYS", 7)
    ref = logitstore.dump(str(teacher_ckpt), str(folder), str(tmp_path / "f.zarr"), num_workers=0, batch_size=16)
    got = logitstore.dump(str(teacher_ckpt), s3_loose, str(tmp_path / "s.zarr"), num_workers=0, batch_size=16)
    assert (ref.n_images, got.n_images, got.n_failed) == (N, N, 0)
    a, b = open_store(str(tmp_path / "f.zarr")), open_store(str(tmp_path / "s.zarr"))
    ra, rb = a.read(0, N), b.read(0, N)
    assert list(ra.ids) == list(rb.ids) and ra.ids[0] == "0004.png" and "a.png.d/0002.png" in list(rb.ids)
    assert ra.logits.tobytes() == rb.logits.tobytes() and np.array_equal(ra.digests, rb.digests)
    # The identity of today's stores: the sha256 over the sorted ids, as a folder's.
    assert b.meta.corpus.listing_sha256 == a.meta.corpus.listing_sha256
    assert b.meta.corpus.source == {"kind": "prefix"} and b.meta.corpus.root == "s3://caches/px"
    # Slices, and a stream from any position (how a resumed or distributed dump starts) lists no other slice.
    src = open_source(s3_loose)
    ids = list(ra.ids)
    assert src.units == [""] + ids[8::8] and src.counts == [8] * 7 + [4]
    for start in (0, 9, 10, 31, N - 1):
        assert [it.id for it in src.items(start)] == ids[start:]
    listed: list[str] = []
    real = listing.walk_sorted
    monkeypatch.setattr(listing, "walk_sorted",
                        lambda fs, path, lo="", hi=None: (listed.append(lo), real(fs, path, lo, hi))[1])
    assert [it.id for it in src.items(41)] == ids[41:]
    assert listed == [ids[40], ids[48], ids[56]]
    listed.clear()  # with a stop (a segment's end), no slice past the one that holds stop - 1
    assert [it.id for it in src.items(9, 20)] == ids[9:24] and listed == [ids[8], ids[16]]


def test_a_long_prefix_is_cut_into_few_slices_of_equal_count(s3_loose, monkeypatch):
    monkeypatch.setattr(sources, "PREFIX_SLICES", 4)
    monkeypatch.setattr(sources, "PREFIX_SLICE_FIRST", 2)
    src = open_source(s3_loose)
    ids = [it.id for it in src.items(0)]
    assert src.counts == [16, 16, 16, 12] and src.units == ["", ids[16], ids[32], ids[48]]
    assert [it.id for it in src.items(33)] == ids[33:]


def test_a_prefix_that_changes_during_the_dump_is_one_line(s3_loose, tmp_path):
    import boto3

    src = open_source(s3_loose)
    boto3.client("s3").put_object(Bucket="caches", Key="px/b/late.png", Body=b"x")
    try:
        with pytest.raises(CorpusError, match="changed during the dump"):
            list(src.items(0))
    finally:
        boto3.client("s3").delete_object(Bucket="caches", Key="px/b/late.png")


def _listings(records: list[logging.LogRecord], prefix: str) -> list[str | None]:
    """The StartAfter of each ListObjectsV2 request under `prefix` (None: from the first key), from the
    moto server's werkzeug request log."""
    out: list[str | None] = []
    for r in records:
        m = re.search(r'"GET /caches/?\?([^ "]*)', r.getMessage())
        if m:
            q = parse_qs(m.group(1))
            if q.get("list-type") == ["2"] and q.get("prefix") == [prefix]:
                out.append(q.get("start-after", [None])[0])
    return out


def test_torchrun_over_an_s3_prefix_cuts_at_slices_and_equals_one_process(s3_loose, loose, tmp_path, caplog):
    from test_distributed import _env, _torchrun

    from conftest import save_teacher

    ckpt = save_teacher(tmp_path / "t.pt")
    args = ["--teacher", str(ckpt), "--images", s3_loose, "--batch-size", "8", "--chunk-rows", "8",
            "--num-workers", "0", "--quiet"]
    ref, out = tmp_path / "ref.zarr", tmp_path / "out.zarr"
    run_cli("logitstore", "dump", *args, "--out", str(ref))
    bounds = open_source(s3_loose).units
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        r = subprocess.run(_torchrun(2, *args, "--out", str(out)), env=_env(), capture_output=True, text=True,
                           timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    # One identity pass (rank 0's, shared by broadcast), then each slice listed once, by the rank that
    # dumps it (slices of 8 = segments, dealt round robin): rank 1 lists none of the prefix but its own.
    listed = _listings(caplog.records, "px/")
    assert len(bounds) == 8 and listed.count(None) == 2  # rank 0's identity pass and its first slice
    assert sorted(a for a in listed if a is not None) == sorted(f"px/{lo[:-1]}" for lo in bounds[1:])
    a, b = open_store(str(ref)), open_store(str(out))
    ra, rb = a.read(0, len(a)), b.read(0, len(b))
    assert len(a) == len(b) == N and list(ra.ids) == list(rb.ids)
    assert ra.logits.tobytes() == rb.logits.tobytes() and np.array_equal(ra.digests, rb.digests)
    assert a.meta.fingerprints == b.meta.fingerprints
    assert a.meta.corpus.listing_sha256 == b.meta.corpus.listing_sha256


def test_torchrun_over_a_prefix_without_images_is_one_line_on_every_rank(s3_loose, tmp_path):
    """Rank 0 alone lists the prefix: its error reaches rank 1 through the broadcast (no rank waits)."""
    from test_distributed import _env, _torchrun

    from conftest import save_teacher

    ckpt = save_teacher(tmp_path / "t.pt")
    r = subprocess.run(_torchrun(2, "--teacher", str(ckpt), "--images", "s3://caches/nothing/", "--num-workers",
                                 "0", "--quiet", "--out", str(tmp_path / "out.zarr")),
                       env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "s3://caches/nothing/: no images" in ln]
    # Both ranks print the one line and no traceback of ours (torchrun's launcher prints its own).
    assert len(lines) == 2 and not re.search(r'File "[^"]*/logitstore/', r.stdout + r.stderr), r.stdout + r.stderr
