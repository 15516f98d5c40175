"""The store's schema: array names, attribute keys, format version and validation.

This is the only module that spells them; docs/FORMAT.md is the normative text and the
two change together.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import FormatError

FORMAT_MAJOR = 1
FORMAT_MINOR = 5
FORMAT_VERSION = f"{FORMAT_MAJOR}.{FORMAT_MINOR}"
# 1.1 added sparse teacher targets (`targets`); 1.2 added the metadata checksum
# (fingerprints["metadata"]), which a complete 1.2 store must carry; 1.3 added the registries'
# preprocessing (interpolation, antialias, crop rule, a [h, w] resize); 1.4 chunk records and stored
# statistics (RECORDS_SINCE below), row sources (corpus.source) and failure arrays that grow while
# writing. 1.5 added augmented views (views.augment / erasing / mix and their row arrays, AUGMENTED_SINCE);
# a store that uses none of them is still written as 1.4, so 1.4 readers keep reading it.
AUGMENTED_SINCE = (1, 5)
METADATA_CHECKSUM_SINCE = (1, 2)
SIZES_CHECKED_SINCE = (1, 3)  # readers refuse impossible image and view sizes (R6) in stores from 1.3 on
UNSEALED_KEYS = ("created", "versions")  # provenance, outside the checksum
# 1.4 (chunk records): a SHA-256 per chunk of rows and row array, recorded as the chunk is written,
# and statistics kept at write time; fingerprints.contents is over the records (docs/FORMAT.md).
RECORDS_SINCE = (1, 4)

# Bounds a reader enforces before it allocates anything from metadata (docs/FORMAT.md, R3).
MAX_SIDE = 4096            # teacher input height / width, pixels
MAX_RESIZE = 8192          # shorter side before the centre crop
MAX_VIEWS = 1024           # views per image
MAX_CLASSES = 1 << 20      # classes (outputs) of a teacher
MAX_ROW_LOGITS = 1 << 24   # views x classes per image
MAX_CHUNK_ROWS = 1 << 20
MAX_TEXT = 4096            # characters of any free-text attribute (paths, names, versions)

# Root group attribute that holds all of our metadata (namespaced so other tools may add theirs).
ATTR_ROOT = "logitstore"
# Updated at every committed chunk while a dump runs; removed when the store is complete.
ATTR_PROGRESS = "logitstore_progress"
# A distributed dump's progress: it writes segments of the listing under SEGMENTS/ first, then
# assembles them into the row arrays (docs/DESIGN.md, "Distributed writing").
PROGRESS_SEGMENT_ROWS = "segment_rows"
PROGRESS_PHASE = "phase"
PROGRESS_N_FAILURES = "n_failures"  # 1.4: entries of the failure arrays that are final (W2)
PHASE_SEGMENTS, PHASE_ASSEMBLY, PHASE_ASSEMBLED = "segments", "assembly", "assembled"
SEGMENTS = "_segments"

# Arrays. Every array is chunked along its first axis with the same number of rows.
LOGITS = "logits"            # [N, V, C] float16 | float32, raw pre-softmax
IDS = "ids"                  # [N] string, path relative to the corpus root (POSIX)
DIGESTS = "digests"          # [N, 32] uint8, sha256 of the file bytes
IMAGE_HW = "image_hw"        # [N, 2] int32, decoded height, width (after EXIF orientation)
VIEW_PARAMS = "view_params"  # [N, V, 5] int32: top, left, height, width, flip
PIXELS = "pixels"            # [N, V, ch, H, W] uint8, only with --embed-images
# 1.5 augmented views (docs/FORMAT.md, "1.5: augmented views"); each only where its policy is recorded.
AUGMENT_OPS = "augment_ops"  # [N, V, K, 2] int8: op index into views.augment.ops, signed magnitude bin
ERASE_BOXES = "erase_boxes"  # [N, V, 5] int16: top, left, height, width, fill; height 0 = not erased
MIX_PARAMS = "mix_params"    # [N, V, 5] int16: partner row offset (0 = not mixed), cutmix top, left, height, width
MIX_LAMBDA = "mix_lambda"    # [N, V] float32: weight of the row's own view (1 where not mixed)
TEACHERS = "teachers"        # group: teachers/<name>/logits [N, V, C], added teachers
FAILED_IDS = "failed_ids"    # [F] string
FAILED_REASONS = "failed_reasons"  # [F] string
CHUNK_SHA256 = "chunk_sha256"  # 1.4: [K, A, 32] uint8, SHA-256 of each chunk of rows of each row array
RECORDS_PER_CHUNK = 64         # records per chunk of CHUNK_SHA256
STATISTICS = "statistics"      # 1.4: root attribute key, the first view's prediction statistics
STAT_BINS = 1000               # fine histogram bins kept (info derives 20-bin ones and percentiles)

ROW_ARRAYS = (LOGITS, IDS, DIGESTS, IMAGE_HW, VIEW_PARAMS)  # LOGITS: full-logits stores; PIXELS when embedded
# Sparse teacher targets (format 1.1, `targets` attribute) replace LOGITS; see logitstore/sparse.py.
TARGET_LOGITS, TARGET_TOPK, TARGET_SAMPLE = "logits", "topk", "sample"
TOPK_VALUES = "topk_values"          # [N, V, K] dtype: the K largest logits, descending
TOPK_INDICES = "topk_indices"        # [N, V, K] uint16 | uint32: their classes
TAIL_LSE = "tail_lse"                # [N, V, T] float32: logsumexp of z/T_r over the other classes
SAMPLE_INDICES = "sample_indices"    # [N, V, K] uint16 | uint32: distinct sampled classes (padded)
SAMPLE_COUNTS = "sample_counts"      # [N, V, K] uint16: draws per class, 0 = padding
SAMPLE_LOGITS = "sample_logits"      # [N, V, K] dtype: their logits
SAMPLE_PROPOSAL = "sample_proposal"  # [N, V, K] float32: proposal probability q
LSE = "lse"                          # [N, V, T] float32: logsumexp of z/T_r over all classes
PRIMARY_TEACHER = "primary"
PIXEL_CHUNK_BYTES = 4 << 20
FAILURE_ARRAYS = (FAILED_IDS, FAILED_REASONS)
VIEW_FIELDS = ("top", "left", "height", "width", "flip")

LOGIT_DTYPES = ("float16", "float32")
MANTISSA_BITS = {"float16": 10, "float32": 23}
FLOAT16_MAX = 65504.0


def float16_limit(keep_bits: int | None) -> float:
    """The largest |logit| storable as float16: with BitRound keeping `keep_bits` mantissa bits, the
    largest such float16 (anything above it may round up to inf)."""
    if keep_bits is None:
        return FLOAT16_MAX
    return 2.0 ** 15 * (2.0 - 2.0 ** -keep_bits)
VIEW_KINDS = ("eval", "random_resized_crop", "augmented_resized_crop")
# 1.5: random resized crops followed by augment / erasing / mix. A kind of its own (not optional keys of
# random_resized_crop) so that a 1.4 reader refuses the store under R3 instead of training on crops alone.
AUGMENTED_RESIZED_CROP = "augmented_resized_crop"
# 1.5: the augmentation ops a store may name (views.augment.ops), in torchvision's RandAugment order.
AUGMENT_OPS_KNOWN = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
                     "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
AUGMENT_KINDS = ("rand_augment", "trivial_augment_wide")
AUGMENT_BINS = 31
MIX_PARTNER_RULES = ("group",)  # the partner is another row of the same group of `group` listing positions
MAX_MIX_GROUP = 4096
MODES = ("RGB", "L")
# The one resize of 1.0-1.2, still valid: bilinear with antialiasing, centre crop as "center". It
# carries no `antialias` or `crop` key, so older stores and checkpoints keep their bytes and checksums.
INTERPOLATION = "bilinear-antialias"
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # 1.3, with `antialias` and `crop`
CROPS = ("center", "center_floor")  # offset round((h - H) / 2), halves to even | floor((h - H) / 2)



# -- strict attribute types (docs/FORMAT.md, R3): a boolean is a boolean, a count an integer ---------
def whole(v: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise FormatError(f"attribute {name} = {str(v)[:40]!r} must be an integer in {lo}..{hi} (docs/FORMAT.md, R3)")
    return v


def number(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise FormatError(f"attribute {name} = {str(v)[:40]!r} must be a finite number (docs/FORMAT.md, R3)")
    return float(v)


def numbers(v: Any, name: str, n: int | None = None) -> tuple[float, ...]:
    if not isinstance(v, (list, tuple)) or (n is not None and len(v) != n) or len(v) > 64:
        raise FormatError(f"attribute {name} must be a list of {n or 'up to 64'} numbers (docs/FORMAT.md, R3)")
    return tuple(number(x, name) for x in v)


def text(v: Any, name: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise FormatError(f"attribute {name} must be a string of at most {limit} characters (docs/FORMAT.md, R3)")
    return v


def flag(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise FormatError(f"attribute {name} = {str(v)[:40]!r} must be true or false (docs/FORMAT.md, R3)")
    return v


def class_names(v: Any) -> tuple[str, ...]:
    """classes: a list of 1..MAX_CLASSES unique, non-empty strings."""
    if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= MAX_CLASSES or \
            not all(isinstance(c, str) and 0 < len(c) <= MAX_TEXT for c in v) or len(set(v)) != len(v):
        raise FormatError(f"classes must be a list of 1..{MAX_CLASSES} unique non-empty names (docs/FORMAT.md, R3)")
    return tuple(v)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the teacher's input (views.py does the exact steps; docs/FORMAT.md, Views).

    `resize`: None (resize straight to `size`), an int (the shorter side to it, aspect kept) or
    (h, w) (both sides, aspect not kept); then the centre `size` is cropped by the `crop` rule.
    `interpolation` "bilinear-antialias" is the 1.0-1.2 resize (bilinear, antialiased, crop "center")
    and has no `antialias` or `crop`; "bilinear", "bicubic" and "nearest" (1.3) always have both.
    """

    size: tuple[int, int]
    resize: int | tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    mode: str = "RGB"
    interpolation: str = INTERPOLATION
    antialias: bool | None = None   # 1.3 interpolations; default: True except for "nearest"
    crop: str | None = None         # 1.3 interpolations; default: "center"

    def __post_init__(self) -> None:
        if isinstance(self.resize, list):
            object.__setattr__(self, "resize", tuple(self.resize))
        if self.interpolation in INTERPOLATIONS:
            if self.antialias is None:
                object.__setattr__(self, "antialias", self.interpolation != "nearest")
            if self.crop is None:
                object.__setattr__(self, "crop", "center")

    @property
    def channels(self) -> int:
        return 3 if self.mode == "RGB" else 1

    @property
    def legacy(self) -> bool:
        """The 1.0-1.2 resize, recorded as "bilinear-antialias"."""
        return self.interpolation == INTERPOLATION

    @property
    def crop_rule(self) -> str:
        return "center" if self.legacy else str(self.crop)

    def to_dict(self) -> dict[str, Any]:
        d = {"size": list(self.size), "resize": list(self.resize) if isinstance(self.resize, tuple) else self.resize,
             "mean": list(self.mean), "std": list(self.std), "mode": self.mode, "interpolation": self.interpolation}
        if not self.legacy:
            d.update(antialias=self.antialias, crop=self.crop)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        try:
            size = d["size"]
            if isinstance(size, int) and not isinstance(size, bool):
                size = [size, size]
            if not isinstance(size, (list, tuple)) or len(size) != 2:
                raise ValueError("size must be [H, W]")
            mode = text(d.get("mode", "RGB"), "preprocess.mode", 8)
            channels = 3 if mode == "RGB" else 1
            interpolation = text(d.get("interpolation", INTERPOLATION), "preprocess.interpolation", 64)
            if interpolation == INTERPOLATION and ("antialias" in d or "crop" in d):
                raise FormatError(f"preprocess interpolation {INTERPOLATION!r} takes no antialias or crop "
                                  "(it is bilinear, antialiased, centre crop); write interpolation 'bilinear' "
                                  "to give them (docs/FORMAT.md, R3)")
            pre = cls(size=tuple(whole(x, "preprocess.size", 1, MAX_SIDE) for x in size),
                      resize=_resize_rule(d.get("resize")),
                      mean=numbers(d.get("mean", [0.0] * channels), "preprocess.mean"),
                      std=numbers(d.get("std", [1.0] * channels), "preprocess.std"), mode=mode,
                      interpolation=interpolation,
                      antialias=None if d.get("antialias") is None else flag(d["antialias"], "preprocess.antialias"),
                      crop=None if d.get("crop") is None else text(d["crop"], "preprocess.crop", 32))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise FormatError(f"preprocess {str(d)[:300]} is malformed ({exc}); it needs size [H, W], "
                              "and optionally resize, mean, std, mode, interpolation, antialias, crop") from None
        pre.check()
        return pre

    def check(self) -> None:
        if self.mode not in MODES:
            raise FormatError(f"preprocess mode {self.mode!r} is not one of {', '.join(MODES)}")
        sides = () if self.resize is None else (self.resize,) if isinstance(self.resize, int) else tuple(self.resize)
        if not (1 <= min(self.size) and max(self.size) <= MAX_SIDE) or len(sides) not in (0, 1, 2) or \
                not all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= MAX_RESIZE for r in sides):
            raise FormatError(f"preprocess size {list(self.size)} / resize {self.resize} must be in 1..{MAX_SIDE} "
                              f"(resize 1..{MAX_RESIZE}, one side or [h, w]) pixels (docs/FORMAT.md, R3)")
        for name, vals in (("mean", self.mean), ("std", self.std)):
            if len(vals) not in (1, self.channels):
                need = "1 value" if self.channels == 1 else f"1 or {self.channels} values"
                raise FormatError(f"preprocess {name} has {len(vals)} values; mode {self.mode} needs {need} "
                                  "(pass --mean and --std for the mode, or the teacher's --mode)")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)) or any(s < 1e-6 for s in self.std):
            raise FormatError(f"preprocess mean {list(self.mean)} / std {list(self.std)} must be finite, "
                              "with every std >= 1e-6 (docs/FORMAT.md, R3)")
        if self.legacy:
            if self.antialias is not None or self.crop is not None or not isinstance(self.resize, (int, type(None))):
                raise FormatError(f"preprocess interpolation {INTERPOLATION!r} takes no antialias or crop, and "
                                  "resize is one side or null (docs/FORMAT.md, R3)")
            return
        if self.interpolation not in INTERPOLATIONS:
            raise FormatError(f"preprocess interpolation {self.interpolation!r} is not understood (this reader "
                              f"knows {', '.join(map(repr, (*INTERPOLATIONS, INTERPOLATION)))})")
        if not isinstance(self.antialias, bool) or (self.interpolation == "nearest" and self.antialias):
            raise FormatError(f"preprocess antialias {self.antialias!r} must be true or false (false with "
                              "'nearest') (docs/FORMAT.md, R3)")
        if self.crop not in CROPS:
            raise FormatError(f"preprocess crop {self.crop!r} is not one of {', '.join(CROPS)} (docs/FORMAT.md, R3)")


