"""Views: the eval transform, random resized crops, and their exact replay.

Both the dump and the trainer turn decoded uint8 pixels into inputs with these functions,
so a replayed view is bit-for-bit the input the teacher saw. Everything works on uint8
CHW tensors; normalisation to float happens last, on the batch.
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F
from torchvision.transforms import InterpolationMode

from .schema import Preprocess, ViewSpec

EVAL = "eval"
RANDOM_RESIZED_CROP = "random_resized_crop"
# 1.5: the same crops and flips, then augment_ops / erase_boxes / mix (logitstore.augment); every function
# here treats it as a random resized crop (only EVAL differs).
AUGMENTED_RESIZED_CROP = "augmented_resized_crop"


def _rng_for(seed: int, image_id: str) -> np.random.Generator:
    # Seeded per image (not per position in a run) so views do not depend on worker count,
    # batch boundaries or where an interrupted dump resumed.
    words = np.frombuffer(hashlib.sha256(image_id.encode("utf-8")).digest()[:16], dtype=np.uint32)
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, *words.tolist()]))


def sample_view_params(height: int, width: int, spec: ViewSpec, seed: int, image_id: str) -> np.ndarray:
    """[V, 5] int32 rows of (top, left, height, width, flip) in the decoded image's pixels."""
    if spec.kind == EVAL:
        return np.array([[0, 0, height, width, 0]], dtype=np.int32)
    rng = _rng_for(seed, image_id)
    out = np.empty((spec.count, 5), dtype=np.int32)
    for v in range(spec.count):
        top, left, h, w = _random_resized_crop_box(height, width, spec.scale, spec.ratio, rng)
        flip = int(rng.random() < spec.flip_prob)
        out[v] = (top, left, h, w, flip)
    return out


def _random_resized_crop_box(height: int, width: int, scale: tuple[float, float],
                             ratio: tuple[float, float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    # The Inception-style sampler (as torchvision's RandomResizedCrop), driven by our own RNG.
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# The 1.3 interpolations as torchvision names them. "nearest" is Pillow's nearest neighbour (pixel
# centres), which torchvision calls NEAREST_EXACT; its plain NEAREST rounds differently.
_MODES = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
          "nearest": InterpolationMode.NEAREST_EXACT}


def resize(img: torch.Tensor, size: list[int], pre: Preprocess | None = None) -> torch.Tensor:
    """The one resize of the pipeline, on uint8 [..., H, W]: to `size` [h, w], or [s] for the shorter
    side to s (the longer to int(s * long / short)).

    With `pre`, its interpolation and antialias; without, bilinear with antialiasing (the 1.0-1.2 resize,
    which is also what "bilinear-antialias" means).
    """
    if pre is None or pre.legacy:
        mode, antialias = InterpolationMode.BILINEAR, True
    else:
        mode, antialias = _MODES[pre.interpolation], bool(pre.antialias)
    return F.resize(img, list(size), interpolation=mode, antialias=antialias)


def center_crop(img: torch.Tensor, size: list[int], rule: str = "center") -> torch.Tensor:
    """The centre [H, W] of uint8 [..., h, w]; a side shorter than the crop is first padded with zeros,
    floor((H - h) / 2) before it. "center": offset round((h - H) / 2), halves to even (torchvision, timm);
    "center_floor": offset floor((h - H) / 2) (Hugging Face image processors)."""
    if rule == "center":
        return F.center_crop(img, list(size))
    (h, w), (ch, cw) = img.shape[-2:], size
    if ch > h or cw > w:
        dh, dw = max(0, ch - h), max(0, cw - w)
        img = F.pad(img, [dw // 2, dh // 2, (dw + 1) // 2, (dh + 1) // 2], fill=0)
        h, w = img.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    return img[..., top:top + ch, left:left + cw]


def apply_view(img: torch.Tensor, params: np.ndarray, pre: Preprocess, kind: str,
               out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 [C, H, W] original pixels -> uint8 [C, h, w] view, exactly as the teacher saw it.

    `out_size` (a student's input size) only changes the final resize.
    """
    size = list(pre.size)
    if kind == EVAL:
        if pre.resize is None:
            img = resize(img, size, pre)
        else:
            img = resize(img, [pre.resize] if isinstance(pre.resize, int) else list(pre.resize), pre)
            img = center_crop(img, size, pre.crop_rule)
        if out_size is not None and tuple(out_size) != tuple(size):
            img = resize(img, list(out_size), pre)
        return img
    top, left, h, w, flip = (int(x) for x in params)
    img = resize(img[:, top:top + h, left:left + w], list(out_size or size), pre)
    return img.flip(-1) if flip else img


def apply_views(imgs: Sequence[torch.Tensor], params: np.ndarray, pre: Preprocess, kind: str,
                out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 [N, C, h, w]: `apply_view` of each original with its row of `params`, bit for bit, with one
    resize call per group of equal-shaped inputs instead of one per image.

    torch's resize treats every image of a batch alone (the same kernel, the same arithmetic), so
    stacking equal-shaped crops changes no pixel: a group is the originals of one shape (eval views) or
    the crops of one height and width (random resized crops, flipped one by one afterwards).
    tests/test_views_batched.py checks it over random sizes, boxes, flips and every interpolation."""
    if len(imgs) == 0:
        raise ValueError("apply_views needs at least one image")
    if kind == EVAL:
        inputs = list(imgs)
    else:
        inputs = [img[:, int(p[0]):int(p[0]) + int(p[2]), int(p[1]):int(p[1]) + int(p[3])]
                  for img, p in zip(imgs, params)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(inputs):
        groups.setdefault(tuple(x.shape), []).append(i)
    out = None
    for idx in groups.values():
        batch = torch.stack([inputs[i] for i in idx]) if len(idx) > 1 else inputs[idx[0]][None]
        if kind == EVAL:
            views = apply_view(batch, np.zeros(5, np.int32), pre, kind, out_size)
        else:
            views = resize(batch, list(out_size or pre.size), pre)
        if out is None:
            out = torch.empty((len(inputs), *views.shape[1:]), dtype=views.dtype)
        out[idx] = views
    if kind != EVAL:
        flip = np.flatnonzero(np.asarray(params)[:, 4])
        if len(flip):
            out[flip] = out[flip].flip(-1)
    return out


def describe(pre: Preprocess) -> str:
    """One line a person can check against a model card: resize, crop, kernel, colour, normalisation."""
    kernel = "bilinear, antialias" if pre.legacy else f"{pre.interpolation}{', antialias' if pre.antialias else ''}"
    h, w = pre.size
    if pre.resize is None:
        steps = f"resize to {h}x{w} ({kernel})"
    else:
        first = (f"shorter side to {pre.resize}" if isinstance(pre.resize, int)
                 else f"resize to {pre.resize[0]}x{pre.resize[1]}")
        steps = f"{first} ({kernel}), centre crop {h}x{w}{' (floor)' if pre.crop_rule == 'center_floor' else ''}"
    nums = lambda v: "[" + ", ".join(f"{x:.4g}" for x in v) + "]"  # noqa: E731
    return f"{steps}; {pre.mode}; mean {nums(pre.mean)}, std {nums(pre.std)} (0-1 scale)"


def normalize(batch_u8: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 normalised with the recorded mean and std."""
    x = batch_u8.float().div_(255.0)
    mean = torch.tensor(pre.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)
