"""What the student is fed besides the teacher's logits: its input (the teacher's recorded
preprocessing at the student's size and channels) and the optional hard labels.

A store keeps no labels; `--alpha` uses them where they exist, from a labels file or from the
image's folder name.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from logitstore.schema import Preprocess
from logitstore.views import apply_view, apply_views

from .errors import ClassMismatchError, ConfigError

# The label of an image that has none (it contributes only to the distillation loss).
NO_LABEL = -1


@dataclass(frozen=True)
class InputSpec:
    """The teacher's recorded preprocessing, with the student's own final size and channel count."""

    pre: Preprocess
    size: tuple[int, int]
    channels: int
    # mean and std per device, made once: a tensor made from a Python list on a GPU is a blocking copy
    # (it waits for every queued kernel), which `normalize` would pay on every batch.
    _consts: dict = field(default_factory=dict, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        # Workers get the spec without the device constants (a spawned worker must not touch the GPU).
        return {**self.__dict__, "_consts": {}}

    def view(self, img: torch.Tensor, params: np.ndarray | None, kind: str) -> torch.Tensor:
        """uint8 original -> uint8 view: the teacher's exact crop and flip; only the final resize differs."""
        out = None if tuple(self.size) == tuple(self.pre.size) else self.size
        return apply_view(img, params, self.pre, kind, out)

    def views(self, imgs: list[torch.Tensor], params: np.ndarray, kind: str) -> torch.Tensor:
        """`view` of each original, as one uint8 [N, C, H, W] batch: bit for bit the same pixels, with
        one resize per group of equal-shaped crops (logitstore.views.apply_views)."""
        out = None if tuple(self.size) == tuple(self.pre.size) else self.size
        return apply_views(imgs, params, self.pre, kind, out)

    def to_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] (already on the device) -> normalised float32 student input."""
        consts = self._consts.get(pixels.device)
        if consts is None:
            consts = self._consts[pixels.device] = tuple(
                torch.tensor(v, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
                for v in (self.pre.mean, self.pre.std))
        # logitstore.views.normalize, operation for operation (the same float32 values, bit for bit).
        x = pixels.float().div_(255.0).sub_(consts[0]).div_(consts[1])
        if self.channels != self.pre.channels:  # grey -> RGB: what PIL's convert("RGB") would give
            x = x.expand(-1, self.channels, -1, -1).contiguous()
        return x

    def student_preprocess(self) -> dict[str, Any]:
        """The preprocessing to record in a student checkpoint, so it can be a teacher in turn."""
        d = self.pre.to_dict()
        if tuple(self.size) != tuple(self.pre.size):
            d["size"] = list(self.size)
            if self.pre.resize is not None:  # keep the teacher's crop fraction at the new size
                scale = [new / old for new, old in zip(self.size, self.pre.size)]
                d["resize"] = (int(round(self.pre.resize * scale[0])) if isinstance(self.pre.resize, int)
                               else [int(round(r * f)) for r, f in zip(self.pre.resize, scale)])
        if self.channels != self.pre.channels:
            d["mode"] = "RGB"
        return d


def make_input_spec(pre: Preprocess, input_size: tuple[int, int] | None, in_channels: int) -> InputSpec:
    """The student's input: the store's preprocessing at --input-size and --in-channels (refused if unworkable)."""
    if in_channels not in (pre.channels, 3) or (in_channels != pre.channels and pre.mode != "L"):
        raise ConfigError(f"--in-channels {in_channels}: the store's images are {pre.mode} ({pre.channels} "
                          "channel(s)); a student can take them as they are, or greyscale as 3-channel RGB")
    size = tuple(input_size) if input_size else tuple(pre.size)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"--input-size {input_size}: expected two positive integers H,W")
    return InputSpec(pre, (int(size[0]), int(size[1])), in_channels)


def read_labels_file(path: str | os.PathLike, classes: Sequence[str]) -> dict[str, int]:
    """A JSON object {id: class} or a CSV file of `id,class` lines; class is a name or an index."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--labels {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--labels {path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 "
                          "JSON or CSV") from None
    index = {c: i for i, c in enumerate(classes)}
    if p.suffix.lower() == ".json":
        try:
            pairs = list(json.loads(text).items())
        except (json.JSONDecodeError, AttributeError):
            raise ConfigError(f"--labels {path}: expected a JSON object {{image id: class}}") from None
    else:
        pairs = [tuple(x.strip() for x in ln.rsplit(",", 1)) for ln in text.splitlines() if ln.strip()]
        if any(len(pr) != 2 for pr in pairs):
            raise ConfigError(f"--labels {path}: every line must be 'image id,class'")
        if len(pairs) > 1 and not _is_class(pairs[0][1], index) and all(_is_class(c, index) for _, c in pairs[1:]):
            pairs = pairs[1:]  # a header row (image,label; filename,class; ...): the one line that names no class
    out, unknown = {}, []
    for image_id, cls in pairs:
        cls = str(cls)
        if cls in index:
            out[str(image_id)] = index[cls]
        elif _is_class(cls, index):
            out[str(image_id)] = int(cls)
        else:
            unknown.append(cls)
    if unknown:
        raise ClassMismatchError(f"--labels {path} names {len(unknown)} label(s) that are not classes of the "
                                 f"store, e.g. {sorted(set(unknown))[:5]}; the store's classes are "
                                 f"{list(classes)[:10]}{' ...' if len(classes) > 10 else ''}")
    return out


def _is_class(cls: str, index: dict[str, int]) -> bool:
    return cls in index or (cls.isdigit() and int(cls) < len(index))


def folder_labels(ids: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Label = the image's parent folder name where that names a class (ImageNet-style layouts)."""
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(i.rsplit("/", 2)[-2] if "/" in i else "", NO_LABEL) for i in ids], np.int64)