def _resize_rule(v: Any) -> int | tuple[int, int] | None:
    """`resize`: null, one side (the shorter) or [h, w]."""
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise FormatError(f"preprocess resize {str(v)[:40]} must be one side or [h, w] (docs/FORMAT.md, R3)")
        return tuple(whole(x, "preprocess.resize", 1, MAX_RESIZE) for x in v)  # type: ignore[return-value]
    return whole(v, "preprocess.resize", 1, MAX_RESIZE)


@dataclass(frozen=True)
class ViewSpec:
    """Which views were stored: the deterministic eval view, or V random resized crops."""

    count: int = 1
    kind: str = "eval"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    # 1.5: augmented views (docs/FORMAT.md, "1.5: augmented views"); None where not used, and then not written.
    augment: "AugmentPolicy | None" = None
    erasing: "ErasingPolicy | None" = None
    mix: "MixPolicy | None" = None

    @property
    def augmented(self) -> bool:
        """Whether any 1.5 augmentation is recorded (the row arrays of view_extra_arrays exist)."""
        return self.augment is not None or self.erasing is not None or self.mix is not None

    def to_dict(self) -> dict[str, Any]:
        d = {"count": self.count, "kind": self.kind, "scale": list(self.scale),
             "ratio": list(self.ratio), "flip_prob": self.flip_prob}
        for key in ("augment", "erasing", "mix"):  # additive: a 1.4 store's dict (and checksum) is unchanged
            if getattr(self, key) is not None:
                d[key] = getattr(self, key).to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ViewSpec":
        spec = cls(count=whole(d["count"], "views.count", 1, MAX_VIEWS), kind=text(d["kind"], "views.kind"),
                   scale=numbers(d["scale"], "views.scale", 2), ratio=numbers(d["ratio"], "views.ratio", 2),
                   flip_prob=number(d["flip_prob"], "views.flip_prob"))
        if not (0 < spec.scale[0] <= spec.scale[1] <= 1 and 0 < spec.ratio[0] <= spec.ratio[1] <= 1e3
                and 0 <= spec.flip_prob <= 1):
            raise FormatError(f"views {d} out of range: 0 < scale <= 1, 0 < ratio, 0 <= flip_prob <= 1 "
                              "(docs/FORMAT.md, R3)")
        if spec.kind not in VIEW_KINDS:
            raise FormatError(f"views kind {spec.kind!r} is not understood (known: {', '.join(VIEW_KINDS)})")
        if spec.count < 1 or (spec.kind == "eval" and spec.count != 1):
            raise FormatError(f"views count {spec.count} does not fit kind {spec.kind!r}")
        extras = {k: d[k] for k in ("augment", "erasing", "mix") if d.get(k) is not None}
        if (spec.kind == AUGMENTED_RESIZED_CROP) != bool(extras):
            raise FormatError(f"views kind {spec.kind!r} does not fit its augment/erasing/mix objects "
                              f"({', '.join(extras) or 'none'}): {AUGMENTED_RESIZED_CROP} goes with at least one "
                              "of them, other kinds with none (docs/FORMAT.md, 1.5: augmented views)")
        if extras:
            spec = dataclasses.replace(
                spec, augment=AugmentPolicy.from_dict(extras["augment"]) if "augment" in extras else None,
                erasing=ErasingPolicy.from_dict(extras["erasing"]) if "erasing" in extras else None,
                mix=MixPolicy.from_dict(extras["mix"]) if "mix" in extras else None)
        return spec


