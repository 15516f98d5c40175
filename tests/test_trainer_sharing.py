"""The trainer on shared caches: object storage, embedded pixels, ensembles, merged stores, corruption."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import logitstore
import trainer
from logitstore.errors import IntegrityError
from logitstore.tools.transfer import copy_store
from trainer.batches import make_batches
from trainer.errors import ConfigError, ImageError, StoreMismatchError
from trainer.inputs import make_input_spec
from trainer.storeset import ensemble_logits, open_stores

from conftest import World, flip_byte, save_teacher

FAST = dict(student="lenet", epochs=1, batch_size=64, num_workers=0, holdout=0.05, seed=3)


def _same_weights(run_a: Path, run_b: Path) -> bool:
    a, b = (torch.load(r / "checkpoint.pt", weights_only=True)["state_dict"] for r in (run_a, run_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ensemble_logits_are_the_mixture_of_softmaxes():
    rng = np.random.default_rng(0)
    t = rng.normal(0, 4, size=(50, 3, 7))
    w = np.array([0.5, 0.3, 0.2])
    for temp in (1.0, 2.0, 4.0, 8.0):
        eff = ensemble_logits(t, w, temp).astype(np.float64)
        p = np.exp(t / temp - t.max(-1, keepdims=True) / temp)
        p /= p.sum(-1, keepdims=True)
        mix = (w[None, :, None] * p).sum(1)
        q = np.exp(eff / temp - eff.max(-1, keepdims=True) / temp)
        np.testing.assert_allclose(q / q.sum(-1, keepdims=True), mix, rtol=1e-5, atol=1e-7)


def test_fit_streams_from_object_storage_like_from_disk(world: World, tmp_path: Path, s3: str):
    url = "s3://caches/trainer/mnist.zarr"
    copy_store(str(world.store), url)
    trainer.fit([url], tmp_path / "s3", images=[world.corpus], **FAST)
    trainer.fit([world.store], tmp_path / "local", **FAST)
    assert _same_weights(tmp_path / "s3", tmp_path / "local")


def test_corrupted_chunk_stops_training_naming_the_chunk(world: World, tmp_path: Path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(world.store, bad)
    chunk = bad / "logits" / "c" / "3" / "0" / "0"
    flip_byte(chunk, 7, 0x10)
    with pytest.raises(IntegrityError, match=r"'logits' chunk\(s\) 3 "):
        trainer.fit([bad], tmp_path / "run", images=[world.corpus], **FAST)


def test_embedded_pixels_train_without_the_corpus(world: World, tmp_path: Path):
    corpus = tmp_path / "corpus"
    shutil.copytree(world.corpus, corpus)
    emb = tmp_path / "emb.zarr"
    logitstore.dump(str(world.teacher), str(corpus), str(emb), views=3, seed=1, chunk_rows=64, batch_size=128,
                    num_workers=0, crop_scale=(0.5, 1.0), embed_images=True)
    # Same rows, same views: embedded pixels equal the replayed crops of the files.
    with_files = open_stores([world.store_views], holdout=0)
    spec = make_input_spec(with_files.pre, None, 1)
    shutil.rmtree(corpus)  # the team that received the store has no corpus
    embedded = open_stores([emb], holdout=0)
    assert embedded.embedded
    req_files = next(with_files.requests(0, 32, seed=5))
    req_emb = next(embedded.requests(0, 32, seed=5))
    assert list(req_files.ids) == list(req_emb.ids)
    a = make_batches(with_files, spec, 1 << 26).source.__getitems__(req_files)["pixels"]
    b = make_batches(embedded, spec, 1 << 26).source.__getitems__(req_emb)["pixels"]
    assert torch.equal(a, b)
    # Training from the embedded pixels is training from the files: the same weights, bit for bit.
    trainer.fit([emb], tmp_path / "emb", **FAST)
    trainer.fit([world.store_views], tmp_path / "files", **FAST)
    assert _same_weights(tmp_path / "emb", tmp_path / "files")


def test_ensemble_of_a_stores_teachers(world: World, tmp_path: Path):
    from logitstore.teacher.add import add_teacher

    two = tmp_path / "two.zarr"
    shutil.copytree(world.store, two)
    second = save_teacher(tmp_path / "second.pt", arch="trainer.students:lenet", seed=4, num_classes=10,
                          in_channels=1)
    add_teacher(str(two), str(second), name="second", num_workers=0)
    data = open_stores([two], holdout=0, teachers=["primary", "second"], teacher_weights=[3, 1], temperature=2.0)
    req = next(data.requests(0, 16, seed=0))
    st = logitstore.open_store(two)
    rows = np.asarray(req.keys)
    t = np.stack([st.teacher_logits(n, 0, len(st))[rows, 0] for n in ("primary", "second")], axis=1)
    np.testing.assert_allclose(req.logits, ensemble_logits(t, np.array([0.75, 0.25]), 2.0), rtol=1e-5)
    res = trainer.fit([two], tmp_path / "run", teachers=["primary", "second"], teacher_weights=[0.5, 0.5],
                      images=[world.corpus], **FAST)
    assert np.isfinite(res.final["train_loss"])
    with pytest.raises(StoreMismatchError, match="has no teacher 'big'"):
        open_stores([two], teachers=["primary", "big"])
    with pytest.raises(ConfigError, match="one positive weight per teacher"):
        open_stores([two], teachers=["primary", "second"], teacher_weights=[1.0])
    # Another store whose "second" is another network: refused, naming both.
    other = tmp_path / "other.zarr"
    shutil.copytree(world.store, other)
    third = save_teacher(tmp_path / "third.pt", arch="trainer.students:lenet", seed=5, num_classes=10, in_channels=1)
    add_teacher(str(other), str(third), name="second", num_workers=0)
    with pytest.raises(StoreMismatchError, match="teacher 'second' is not the same network"):
        open_stores([two, other], teachers=["primary", "second"])


def test_a_merged_store_needs_images_when_it_has_no_single_root(world: World, tmp_path: Path):
    from logitstore.tools.combine import merge

    merged = tmp_path / "m.zarr"
    merge([str(world.store), str(world.store)], str(merged), prefixes=["x", "y"])
    with pytest.raises(ImageError, match="records no single corpus root"):
        open_stores([merged])
    both = tmp_path / "imgs"
    shutil.copytree(world.corpus, both / "x")
    shutil.copytree(world.corpus, both / "y")
    data = open_stores([merged], images=[both], holdout=0)
    assert len(data) == 2 * len(logitstore.open_store(world.store))
