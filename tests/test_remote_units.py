"""A remote shard or table is fetched once per dump: the copy fetched to count its samples is the one
the dump reads (within LISTED_KEEP_BYTES), as the S3 server's own request log shows."""
from __future__ import annotations

import io
import logging
import re

import numpy as np
import pytest
from PIL import Image

import logitstore
from logitstore import sources
from logitstore.store import open_store

SIZES = (20, 15, 11)


@pytest.fixture(scope="module")
def remote_shards(s3, mnist, tmp_path_factory):
    import boto3
    import webdataset as wds

    root = tmp_path_factory.mktemp("remote_units")
    folder = root / "folder"
    folder.mkdir()
    i = 0
    client = boto3.client("s3")
    for s, n in enumerate(SIZES):
        tar = root / f"{s:05d}.tar"
        with wds.TarWriter(str(tar)) as w:
            for _ in range(n):
                b = io.BytesIO()
                Image.fromarray(mnist["train_images"][i]).save(b, format="PNG")
                (folder / f"{i:09d}.png").write_bytes(b.getvalue())
                w.write({"__key__": f"{i:09d}", "png": b.getvalue(), "txt": f"caption {i}"})
                i += 1
        client.upload_file(str(tar), "caches", f"once/{tar.name}")
    return folder, "s3://caches/once/"


def _shard_gets(records: list[logging.LogRecord]) -> dict[str, int]:
    """GET requests per shard, from the moto server's werkzeug request log."""
    gets: dict[str, int] = {}
    for r in records:
        m = re.search(r'"GET /caches/once/(\d+\.tar)[ ?]', r.getMessage())
        if m:
            gets[m.group(1)] = gets.get(m.group(1), 0) + 1
    return gets


def test_each_remote_shard_is_fetched_once_per_dump(remote_shards, teacher_ckpt, tmp_path, caplog):
    folder, url = remote_shards
    ref = logitstore.dump(str(teacher_ckpt), str(folder), str(tmp_path / "f.zarr"), num_workers=0, batch_size=16)
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        got = logitstore.dump(str(teacher_ckpt), url, str(tmp_path / "s.zarr"), num_workers=0, batch_size=16)
    assert (ref.n_images, got.n_images, got.n_failed) == (sum(SIZES), sum(SIZES), 0)
    assert _shard_gets(caplog.records) == {"00000.tar": 1, "00001.tar": 1, "00002.tar": 1}
    a, b = open_store(str(tmp_path / "f.zarr")), open_store(str(tmp_path / "s.zarr"))
    assert a.read(0, len(a)).logits.tobytes() == b.read(0, len(b)).logits.tobytes()


def test_workers_read_the_kept_copies_before_they_go(remote_shards, teacher_ckpt, tmp_path, caplog):
    """Decoding workers read the samples of kept copies (the main process only names where they are):
    a copy goes only once the dump has read past it, so nothing fails and every shard is fetched once."""
    folder, url = remote_shards
    ref = logitstore.dump(str(teacher_ckpt), str(folder), str(tmp_path / "f.zarr"), num_workers=0, batch_size=16)
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        got = logitstore.dump(str(teacher_ckpt), url, str(tmp_path / "s.zarr"), num_workers=2, batch_size=16)
    assert (got.n_images, got.n_failed) == (ref.n_images, 0)
    assert _shard_gets(caplog.records) == {"00000.tar": 1, "00001.tar": 1, "00002.tar": 1}
    a, b = open_store(str(tmp_path / "f.zarr")), open_store(str(tmp_path / "s.zarr"))
    assert a.read(0, len(a)).logits.tobytes() == b.read(0, len(b)).logits.tobytes()


def test_past_the_keep_budget_a_shard_is_fetched_again_and_dumps_the_same(remote_shards, teacher_ckpt, tmp_path,
                                                                          caplog, monkeypatch):
    folder, url = remote_shards
    import os

    first = os.path.getsize(folder.parent / "00000.tar")
    monkeypatch.setattr(sources, "LISTED_KEEP_BYTES", first)  # room for one shard
    ref = logitstore.dump(str(teacher_ckpt), str(folder), str(tmp_path / "f.zarr"), num_workers=0, batch_size=16)
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        logitstore.dump(str(teacher_ckpt), url, str(tmp_path / "s.zarr"), num_workers=0, batch_size=16)
    gets = _shard_gets(caplog.records)
    assert sorted(gets.values()) == [1, 2, 2] and sum(gets.values()) == 5
    a, b = open_store(str(tmp_path / "f.zarr")), open_store(str(tmp_path / "s.zarr"))
    assert a.read(0, len(a)).logits.tobytes() == b.read(0, len(b)).logits.tobytes()
    assert ref.n_images == len(b)


def test_a_source_leaves_no_listed_copies_behind(remote_shards):
    import os

    src = sources.open_source(remote_shards[1])
    folder = src._keep[0]
    assert sorted(os.listdir(folder)) == ["000000000.tar", "000000001.tar", "000000002.tar"]
    items = list(src.items(20))
    assert items[0].id == "00001.tar/000000020"
    # The shard before the start goes at once; the others' samples are read from the kept copies by the
    # dump's workers (Members), so those copies stay until the dump says it has read past them.
    assert sorted(os.listdir(folder)) == ["000000001.tar", "000000002.tar"]
    assert all(isinstance(it.data, sources.Member) and it.data.read()[:4] == b"\x89PNG" for it in items)
    src.release(items[-1].pos)  # the last sample is not read yet: its shard stays
    assert os.listdir(folder) == ["000000002.tar"]
    src.release(items[-1].pos + 1)
    assert os.listdir(folder) == []
    del src
    import gc

    gc.collect()
    assert not os.path.exists(folder)


def test_a_broken_remote_shard_is_named_by_its_url(s3, remote_shards, tmp_path):
    import boto3

    from logitstore.errors import CorpusError

    folder, _ = remote_shards
    client = boto3.client("s3")
    good = client.get_object(Bucket="caches", Key="once/00000.tar")["Body"].read()
    client.put_object(Bucket="caches", Key="broken/00000.tar", Body=good)
    client.put_object(Bucket="caches", Key="broken/00001.tar", Body=good[:3000])
    with pytest.raises(CorpusError, match=r"^s3://caches/broken/00001\.tar: cannot be read"):
        sources.open_source("s3://caches/broken/")