def _policy(d: Any, name: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A 1.5 policy object: exactly `keys`, nothing this reader does not understand (R3)."""
    if not isinstance(d, dict) or set(d) != set(keys):
        got = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise FormatError(f"views.{name} must be an object with exactly {', '.join(keys)} (got {got}; "
                          "docs/FORMAT.md, 1.5: augmented views)")
    return d


@dataclass(frozen=True)
class AugmentPolicy:
    """views.augment (1.5): RandAugment or TrivialAugmentWide; each view's ops and magnitude bins are stored
    in AUGMENT_OPS as indices into `ops`."""

    kind: str                 # rand_augment | trivial_augment_wide
    num_ops: int              # ops per view (K); 1 for trivial_augment_wide
    magnitude: int            # rand_augment: the bin of every op (0..bins-1); trivial_augment_wide: 0 (drawn per op)
    bins: int = AUGMENT_BINS
    ops: tuple[str, ...] = AUGMENT_OPS_KNOWN
    fill: int = 0             # pixels uncovered by a geometric op

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_ops": self.num_ops, "magnitude": self.magnitude, "bins": self.bins,
                "ops": list(self.ops), "fill": self.fill}

    @classmethod
    def from_dict(cls, d: Any) -> "AugmentPolicy":
        d = _policy(d, "augment", ("kind", "num_ops", "magnitude", "bins", "ops", "fill"))
        kind = text(d["kind"], "views.augment.kind", 64)
        if kind not in AUGMENT_KINDS:
            raise FormatError(f"views.augment kind {kind!r} is not understood (known: {', '.join(AUGMENT_KINDS)}; "
                              "docs/FORMAT.md, 1.5: augmented views)")
        ops = d["ops"]
        if not isinstance(ops, list) or not 1 <= len(ops) <= 64:
            raise FormatError("views.augment.ops must be a list of 1..64 op names (docs/FORMAT.md, R3)")
        unknown = [o for o in ops if o not in AUGMENT_OPS_KNOWN]
        if unknown:
            raise FormatError(f"views.augment op {str(unknown[0])[:40]!r} is not understood (known: "
                              f"{', '.join(AUGMENT_OPS_KNOWN)}); use a logitstore release that knows it")
        bins = whole(d["bins"], "views.augment.bins", 2, 127)
        return cls(kind, whole(d["num_ops"], "views.augment.num_ops", 1, 16),
                   whole(d["magnitude"], "views.augment.magnitude", 0, bins - 1), bins, tuple(ops),
                   whole(d["fill"], "views.augment.fill", 0, 255))


@dataclass(frozen=True)
class ErasingPolicy:
    """views.erasing (1.5): random erasing, each view's box and constant fill stored in ERASE_BOXES."""

    prob: float
    scale: tuple[float, float] = (0.02, 0.33)
    ratio: tuple[float, float] = (0.3, 3.3)
    fill: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"prob": self.prob, "scale": list(self.scale), "ratio": list(self.ratio), "fill": self.fill}

    @classmethod
    def from_dict(cls, d: Any) -> "ErasingPolicy":
        d = _policy(d, "erasing", ("prob", "scale", "ratio", "fill"))
        out = cls(number(d["prob"], "views.erasing.prob"), numbers(d["scale"], "views.erasing.scale", 2),
                  numbers(d["ratio"], "views.erasing.ratio", 2), whole(d["fill"], "views.erasing.fill", 0, 255))
        if not (0 < out.prob <= 1 and 0 < out.scale[0] <= out.scale[1] <= 1 and 0 < out.ratio[0] <= out.ratio[1]):
            raise FormatError(f"views.erasing {d} out of range: 0 < prob <= 1, 0 < scale <= 1, 0 < ratio "
                              "(docs/FORMAT.md, R3)")
        return out


