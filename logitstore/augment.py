"""Augmented views (format 1.5): RandAugment / TrivialAugmentWide, random erasing, mixup and cutmix, each
view's parameters drawn from the image's own seeded generator, stored, and replayed from the stored values.

The dump and the trainer build a view with the same functions here, on uint8 CHW tensors with
torchvision.transforms.v2's functional ops (never its random classes): `premix_views` (crop and flip,
then the ops, then erasing) for each image alone, then `mix_view` with the partner's pre-mix view of
the same index. Every stored parameter is an integer or a float32, so a replay is bit for bit the input
the teacher saw (docs/FORMAT.md, "1.5: augmented views").
"""
from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from . import schema
from .schema import AugmentPolicy, ErasingPolicy, MixPolicy, Preprocess, ViewSpec
from .views import apply_views

# A separate stream from the crops' (views._rng_for), so an augmented store's crops and flips are those
# of a plain store with the same seed.
_TAG_EXTRAS = 0xA5
# Ops whose magnitude takes a random sign (torchvision's "signed" flag).
SIGNED = frozenset({"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
                    "contrast", "sharpness"})
# Ops without a magnitude: TrivialAugmentWide draws no bin for them (as torchvision).
UNSIZED = frozenset({"identity", "autocontrast", "equalize"})
# CLI / library names -> stored kind.
AUGMENT_NAMES = {"rand-augment": "rand_augment", "trivial-augment": "trivial_augment_wide"}


def rng_for(seed: int, image_id: str) -> np.random.Generator:
    """The image's generator for its augmentation draws: seeded by (seed, id), like its crops, so the
    draws do not depend on workers, batches, processes or resumption."""
    words = np.frombuffer(hashlib.sha256(image_id.encode("utf-8")).digest()[:16], dtype=np.uint32)
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, *words.tolist(), _TAG_EXTRAS]))


@lru_cache(maxsize=256)
def _magnitudes(op: str, kind: str, bins: int, height: int, width: int) -> tuple[float, ...]:
    """The magnitude of each bin of `op`, as torchvision's RandAugment / TrivialAugmentWide tables."""
    wide = kind == "trivial_augment_wide"
    if op in UNSIZED:
        return (0.0,) * bins
    if op in ("shear_x", "shear_y"):
        t = torch.linspace(0.0, 0.99 if wide else 0.3, bins)
    elif op == "translate_x":
        t = torch.linspace(0.0, 32.0 if wide else 150.0 / 331.0 * width, bins)
    elif op == "translate_y":
        t = torch.linspace(0.0, 32.0 if wide else 150.0 / 331.0 * height, bins)
    elif op == "rotate":
        t = torch.linspace(0.0, 135.0 if wide else 30.0, bins)
    elif op in ("brightness", "color", "contrast", "sharpness"):
        t = torch.linspace(0.0, 0.99 if wide else 0.9, bins)
    elif op == "posterize":
        t = (8 - (torch.arange(bins) / ((bins - 1) / (6 if wide else 4)))).round().int()
    elif op == "solarize":
        t = 255.0 * torch.linspace(1.0, 0.0, bins)
    else:
        raise ValueError(f"unknown augmentation op {op!r}")
    return tuple(float(x) for x in t.tolist())


def magnitude(op: str, signed_bin: int, policy: AugmentPolicy, height: int, width: int) -> float:
    """A stored (signed) bin as the op's magnitude."""
    m = _magnitudes(op, policy.kind, policy.bins, height, width)[abs(int(signed_bin))]
    return -m if signed_bin < 0 else m


def apply_op(img: torch.Tensor, op: str, mag: float, fill: int = 0) -> torch.Tensor:
    """One op on uint8 [C, H, W], exactly as torchvision's auto-augment applies it."""
    nearest = InterpolationMode.NEAREST
    if op == "identity":
        return img
    if op == "shear_x":
        return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(mag)), 0.0],
                        interpolation=nearest, fill=fill, center=[0, 0])
    if op == "shear_y":
        return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(mag))],
                        interpolation=nearest, fill=fill, center=[0, 0])
    if op == "translate_x":
        return F.affine(img, angle=0.0, translate=[int(mag), 0], scale=1.0, shear=[0.0, 0.0],
                        interpolation=nearest, fill=fill)
    if op == "translate_y":
        return F.affine(img, angle=0.0, translate=[0, int(mag)], scale=1.0, shear=[0.0, 0.0],
                        interpolation=nearest, fill=fill)
    if op == "rotate":
        return F.rotate(img, angle=mag, interpolation=nearest, fill=fill)
    if op == "brightness":
        return F.adjust_brightness(img, 1.0 + mag)
    if op == "color":
        return F.adjust_saturation(img, 1.0 + mag)
    if op == "contrast":
        return F.adjust_contrast(img, 1.0 + mag)
    if op == "sharpness":
        return F.adjust_sharpness(img, 1.0 + mag)
    if op == "posterize":
        return F.posterize(img, int(mag))
    if op == "solarize":
        return F.solarize(img, mag)
    if op == "autocontrast":
        return F.autocontrast(img)
    if op == "equalize":
        return F.equalize(img)
    raise ValueError(f"unknown augmentation op {op!r}")


