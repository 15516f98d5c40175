"""Batched view replay is bit for bit the per-image replay that the dump used (the stored logits belong to
exactly those pixels): random originals, boxes, flips, sizes, every interpolation and crop rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from logitstore.schema import INTERPOLATION, Preprocess, ViewSpec
from logitstore.views import EVAL, RANDOM_RESIZED_CROP, apply_view, apply_views, sample_view_params

KERNELS = [dict(interpolation=INTERPOLATION)] + [
    dict(interpolation=i, antialias=a) for i in ("bilinear", "bicubic", "nearest") for a in (True, False)]


def _originals(rng: np.random.Generator, n: int, channels: int) -> list[torch.Tensor]:
    # A few shapes repeat, so that batches hold groups of several images as well as single ones.
    shapes = [(int(rng.integers(9, 70)), int(rng.integers(9, 70))) for _ in range(4)]
    out = []
    for i in range(n):
        h, w = shapes[i % 4] if i % 3 else (int(rng.integers(9, 70)), int(rng.integers(9, 70)))
        out.append(torch.from_numpy(rng.integers(0, 256, (channels, h, w), dtype=np.uint8)))
    return out


def _per_image(imgs, params, pre, kind, out_size):
    return torch.stack([apply_view(img, p, pre, kind, out_size) for img, p in zip(imgs, params)])


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: "-".join(str(v) for v in k.values()))
@pytest.mark.parametrize("channels", [1, 3])
def test_random_resized_crops_batched_are_the_per_image_replay(kernel: dict, channels: int):
    rng = np.random.default_rng(channels * 100 + len(str(kernel)))
    imgs = _originals(rng, 40, channels)
    views = ViewSpec(count=1, kind=RANDOM_RESIZED_CROP, scale=(0.08, 1.0))
    # A narrow scale range too, so that several crops share a height and width and are resized as one batch.
    narrow = ViewSpec(count=1, kind=RANDOM_RESIZED_CROP, scale=(0.9, 1.0), ratio=(1.0, 1.0))
    for spec in (views, narrow):
        params = np.stack([sample_view_params(img.shape[1], img.shape[2], spec, 3, f"img{i}")[0]
                           for i, img in enumerate(imgs)])
        assert params[:, 4].any() and not params[:, 4].all()          # some flipped, some not
        for size, out_size in (((24, 24), None), ((16, 20), None), ((24, 24), (13, 31))):
            pre = Preprocess(size=size, mode="L" if channels == 1 else "RGB", **kernel)
            got = apply_views(imgs, params, pre, RANDOM_RESIZED_CROP, out_size)
            assert got.dtype == torch.uint8
            assert torch.equal(got, _per_image(imgs, params, pre, RANDOM_RESIZED_CROP, out_size))
    groups = {tuple(p[2:4]) for p in params}
    assert len(groups) < len(params)                                   # batches of more than one happened


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: "-".join(str(v) for v in k.values()))
def test_eval_views_batched_are_the_per_image_replay(kernel: dict):
    rng = np.random.default_rng(7)
    imgs = _originals(rng, 30, 3)
    params = np.zeros((len(imgs), 5), np.int32)
    rules = ["center"] if kernel["interpolation"] == INTERPOLATION else ["center", "center_floor"]
    for resize in (None, 20, (23, 17)):
        for crop in rules:
            extra = {} if kernel["interpolation"] == INTERPOLATION else {"crop": crop}
            pre = Preprocess(size=(15, 18), resize=resize, **kernel, **extra)
            for out_size in (None, (21, 11)):
                got = apply_views(imgs, params, pre, EVAL, out_size)
                assert torch.equal(got, _per_image(imgs, params, pre, EVAL, out_size))


def test_an_empty_batch_is_refused():
    with pytest.raises(ValueError):
        apply_views([], np.zeros((0, 5), np.int32), Preprocess(size=(8, 8)), EVAL)