@dataclass(frozen=True)
class MixPolicy:
    """views.mix (1.5): mixup and cutmix with another row; partner, box and lambda stored per view."""

    mixup_alpha: float
    cutmix_alpha: float
    prob: float = 1.0
    switch_prob: float = 0.5       # with both on: the share of mixed views that use cutmix
    partner: str = "group"
    group: int = 64                # listing positions [k * group, (k + 1) * group) mix among themselves

    def to_dict(self) -> dict[str, Any]:
        return {"mixup_alpha": self.mixup_alpha, "cutmix_alpha": self.cutmix_alpha, "prob": self.prob,
                "switch_prob": self.switch_prob, "partner": self.partner, "group": self.group}

    @classmethod
    def from_dict(cls, d: Any) -> "MixPolicy":
        d = _policy(d, "mix", ("mixup_alpha", "cutmix_alpha", "prob", "switch_prob", "partner", "group"))
        out = cls(number(d["mixup_alpha"], "views.mix.mixup_alpha"), number(d["cutmix_alpha"], "views.mix.cutmix_alpha"),
                  number(d["prob"], "views.mix.prob"), number(d["switch_prob"], "views.mix.switch_prob"),
                  text(d["partner"], "views.mix.partner", 64), whole(d["group"], "views.mix.group", 2, MAX_MIX_GROUP))
        if out.partner not in MIX_PARTNER_RULES:
            raise FormatError(f"views.mix partner {out.partner!r} is not understood (known: "
                              f"{', '.join(MIX_PARTNER_RULES)}; docs/FORMAT.md, 1.5: augmented views)")
        if not (out.mixup_alpha >= 0 and out.cutmix_alpha >= 0 and out.mixup_alpha + out.cutmix_alpha > 0
                and 0 < out.prob <= 1 and 0 <= out.switch_prob <= 1):
            raise FormatError(f"views.mix {d} out of range: alphas >= 0, one of them > 0, 0 < prob <= 1, "
                              "0 <= switch_prob <= 1 (docs/FORMAT.md, R3)")
        return out