def augment_view(img: torch.Tensor, ops: np.ndarray, policy: AugmentPolicy) -> torch.Tensor:
    """uint8 [C, H, W] -> the view after its stored ops ([K, 2] op index, signed bin), in order."""
    h, w = int(img.shape[-2]), int(img.shape[-1])
    for op_index, signed_bin in np.asarray(ops).tolist():
        op = policy.ops[op_index]
        img = apply_op(img, op, magnitude(op, signed_bin, policy, h, w), policy.fill)
    return img


def erase_view(img: torch.Tensor, box: np.ndarray) -> torch.Tensor:
    """uint8 [C, H, W] with the stored box (top, left, height, width, fill) set to its constant fill."""
    t, l, h, w, fill = (int(x) for x in box)
    if h <= 0 or w <= 0:
        return img
    img = img.clone()
    img[:, t:t + h, l:l + w] = fill
    return img


def mix_view(a: torch.Tensor, b: torch.Tensor, lam: float, box: Sequence[int]) -> torch.Tensor:
    """The view `a` mixed with its partner's view `b` (uint8, same shape): cutmix pastes b's box
    (top, left, height, width) into a; mixup (an empty box) is round(lam * a + (1 - lam) * b) in float32."""
    t, l, h, w = (int(x) for x in box)
    if h > 0 and w > 0:
        out = a.clone()
        out[..., t:t + h, l:l + w] = b[..., t:t + h, l:l + w]
        return out
    lam_t = torch.tensor(lam, dtype=torch.float32)
    # Two multiplies and an add as separate float32 kernels (never fused), so any caller gets the same bits.
    mixed = a.float().mul(lam_t).add_(b.float().mul(torch.tensor(1.0, dtype=torch.float32).sub(lam_t)))
    return mixed.round_().clamp_(0, 255).to(torch.uint8)


def premix_views(imgs: Sequence[torch.Tensor], params: np.ndarray, ops: np.ndarray | None,
                 erase: np.ndarray | None, pre: Preprocess, spec: ViewSpec) -> torch.Tensor:
    """uint8 [n, C, H, W] at the teacher's size: each original's stored crop and flip (batched,
    views.apply_views), then its stored ops, then its erasing box; everything before mixing."""
    out = apply_views(imgs, params, pre, spec.kind)
    if ops is None and erase is None:
        return out
    for i in range(len(out)):
        view = out[i]
        if ops is not None and spec.augment is not None:
            view = augment_view(view, ops[i], spec.augment)
        if erase is not None:
            view = erase_view(view, erase[i])
        out[i] = view
    return out


# -- drawing (dump side) --------------------------------------------------------------------------
def _draw_ops(rng: np.random.Generator, policy: AugmentPolicy) -> list[tuple[int, int]]:
    out = []
    wide = policy.kind == "trivial_augment_wide"
    for _ in range(policy.num_ops):
        op_index = int(rng.integers(len(policy.ops)))
        op = policy.ops[op_index]
        b = 0 if op in UNSIZED else int(rng.integers(policy.bins)) if wide else policy.magnitude
        if op in SIGNED and rng.random() < 0.5:
            b = -b
        out.append((op_index, b))
    return out


