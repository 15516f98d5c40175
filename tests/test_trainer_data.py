"""Streaming a store: shares, order, view replay, the decode cache, and bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import logitstore
from logitstore.corpus import decode_image
from logitstore.views import apply_view, normalize
from trainer.batches import make_batches
from trainer.errors import ImageError, StoreMismatchError
from trainer.inputs import NO_LABEL, make_input_spec
from trainer.order import Segment, batches_per_epoch, epoch_share
from trainer.storeset import open_stores

from conftest import World

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny nets: one thread is faster


def _keys(batches, requests):
    return [b["keys"].numpy().copy() for b in batches(requests)]


def test_rank_shares_are_disjoint_equal_and_cover_the_epoch():
    blocks = [Segment(s, a, min(a + 64, n)) for s, n in ((0, 640), (1, 300)) for a in range(0, n, 64)]
    total = sum(b.rows for b in blocks)
    for world_size in (1, 2, 3):
        shares = [epoch_share(blocks, seed=5, epoch=2, rank=r, world=world_size) for r in range(world_size)]
        rows = [{(seg.store, i) for seg in share for i in range(seg.start, seg.stop)} for share in shares]
        assert all(len(r) == total // world_size for r in rows)
        assert sum(len(r) for r in rows) == len(set().union(*rows))  # disjoint
    one = epoch_share(blocks, seed=5, epoch=2)
    assert sorted(one) == sorted(blocks)                           # world 1: every block, whole
    assert one != epoch_share(blocks, seed=5, epoch=3)             # reshuffled every epoch
    assert one == epoch_share(blocks, seed=5, epoch=2)             # and reproducible


def test_batch_order_is_the_same_for_0_1_and_2_workers(world: World):
    data = open_stores([world.store], min_block_rows=64)  # 10 blocks of one chunk: a real block shuffle
    spec = make_input_spec(data.pre, None, 1)
    orders = []
    for workers in (0, 1, 2):
        batches = make_batches(data, spec, cache_bytes=1 << 30, num_workers=workers)
        orders.append(_keys(batches, data.requests(epoch=1, batch_size=50, seed=3)))
    assert len(orders[0]) == batches_per_epoch(data.n_train, 50)
    for other in orders[1:]:
        assert len(other) == len(orders[0])
        assert all(np.array_equal(a, b) for a, b in zip(orders[0], other))
    flat = np.concatenate(orders[0])
    assert len(set(flat.tolist())) == len(flat) == data.n_train
    # Shuffled across chunks: a batch draws from several chunks, not one contiguous run.
    assert len({k // 64 for k in orders[0][0].tolist()}) > 3


def test_order_depends_on_seed_and_epoch_only(world: World):
    data = open_stores([world.store], min_block_rows=64)
    spec = make_input_spec(data.pre, None, 1)
    batches = make_batches(data, spec, cache_bytes=1 << 30)
    a = np.concatenate(_keys(batches, data.requests(epoch=0, batch_size=32, seed=0)))
    b = np.concatenate(_keys(batches, data.requests(epoch=0, batch_size=32, seed=0)))
    c = np.concatenate(_keys(batches, data.requests(epoch=1, batch_size=32, seed=0)))
    d = np.concatenate(_keys(batches, data.requests(epoch=0, batch_size=32, seed=1)))
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, d)


def test_view_replay_feeds_the_student_exactly_what_the_teacher_saw(world: World):
    from logitstore.arch import build_model

    ckpt = torch.load(world.teacher, weights_only=True)
    teacher = build_model(ckpt["arch"], ckpt["arch_kwargs"])
    teacher.load_state_dict(ckpt["state_dict"])
    teacher.eval()
    data = open_stores([world.store_views], holdout=0)
    store = logitstore.open_store(world.store_views)
    rows = store[0:len(store)]
    spec = make_input_spec(data.pre, None, 1)
    batches = make_batches(data, spec, cache_bytes=1 << 30)
    fed: dict[int, list[tuple]] = {}
    for epoch in range(3):
        for batch in batches(data.requests(epoch=epoch, batch_size=128, seed=0)):
            # The teacher run on the student's input gives back the stored logits of that view.
            with torch.no_grad():
                again = teacher(normalize(batch["pixels"], data.pre))
            assert torch.allclose(again, batch["logits"].float(), atol=0.05, rtol=0.01)
            for i, k in enumerate(batch["keys"].tolist()):
                fed.setdefault(k, []).append(tuple(batch["logits"][i].tolist()))
                if i < 20:  # and the pixels are the stored crop, replayed bit for bit
                    v = int(np.argmin(np.abs(rows.logits[k].astype(np.float32) - batch["logits"][i].numpy()).sum(1)))
                    img = decode_image((world.corpus / rows.ids[k]).read_bytes(), "L")
                    expected = apply_view(img, rows.view_params[k, v], data.pre, "random_resized_crop")
                    assert torch.equal(batch["pixels"][i], expected)
    # Over V epochs each image contributes each of its V stored views once.
    assert len(fed) == len(store)
    assert all(sorted(v) == sorted(tuple(x) for x in rows.logits[k].tolist()) for k, v in fed.items())


def test_a_different_student_input_size_only_changes_the_final_resize(world: World):
    data = open_stores([world.store_views], holdout=0)
    store = logitstore.open_store(world.store_views)
    spec = make_input_spec(data.pre, (40, 36), 1)
    batch = next(iter(make_batches(data, spec, 1 << 30)(data.requests(epoch=0, batch_size=16))))
    assert batch["pixels"].shape == (16, 1, 40, 36)
    k = int(batch["keys"][0])
    row = store[k:k + 1]
    img = decode_image((world.corpus / row.ids[0]).read_bytes(), "L")
    candidates = [apply_view(img, row.view_params[0, v], data.pre, "random_resized_crop", (40, 36)) for v in range(3)]
    assert any(torch.equal(batch["pixels"][0], c) for c in candidates)


def test_decode_cache_decodes_each_image_once_per_run(world: World, tmp_path: Path):
    corpus = tmp_path / "corpus"
    shutil.copytree(world.corpus, corpus)
    data = open_stores([world.store], images=[corpus], holdout=0)
    batches = make_batches(data, make_input_spec(data.pre, None, 1), cache_bytes=1 << 30, num_workers=1)
    first = [b["pixels"].clone() for b in batches(data.requests(epoch=0, batch_size=64))]
    assert batches.source.cache.n_cached == len(data)
    shutil.rmtree(corpus)  # epoch 2 must not need the files any more
    second = {int(k): p for b in batches(data.requests(epoch=0, batch_size=64)) for k, p in zip(b["keys"], b["pixels"])}
    assert len(second) == data.n_train
    assert torch.equal(torch.cat(first), torch.stack([second[int(k)] for b in batches(data.requests(epoch=0, batch_size=64)) for k in b["keys"]]))


def test_without_cache_budget_images_are_read_every_epoch(world: World, tmp_path: Path):
    corpus = tmp_path / "corpus"
    shutil.copytree(world.corpus, corpus)
    data = open_stores([world.store], images=[corpus], holdout=0)
    batches = make_batches(data, make_input_spec(data.pre, None, 1), cache_bytes=0)
    assert sum(len(b["keys"]) for b in batches(data.requests(epoch=0, batch_size=64))) == data.n_train
    assert batches.source.cache.n_cached == 0
    shutil.rmtree(corpus / "part0")
    with pytest.raises(ImageError, match="part0"):
        list(batches(data.requests(epoch=1, batch_size=64)))


def test_changed_image_is_an_error_that_names_it_or_is_skipped_and_counted(world: World, tmp_path: Path):
    corpus = tmp_path / "corpus"
    shutil.copytree(world.corpus, corpus)
    victim = corpus / "part1" / "img00210.png"
    img = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(victim)).copy()
    img[0, 0] ^= 0xFF
    __import__("PIL.Image", fromlist=["Image"]).fromarray(img).save(victim)
    data = open_stores([world.store], images=[corpus], holdout=0)
    spec = make_input_spec(data.pre, None, 1)
    with pytest.raises(ImageError, match=r"img00210\.png.*sha256"):
        list(make_batches(data, spec, 1 << 30, num_workers=1)(data.requests(epoch=0, batch_size=64)))
    batches = make_batches(data, spec, 1 << 30, skip_mismatched=True)
    n = sum(len(b["keys"]) for b in batches(data.requests(epoch=0, batch_size=64)))
    assert n == data.n_train - 1 and batches.source.cache.n_skipped == 1


def test_missing_corpus_error_says_where_it_looked(world: World, tmp_path: Path):
    with pytest.raises(ImageError, match=str(tmp_path / "nowhere")):
        open_stores([world.store], images=[tmp_path / "nowhere"])


def test_stores_with_different_classes_are_refused_naming_the_difference(world: World, tmp_path: Path):
    other = tmp_path / "letters.zarr"
    logitstore.dump(str(world.teacher), str(world.corpus / "part0"), str(other), chunk_rows=64, num_workers=0,
                    classes=list("abcdefghij"))
    with pytest.raises(StoreMismatchError, match=r"classes differ \(only in the first: \['0', .*only in the second: "
                                                 r"\['a', "):
        open_stores([world.store, other])


def test_two_stores_of_one_teacher_read_as_one_dataset(world: World, tmp_path: Path):
    part = tmp_path / "part0.zarr"
    logitstore.dump(str(world.teacher), str(world.corpus / "part0"), str(part), chunk_rows=64, num_workers=0)
    data = open_stores([world.store, part], holdout=0)
    assert len(data) == 640 + 200
    batches = make_batches(data, make_input_spec(data.pre, None, 1), 1 << 30)
    got = [b for b in batches(data.requests(epoch=0, batch_size=100))]
    keys = np.concatenate([b["keys"].numpy() for b in got])
    assert sorted(keys.tolist()) == list(range(840))
    # Both stores hold part0's images with the same teacher: the same image, the same logits.
    logits = {int(k): l for b in got for k, l in zip(b["keys"], b["logits"])}
    assert torch.equal(logits[0], logits[640]) and torch.equal(logits[199], logits[839])


def test_held_out_rows_are_never_trained_on(world: World):
    data = open_stores([world.store], holdout=0.05, min_block_rows=64)
    held = set(data.holdout.keys.tolist())
    assert len(held) == 10 * 4  # ceil(5% of 64) rows at the end of each of 10 one-chunk blocks
    assert len(open_stores([world.store], holdout=0.05).holdout) == 32  # one block of 640 rows: 5%
    trained = set()
    for epoch in range(2):
        for req in data.requests(epoch, 64):
            trained |= set(req.keys.tolist())
    assert not trained & held and len(trained) == len(data) - len(held)
    # Read again on each pass, view 0, in batches: the stored rows.
    store = logitstore.open_store(world.store)
    for _ in range(2):
        got = list(data.holdout_requests(batch_size=16))
        assert [len(r) for r in got] == [16, 16, 8]
        keys = np.concatenate([r.keys for r in got])
        assert np.array_equal(keys, data.holdout.keys)
        assert np.array_equal(np.concatenate([r.logits for r in got]), store[0:len(store)].logits[keys, 0])


def test_a_store_of_many_blocks_is_scored_on_evenly_spaced_tails(world: World, tmp_path: Path):
    small = tmp_path / "small_chunks.zarr"  # 80 chunks of 8 rows, so 80 blocks: more than one pass scores
    logitstore.dump(str(world.teacher), str(world.corpus), str(small), chunk_rows=8, num_workers=0)
    data = open_stores([small], holdout=0.1, min_block_rows=8)
    assert data.n_held_out == 80                       # every block's tail (1 row) stays out of training
    scored = data.holdout.segments
    assert len(scored) == 64 and all(seg.rows == 1 for seg in scored)
    assert [seg.start for seg in scored] == [8 * ((i * 80) // 64) + 7 for i in range(64)]  # spread, in order
    trained = {k for r in data.requests(0, 32) for k in r.keys.tolist()}
    assert len(trained) == 640 - 80 and not trained & {8 * k + 7 for k in range(80)}
    assert sum(len(r) for r in data.holdout_requests(16)) == 64


def test_read_ahead_keeps_the_order_raises_the_readers_errors_and_stops_with_its_consumer():
    import threading

    from trainer.batches import read_ahead

    assert list(read_ahead(iter(range(100)), depth=3)) == list(range(100))

    def failing():
        yield 1
        raise logitstore.IntegrityError("chunk 3 fails its checksum")

    it = read_ahead(failing())
    assert next(it) == 1
    with pytest.raises(logitstore.IntegrityError, match="chunk 3"):
        next(it)
    endless = read_ahead(iter(int, 1), depth=2)  # an infinite source
    next(endless)
    endless.close()
    for t in threading.enumerate():
        if t.name == "trainer-read-ahead":
            t.join(timeout=2)
    assert not any(t.name == "trainer-read-ahead" and t.is_alive() for t in threading.enumerate())


def test_small_chunks_are_read_in_blocks_of_consecutive_chunks(world: World):
    data = open_stores([world.store], holdout=0, min_block_rows=200)
    assert data.block_rows == [256]  # 4 chunks of 64 rows
    assert [(b.start, b.stop) for b in data.train_blocks] == [(0, 256), (256, 512), (512, 640)]


def _chunk_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the arrays whose chunks are read from a local store from now on, in order."""
    from zarr.storage import LocalStore

    seen: list[str] = []
    get = LocalStore.get

    async def recording_get(self, key, *args, **kwargs):
        if "/c/" in key:
            seen.append(key.split("/c/")[0])
        return await get(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get", recording_get)
    return seen


def test_opening_reads_no_array_and_keeps_nothing_per_row(world: World, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    store = logitstore.open_store(world.store)
    ids = store[0:len(store)].ids
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({ids[0]: "3", ids[5]: "7", ids[600]: "1"}))
    seen = _chunk_reads(monkeypatch)
    data = open_stores([world.store], labels=labels, min_block_rows=64)
    assert seen == []                                 # 640 rows, 10 chunks: not one read to open
    assert data.n_labeled == 3 and set(seen) == {"ids"}

    seen.clear()
    image_bytes = 28 * 28
    batches = make_batches(data, make_input_spec(data.pre, None, 1), cache_bytes=100 * image_bytes + 5)
    assert set(seen) == {"image_hw"}                  # the decode cache's layout: image sizes only
    cache = batches.source.cache
    assert cache.n_cacheable == 100 and cache.shapes.shape == (100, 3) and len(cache.starts) == 100
    assert cache.nbytes == 100 * image_bytes and cache.needed == len(data) * image_bytes
    assert len(cache.flags) == len(data)              # one state byte per row, for skipped images

    seen.clear()
    req = data.read(Segment(0, 0, 64), seed=0, epoch=0)
    assert set(seen) == {"ids", "logits", "digests"}  # what a Request needs: not image_hw, no eval view params
    assert req.labels[0] == 3 and req.labels[5] == 7 and (np.delete(req.labels, [0, 5]) == NO_LABEL).all()
    unlabeled = open_stores([world.store])
    assert unlabeled.n_labeled == 0 and (unlabeled.read(Segment(0, 0, 64), 0, 0).labels == NO_LABEL).all()


def test_a_csv_labels_file_may_start_with_any_header_row(tmp_path: Path):
    from trainer.errors import ClassMismatchError
    from trainer.inputs import read_labels_file

    classes = [str(i) for i in range(10)]
    for header in ("image,label", "filename,class", "id,class"):
        f = tmp_path / "labels.csv"
        f.write_text(f"{header}\n0/a.png,3\nsub/b.png,7\n")
        assert read_labels_file(f, classes) == {"0/a.png": 3, "sub/b.png": 7}
    f.write_text("0/a.png,3\nsub/b.png,seven\n")  # a bad class after the first line is an error, not a header
    with pytest.raises(ClassMismatchError, match="seven"):
        read_labels_file(f, classes)
    f.write_text("image,label\n")                  # nothing but a line that names no class
    with pytest.raises(ClassMismatchError, match="label"):
        read_labels_file(f, classes)