def view_extra_arrays(views: ViewSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """1.5: name -> (shape after [N, V], dtype) of the row arrays an augmented view policy adds, in hashing order."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    if views.augment is not None:
        out[AUGMENT_OPS] = ((views.augment.num_ops, 2), "int8")
    if views.erasing is not None:
        out[ERASE_BOXES] = ((5,), "int16")
    if views.mix is not None:
        out[MIX_PARAMS] = ((5,), "int16")
        out[MIX_LAMBDA] = ((), "float32")
    return out


@dataclass(frozen=True)
class TeacherInfo:
    arch: str               # "torchvision:resnet18", "pkg.mod:factory", "torchscript", "torch.export"
    source: str             # checkpoint | torchscript | export | factory
    file: str               # the file the weights came from (as given)
    sha256: str             # of that file's bytes
    arch_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """fingerprints.teacher: which network, by architecture, its arguments and its weights' hash."""
        doc = json.dumps({"arch": self.arch, "sha256": self.sha256, "arch_kwargs": self.arch_kwargs}, sort_keys=True)
        return "sha256:" + hashlib.sha256(doc.encode("utf-8")).hexdigest()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TeacherInfo":
        kwargs = d.get("arch_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise FormatError(f"teacher.arch_kwargs must be an object, not {type(kwargs).__name__}")
        return cls(arch=text(d["arch"], "teacher.arch"), source=text(d["source"], "teacher.source"),
                   file=text(d["file"], "teacher.file"), sha256=text(d["sha256"], "teacher.sha256"),
                   arch_kwargs=dict(kwargs))


SOURCE_KINDS = ("urls", "prefix", "webdataset", "parquet")  # corpus.source.kind (1.4)


def row_source(d: Any) -> dict[str, Any] | None:
    """corpus.source (1.4): {kind, image_column, id_column}, validated; None when absent."""
    if d is None:
        return None
    if not isinstance(d, dict) or d.get("kind") not in SOURCE_KINDS:
        raise FormatError(f"corpus.source must be an object whose kind is one of {', '.join(SOURCE_KINDS)} "
                          "(docs/FORMAT.md, 1.4: row sources)")
    out: dict[str, Any] = {"kind": d["kind"]}
    if d["kind"] == "parquet":
        out["image_column"] = text(d.get("image_column"), "corpus.source.image_column")
        out["id_column"] = None if d.get("id_column") is None else text(d["id_column"], "corpus.source.id_column")
    return out


@dataclass(frozen=True)
class CorpusInfo:
    root: str               # absolute path of the corpus root when dumped
    listing: str            # "directory" or the listing file's path
    listing_sha256: str     # of the ordered list of ids: the corpus identity used for resume
    n_listed: int
    n_images: int = 0
    n_failed: int = 0
    # 1.4, row sources: how a row's bytes are found from its id when the corpus is not loose local files
    # (docs/FORMAT.md, "1.4: row sources"); absent for a folder or a listing of local paths.
    source: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["source"] is None:
            del d["source"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CorpusInfo":
        info = cls(root=text(d["root"], "corpus.root"), listing=text(d["listing"], "corpus.listing"),
                   listing_sha256=text(d["listing_sha256"], "corpus.listing_sha256"),
                   **{k: whole(d[k], f"corpus.{k}", 0, 1 << 62) for k in ("n_listed", "n_images", "n_failed")},
                   source=row_source(d.get("source")))
        return info


@dataclass(frozen=True)
class StoreMeta:
    """Everything the root attribute says; validated on read."""

    format_version: str
    complete: bool
    classes: tuple[str, ...]
    preprocess: Preprocess
    views: ViewSpec
    teacher: TeacherInfo
    corpus: CorpusInfo
    dtype: str
    precision: str
    seed: int
    chunk_rows: int
    batch_size: int
    created: str
    versions: dict[str, str]
    fingerprints: dict[str, str] = field(default_factory=dict)  # teacher, corpus, contents (when complete)
    embedded_pixels: bool = False
    extra_teachers: tuple["ExtraTeacher", ...] = ()
    keep_bits: int | None = None  # mantissa bits kept by lossy BitRound on logits; None: lossless
    targets: "TargetSpec" = None  # type: ignore[assignment]  # None: full logits
    statistics: dict[str, Any] | None = None  # 1.4: written by finalize (logitstore/records.py)

    def __post_init__(self) -> None:
        if self.targets is None:
            object.__setattr__(self, "targets", TargetSpec())

    @property
    def sparse(self) -> bool:
        return self.targets.kind != TARGET_LOGITS

    def target_arrays(self) -> dict[str, tuple[int, str]]:
        """Name -> (last dimension, dtype) of the arrays that hold the teacher's targets, in hashing order."""
        t, c, d = self.targets, self.num_classes, self.dtype
        if t.kind == TARGET_TOPK:
            return {TOPK_VALUES: (t.k, d), TOPK_INDICES: (t.k, index_dtype(c)), TAIL_LSE: (len(t.temperatures), "float32")}
        if t.kind == TARGET_SAMPLE:
            return {SAMPLE_INDICES: (t.k, index_dtype(c)), SAMPLE_COUNTS: (t.k, "uint16"), SAMPLE_LOGITS: (t.k, d),
                    SAMPLE_PROPOSAL: (t.k, "float32"), LSE: (len(t.temperatures), "float32")}
        return {LOGITS: (c, d)}

    @property
    def pixel_chunk_rows(self) -> int:
        return pixel_chunk_rows(self.chunk_rows, self.views.count * self.preprocess.channels
                                * self.preprocess.size[0] * self.preprocess.size[1])

    @property
    def teacher_names(self) -> list[str]:
        return [PRIMARY_TEACHER, *(t.name for t in self.extra_teachers)]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "complete": self.complete,
                "classes": list(self.classes), "preprocess": self.preprocess.to_dict(),
                "views": self.views.to_dict(), "teacher": self.teacher.to_dict(),
                "corpus": self.corpus.to_dict(), "dtype": self.dtype, "precision": self.precision,
                "seed": self.seed, "chunk_rows": self.chunk_rows, "batch_size": self.batch_size,
                "created": self.created, "versions": dict(self.versions), "fingerprints": dict(self.fingerprints),
                "embedded_pixels": self.embedded_pixels, "keep_bits": self.keep_bits,
                "extra_teachers": [t.to_dict() for t in self.extra_teachers],
                **({"targets": self.targets.to_dict()} if self.sparse else {}),
                **({STATISTICS: self.statistics} if self.statistics is not None else {})}

    @property
    def has_records(self) -> bool:
        """Format 1.4 or later: chunk records and stored statistics (docs/FORMAT.md, "1.4: chunk records")."""
        return parse_version(self.format_version) >= RECORDS_SINCE

    def sealed(self) -> "StoreMeta":
        """This complete store's metadata with its checksum (fingerprints["metadata"]) recorded."""
        fps = {k: v for k, v in self.fingerprints.items() if k != "metadata"}
        written = json.loads(json.dumps(dataclasses.replace(self, fingerprints=fps).to_dict()))  # as stored
        return dataclasses.replace(self, fingerprints={**fps, "metadata": metadata_checksum(written)})

    def run_fingerprint(self) -> dict[str, Any]:
        """What must be equal for a dump to resume into this store (everything that changes bytes)."""
        return {"teacher": f"{self.teacher.arch} sha256={self.teacher.sha256}",
                "corpus": f"{self.corpus.n_listed} files, listing sha256={self.corpus.listing_sha256}",
                "classes": list(self.classes), "preprocess": self.preprocess.to_dict(),
                "views": self.views.to_dict(), "dtype": self.dtype, "precision": self.precision,
                "seed": self.seed, "chunk_rows": self.chunk_rows, "batch_size": self.batch_size,
                "embedded_pixels": self.embedded_pixels, "keep_bits": self.keep_bits,
                **({"targets": self.targets.to_dict()} if self.sparse else {})}


@dataclass(frozen=True)
class TargetSpec:
    """What each row keeps of the teacher's output: full logits, or a sparse form (format 1.1)."""

    kind: str = TARGET_LOGITS
    k: int = 0                               # classes kept (topk) or draws made (sample) per view
    temperatures: tuple[float, ...] = ()     # where tail_lse / lse are stored: the exact training temperatures
    proposal_temperature: float | None = None  # sample: draws from softmax(z / this)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "k": self.k, "temperatures": list(self.temperatures)}
        if self.kind == TARGET_SAMPLE:
            d["proposal_temperature"] = self.proposal_temperature
        return d

    @classmethod
    def from_dict(cls, d: Any, num_classes: int) -> "TargetSpec":
        if not isinstance(d, dict) or d.get("kind") not in (TARGET_TOPK, TARGET_SAMPLE):
            kind = d.get("kind") if isinstance(d, dict) else d
            raise FormatError(f"targets kind {kind!r} is not understood (this reader knows "
                              f"{TARGET_TOPK!r} and {TARGET_SAMPLE!r}); use a newer logitstore")
        try:
            spec = cls(d["kind"], int(d["k"]), tuple(float(t) for t in d["temperatures"]),
                       None if d.get("proposal_temperature") is None else float(d["proposal_temperature"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"targets {d!r} is malformed ({exc})") from None
        spec.check(num_classes)
        return spec

    def check(self, num_classes: int) -> None:
        if self.kind == TARGET_LOGITS:
            return
        if not self.temperatures or not all(math.isfinite(t) and t > 0 for t in self.temperatures):
            raise FormatError(f"targets temperatures {list(self.temperatures)} must be positive numbers")
        if self.kind == TARGET_TOPK and not 1 <= self.k < num_classes:
            raise FormatError(f"top-K needs 1 <= K < {num_classes} classes (K = {self.k}); "
                              "store full logits when K would be all of them")
        if self.kind == TARGET_SAMPLE:
            if not 1 <= self.k <= 65535:
                raise FormatError(f"sampled targets need 1 <= K <= 65535 draws (K = {self.k})")
            if self.proposal_temperature not in self.temperatures:
                raise FormatError(f"the proposal temperature {self.proposal_temperature} must be one of the "
                                  f"stored temperatures {list(self.temperatures)}")


def version_for(targets: TargetSpec, views: "ViewSpec | None" = None) -> str:
    """The format version a writer records: the current one for every kind of target (the metadata
    checksum came with 1.2, the full preprocessing with 1.3); 1.4 when no 1.5 augmentation is used, so
    readers of 1.4 keep reading every store that does not need 1.5."""
    if views is None or not views.augmented:
        return f"{FORMAT_MAJOR}.{RECORDS_SINCE[1]}"
    return FORMAT_VERSION


def index_dtype(num_classes: int) -> str:
    """Class indices: uint16 up to 65,536 classes, else uint32 (never a float)."""
    return "uint16" if num_classes <= 1 << 16 else "uint32"


@dataclass(frozen=True)
class ExtraTeacher:
    """A teacher added to an existing store: same images, same views, its own logits array."""

    name: str
    teacher: TeacherInfo
    preprocess: Preprocess
    precision: str
    fingerprint: str        # sha256 of its logits (little-endian bytes, row order)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "teacher": self.teacher.to_dict(), "preprocess": self.preprocess.to_dict(),
                "precision": self.precision, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExtraTeacher":
        return cls(text(d["name"], "extra_teachers.name", 64), TeacherInfo.from_dict(d["teacher"]),
                   Preprocess.from_dict(d["preprocess"]), text(d["precision"], "extra_teachers.precision", 16),
                   text(d["fingerprint"], "extra_teachers.fingerprint", 128))


TEACHER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_keep_bits(keep_bits: int | None, dtype: str) -> None:
    if keep_bits is not None and not 1 <= keep_bits < MANTISSA_BITS[dtype]:
        raise FormatError(f"keep_bits {keep_bits} must be between 1 and {MANTISSA_BITS[dtype] - 1} for {dtype} "
                          "(or absent for lossless logits)")


def pixel_chunk_rows(chunk_rows: int, row_bytes: int) -> int:
    """Rows per chunk of embedded pixels: chunk_rows halved until a chunk is <= 4 MiB (divides it)."""
    rows = chunk_rows
    while rows > 1 and rows % 2 == 0 and rows * row_bytes > PIXEL_CHUNK_BYTES:
        rows //= 2
    return rows


def parse_version(version: Any) -> tuple[int, int]:
    if not isinstance(version, str) or not re.fullmatch(r"\d{1,4}\.\d{1,4}", version):
        raise FormatError(f"format_version {str(version)[:40]!r} is not MAJOR.MINOR")
    major, minor = (int(p) for p in version.split("."))
    return major, minor


def check_version(version: Any) -> None:
    """Readers accept their own major (any minor up to theirs, and newer minors' known fields)."""
    major, _minor = parse_version(version)
    if major != FORMAT_MAJOR:
        newer = "newer" if major > FORMAT_MAJOR else "older"
        raise FormatError(f"store format {version} is a {newer} major version than this reader's "
                          f"{FORMAT_VERSION}; use a logitstore release that reads format {major}.x (docs/FORMAT.md, R1)")


def metadata_checksum(raw: dict[str, Any]) -> str:
    """fingerprints.metadata: SHA-256 of the root attribute's JSON as stored (keys sorted, compact, ASCII),
    without this checksum and the provenance keys. Over the stored JSON, unknown keys included, so a
    newer minor's additions are covered and an older reader computes the same value (R1, R4)."""
    doc = {k: v for k, v in raw.items() if k not in UNSEALED_KEYS}
    doc["fingerprints"] = {k: v for k, v in (raw.get("fingerprints") or {}).items() if k != "metadata"}
    try:
        canon = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except ValueError:
        raise FormatError("the root attribute holds NaN or inf (docs/FORMAT.md, R3)") from None
    return "sha256:" + hashlib.sha256(canon.encode("ascii")).hexdigest()


def statistics_from(v: Any, num_classes: int) -> dict[str, Any]:
    """The 1.4 `statistics` attribute, checked (R3): counts are non-negative integers of the stated lengths."""
    def counts(x: Any, n: int | None, what: str) -> list[int]:
        if not isinstance(x, list) or (n is not None and len(x) != n) or len(x) > MAX_CLASSES:
            raise FormatError(f"statistics.{what} must be a list of {n} counts (docs/FORMAT.md, R3)")
        return [whole(c, f"statistics.{what}", 0, 1 << 62) for c in x]

    if not isinstance(v, dict):
        raise FormatError("statistics must be an object (docs/FORMAT.md, R3)")
    try:
        out = {"rows": whole(v["rows"], "statistics.rows", 0, 1 << 62),
               "top1_counts": counts(v["top1_counts"], None, "top1_counts"),  # C: checked where used
               "confidence_counts": counts(v["confidence_counts"], STAT_BINS, "confidence_counts"),
               "entropy_counts": counts(v["entropy_counts"], STAT_BINS, "entropy_counts"),
               "confidence_sum_1e9": whole(v["confidence_sum_1e9"], "statistics.confidence_sum_1e9", 0, 1 << 63),
               "entropy_sum_1e9": None if v.get("entropy_sum_1e9") is None else
               whole(v["entropy_sum_1e9"], "statistics.entropy_sum_1e9", 0, 1 << 63),
               "failures_by_reason": {text(k, "statistics.failures_by_reason"): whole(c, "statistics.failures_by_reason",
                                                                                      0, 1 << 62)
                                      for k, c in dict(v.get("failures_by_reason") or {}).items()},
               "teacher_agreement": [{"name": text(a["name"], "statistics.teacher_agreement", 64),
                                      "agree": whole(a["agree"], "statistics.teacher_agreement", 0, 1 << 62)}
                                     for a in list(v.get("teacher_agreement") or [])]}
        if v.get("stored_bytes") is not None:
            out["stored_bytes"] = {text(k, "statistics.stored_bytes", 256): whole(b, "statistics.stored_bytes", 0, 1 << 62)
                                   for k, b in dict(v["stored_bytes"]).items()}
    except KeyError as exc:
        raise FormatError(f"statistics lacks {exc} (docs/FORMAT.md, R3)") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise FormatError(f"statistics is malformed ({exc}; docs/FORMAT.md, R3)") from None
    return out


def _string_map(v: Any, name: str) -> dict[str, str]:
    if not isinstance(v, dict) or len(v) > 64 or not all(isinstance(k, str) and isinstance(x, str)
                                                         and len(x) <= MAX_TEXT for k, x in v.items()):
        raise FormatError(f"attribute {name} must be an object of at most 64 strings (docs/FORMAT.md, R3)")
    return dict(v)


def meta_from_attrs(attrs: dict[str, Any], check_seal: bool = True) -> StoreMeta:
    """Validate the root attribute and build StoreMeta, refusing what this reader does not understand.

    Every attribute is checked for its type and range (R3), and a complete store of format 1.2 or
    later for its metadata checksum (R4), before any value is used to allocate or to read.
    """
    if ATTR_ROOT not in attrs:
        raise FormatError(f"no '{ATTR_ROOT}' attribute on the root group: not a logitstore store")
    d = attrs[ATTR_ROOT]
    if not isinstance(d, dict):
        raise FormatError(f"the '{ATTR_ROOT}' attribute must be an object, not {type(d).__name__} (docs/FORMAT.md, R3)")
    check_version(d.get("format_version", "?"))
    try:
        classes = class_names(d["classes"])
        pixels = d.get("embedded_pixels", False)
        meta = StoreMeta(
            format_version=d["format_version"], complete=flag(d["complete"], "complete"), classes=classes,
            preprocess=Preprocess.from_dict(d["preprocess"]), views=ViewSpec.from_dict(d["views"]),
            teacher=TeacherInfo.from_dict(d["teacher"]), corpus=CorpusInfo.from_dict(d["corpus"]),
            dtype=text(d["dtype"], "dtype", 16), precision=text(d["precision"], "precision", 16),
            seed=whole(d["seed"], "seed", -(1 << 63), (1 << 63) - 1),  # 1.0-1.1 writers took negative seeds
            chunk_rows=whole(d["chunk_rows"], "chunk_rows", 1, MAX_CHUNK_ROWS),
            batch_size=whole(d["batch_size"], "batch_size", 1, MAX_CHUNK_ROWS),
            created=text(d["created"], "created", 64), versions=_string_map(d["versions"], "versions"),
            fingerprints=_string_map(d.get("fingerprints") or {}, "fingerprints"),
            embedded_pixels=flag(pixels, "embedded_pixels"),
            keep_bits=None if d.get("keep_bits") is None else whole(d["keep_bits"], "keep_bits", 1, 22),
            extra_teachers=tuple(ExtraTeacher.from_dict(t) for t in d.get("extra_teachers") or ()),
            targets=None if d.get("targets") is None else TargetSpec.from_dict(d["targets"], len(classes)),
            statistics=None if d.get(STATISTICS) is None else statistics_from(d[STATISTICS], len(classes)))
    except KeyError as exc:
        raise FormatError(f"required attribute {exc} is missing from '{ATTR_ROOT}'") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise FormatError(f"the '{ATTR_ROOT}' attribute is malformed ({exc}); docs/FORMAT.md lists each "
                          "key's type (R3)") from None
    if meta.complete and not {"teacher", "corpus", "contents"} <= set(meta.fingerprints):
        raise FormatError("a complete store must carry fingerprints teacher, corpus and contents")
    if meta.complete and meta.fingerprints["teacher"] != meta.teacher.fingerprint():
        raise FormatError("fingerprints.teacher does not match the teacher it describes (arch, arch_kwargs, "
                          "sha256): the metadata was altered (docs/FORMAT.md, R4)")
    if meta.dtype not in LOGIT_DTYPES:
        raise FormatError(f"logits dtype {meta.dtype!r} is not one of {', '.join(LOGIT_DTYPES)}")
    if meta.views.augmented and parse_version(meta.format_version) < AUGMENTED_SINCE:
        raise FormatError(f"a format {meta.format_version} store cannot carry augmented views (views kind "
                          f"{meta.views.kind!r}, augment/erasing/mix; format 1.5 or later, docs/FORMAT.md, "
                          "1.5: augmented views): the store's metadata is inconsistent")
    if meta.views.count * meta.num_classes > MAX_ROW_LOGITS:
        raise FormatError(f"{meta.views.count} views x {meta.num_classes} classes exceeds {MAX_ROW_LOGITS} "
                          "logits per image (docs/FORMAT.md, R3)")
    check_keep_bits(meta.keep_bits, meta.dtype)
    names = meta.teacher_names
    if len(set(names)) != len(names) or not all(TEACHER_NAME.match(n) for n in names):
        raise FormatError(f"teacher names {names} must be unique and match {TEACHER_NAME.pattern}")
    if check_seal and meta.complete and parse_version(meta.format_version) >= METADATA_CHECKSUM_SINCE:
        recorded = meta.fingerprints.get("metadata")
        if recorded is None:
            raise FormatError("a complete store of format 1.2 must carry its metadata checksum "
                              "(fingerprints.metadata; docs/FORMAT.md, R4)")
        if recorded != metadata_checksum(d):
            raise FormatError("the store's metadata was changed after it was written: its checksum "
                              "(fingerprints.metadata) no longer matches (docs/FORMAT.md, R4); restore the "
                              "store's zarr.json from its source")
    return meta


def compatibility_problem(a: StoreMeta, b: StoreMeta, *, same_teacher: bool = True,
                          same_encoding: bool = True) -> str | None:
    """The first difference that makes two stores' rows incomparable, or None.

    `same_encoding`: also the way the logits are stored (dtype, rounding, embedded pixels, teacher
    precision), which a merged store must share but a student reading both need not."""
    if a.classes != b.classes:
        if set(a.classes) == set(b.classes):
            return "the class order differs"
        only_a = sorted(set(a.classes) - set(b.classes))[:5]
        only_b = sorted(set(b.classes) - set(a.classes))[:5]
        return f"the classes differ (only in the first: {only_a}; only in the second: {only_b})"
    if a.preprocess != b.preprocess:
        pa, pb = a.preprocess.to_dict(), b.preprocess.to_dict()
        diff = {k: (pa.get(k), pb.get(k)) for k in {**pa, **pb} if pa.get(k) != pb.get(k)}
        return f"the preprocessing differs ({diff})"
    if same_teacher and (a.teacher.arch, a.teacher.sha256) != (b.teacher.arch, b.teacher.sha256):
        return (f"the teacher differs ({a.teacher.arch} sha256 {a.teacher.sha256[:12]} vs "
                f"{b.teacher.arch} sha256 {b.teacher.sha256[:12]})")
    if a.views != b.views:
        return f"the views differ ({a.views.to_dict()} vs {b.views.to_dict()})"
    if a.targets != b.targets:
        return f"the teacher targets differ ({a.targets.to_dict()} vs {b.targets.to_dict()})"
    for what in ("dtype", "keep_bits", "embedded_pixels", "precision") if same_encoding else ():
        if getattr(a, what) != getattr(b, what):
            return f"the {what} differs ({getattr(a, what)} vs {getattr(b, what)})"
    return None


def default_chunk_rows(views: int, num_classes: int, itemsize: int) -> int:
    """Rows per chunk: about 4 MiB of raw logits, a power of two in [256, 8192].

    Per-chunk overhead (a file, a codec run, a checksum, and zarr's own bookkeeping) dominates
    small chunks: benchmarks/chunk_size.py measured 1 KiB chunks at 1-3 MB/s and 320-500 KiB at
    95-530 MB/s; benchmarks/scale.py measured the writer on 1000-class float16 logits at 139 MB/s
    with 1 MiB chunks and 294 MB/s with 4 MiB ones (benchmarks/RESULTS.md). The trainer reads
    blocks of at least 2,048 rows anyway, so at C = 1000 a 2,048-row chunk changes neither its
    shuffle nor its reads. The 8192-row cap keeps a corpus of tens of thousands of small-C images
    in several chunks (and the writer's buffer small).
    """
    return chunk_rows_for(views * num_classes * itemsize)


def chunk_rows_for(row_bytes: int, augmented: bool = False) -> int:
    """`default_chunk_rows` for rows of any layout (sparse targets): ~4 MiB, power of two, [256, 8192];
    for an augmented (1.5) store, fewer than 256 rows where a row alone exceeds 16 KiB (hundreds of views
    per image), so a chunk stays near 4 MiB instead of growing to hundreds of MiB. Plain stores keep the
    1.4 rule: chunk_rows is in the run fingerprint, so a dump started by an older release must resume."""
    target = (4 << 20) / max(1, row_bytes)
    rows = 1 << max(0, int(math.floor(math.log2(max(1.0, target)))))
    return int(min(8192, rows if augmented and row_bytes > 16 << 10 else max(256, rows)))