def _draw_erase(rng: np.random.Generator, policy: ErasingPolicy, height: int, width: int) -> tuple[int, ...]:
    # torchvision's RandomErasing.get_params, driven by the image's generator; (0, 0, 0, 0) when not erased.
    if rng.random() >= policy.prob:
        return 0, 0, 0, 0, policy.fill
    area = height * width
    log_ratio = (math.log(policy.ratio[0]), math.log(policy.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(policy.scale[0], policy.scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < h < height and 0 < w < width:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w, policy.fill
    return 0, 0, 0, 0, policy.fill


def _draw_mix(rng: np.random.Generator, policy: MixPolicy, height: int, width: int
              ) -> tuple[tuple[int, int, int, int], np.float32, float]:
    """(cutmix box, lambda, partner draw u in [0, 1)); u = -1 when the view is not mixed."""
    if rng.random() >= policy.prob:
        return (0, 0, 0, 0), np.float32(1.0), -1.0
    if policy.mixup_alpha > 0 and policy.cutmix_alpha > 0:
        cut = bool(rng.random() < policy.switch_prob)
    else:
        cut = policy.cutmix_alpha > 0
    alpha = policy.cutmix_alpha if cut else policy.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    box = (0, 0, 0, 0)
    if cut:  # timm's rand_bbox, then lambda corrected to the box's true area
        rat = math.sqrt(1.0 - lam)
        ch, cw = int(height * rat), int(width * rat)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        y0, y1 = int(np.clip(cy - ch // 2, 0, height)), int(np.clip(cy + ch // 2, 0, height))
        x0, x1 = int(np.clip(cx - cw // 2, 0, width)), int(np.clip(cx + cw // 2, 0, width))
        box = (y0, x0, y1 - y0, x1 - x0)
        lam = 1.0 - (box[2] * box[3]) / float(height * width)
    return box, np.float32(lam), float(rng.random())


def sample_extras(spec: ViewSpec, seed: int, image_id: str, size: Sequence[int]
                  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The image's 1.5 view arrays ([V, ...] each, schema.view_extra_arrays) and, for mixing, each view's
    partner draw u ([V] float64, -1 where the view is not mixed): the partner is settled with the other
    images of its mix group (`mix_group`), once the dump knows which of them could be read."""
    height, width = int(size[0]), int(size[1])
    v = spec.count
    rng = rng_for(seed, image_id)
    shapes = schema.view_extra_arrays(spec)
    out = {name: np.zeros((v, *tail), dtype) for name, (tail, dtype) in shapes.items()}
    u = np.full(v, -1.0)
    for i in range(v):
        if spec.augment is not None:
            out[schema.AUGMENT_OPS][i] = _draw_ops(rng, spec.augment)
        if spec.erasing is not None:
            out[schema.ERASE_BOXES][i] = _draw_erase(rng, spec.erasing, height, width)
        if spec.mix is not None:
            box, lam, u[i] = _draw_mix(rng, spec.mix, height, width)
            out[schema.MIX_PARAMS][i, 1:] = box
            out[schema.MIX_LAMBDA][i] = lam
    return out, u


def partner_rank(u: float, rank: int, n: int) -> int:
    """The partner of the member of rank `rank` among the n readable images of its mix group, from its
    draw u in [0, 1): another member, uniformly; -1 (not mixed) for u < 0 or a group of one."""
    if u < 0 or n < 2:
        return -1
    j = min(int(u * (n - 1)), n - 2)
    return j if j < rank else j + 1


def mix_group(premix: Sequence[torch.Tensor], partner_u: np.ndarray, mix: np.ndarray, lam: np.ndarray,
              rows: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
    """One mix group of the dump: the pre-mix views [V, C, H, W] of its readable images in listing order,
    their partner draws [n, V] and mix arrays ([n, V, 5], [n, V]: partner offsets set here in place, box
    and lambda cleared where a view is not mixed) -> {rank: that image's views as the teacher sees them},
    for the members `rows` (all by default)."""
    n = len(premix)
    out = {}
    for r in (range(n) if rows is None else rows):
        views = premix[r]
        mixed = None
        for v in range(views.shape[0]):
            p = partner_rank(float(partner_u[r, v]), r, n)
            if p < 0:
                mix[r, v] = 0
                lam[r, v] = np.float32(1.0)
                continue
            mix[r, v, 0] = p - r
            mixed = views.clone() if mixed is None else mixed
            mixed[v] = mix_view(views[v], premix[p][v], float(lam[r, v]), mix[r, v, 1:])
        out[r] = views if mixed is None else mixed
    return out


def describe_policy(spec: ViewSpec) -> str:
    """One line: the augmentations a store's views carry (for `info` and reports)."""
    parts = []
    if spec.augment is not None:
        a = spec.augment
        parts.append(f"{a.kind} ({a.num_ops} op(s), magnitude {a.magnitude}/{a.bins - 1})"
                     if a.kind == "rand_augment" else f"{a.kind} ({a.bins} bins)")
    if spec.erasing is not None:
        parts.append(f"erasing p={spec.erasing.prob:g}")
    if spec.mix is not None:
        m = spec.mix
        parts.append(f"mix (mixup {m.mixup_alpha:g}, cutmix {m.cutmix_alpha:g}, p={m.prob:g})")
    return ", ".join(parts) or "none"
