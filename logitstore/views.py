"""Views: the eval transform, random resized crops, and their exact replay.

Both the dump and the trainer turn decoded uint8 pixels into inputs with these functions,
so a replayed view is bit-for-bit the input the teacher saw. Everything works on uint8
CHW tensors; normalisation to float happens last, on the batch.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F
from torchvision.transforms import InterpolationMode

from .schema import Preprocess, ViewSpec

EVAL = "eval"
RANDOM_RESIZED_CROP = "random_resized_crop"


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


def resize(img: torch.Tensor, size: list[int]) -> torch.Tensor:
    """The one resize of the pipeline: bilinear with antialiasing, on uint8 [..., H, W]."""
    return F.resize(img, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)


def apply_view(img: torch.Tensor, params: np.ndarray, pre: Preprocess, kind: str,
               out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 [C, H, W] original pixels -> uint8 [C, h, w] view, exactly as the teacher saw it.

    `out_size` (a student's input size) only changes the final resize.
    """
    size = list(pre.size)
    if kind == EVAL:
        if pre.resize is not None:
            img = F.center_crop(resize(img, [pre.resize]), size)
        else:
            img = resize(img, size)
        if out_size is not None and tuple(out_size) != tuple(size):
            img = resize(img, list(out_size))
        return img
    top, left, h, w, flip = (int(x) for x in params)
    img = resize(img[:, top:top + h, left:left + w], list(out_size or size))
    return img.flip(-1) if flip else img


def normalize(batch_u8: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 normalised with the recorded mean and std."""
    x = batch_u8.float().div_(255.0)
    mean = torch.tensor(pre.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)
