"""Top-1 / top-5 accuracy on a labeled folder: one sub-folder per class, named after the classes."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from logitstore.arch import build_model
from logitstore.checkpoint import load_weights_only
from logitstore.corpus import IMAGE_EXTENSIONS, decode_image, describe_failure
from logitstore.schema import Preprocess
from logitstore.views import EVAL

from logitstore.device import TRAIN_PRECISIONS, autocast, resolve_device, resolve_precision

from .batches import Failed
from .errors import CheckpointError, ClassMismatchError, ImageError
from .inputs import InputSpec


@dataclass
class EvalResult:
    """Accuracy of a student on a labeled folder: top-1, top-k (k = 5, or fewer classes) and the image count."""

    top1: float
    top5: float
    n: int
    k: int                     # the "5" of top-5 (fewer when there are fewer classes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LabeledFolder:
    root: Path
    paths: list[Path]
    labels: np.ndarray         # [n] int64 class index


def labeled_folder(root: str | os.PathLike, classes: Sequence[str]) -> LabeledFolder:
    """List a labeled folder and check that its sub-folders are classes of the store."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ImageError(f"{root}: no such folder (a labeled set is a folder with one sub-folder per class)")
    index = {c: i for i, c in enumerate(classes)}
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    shown = f"{list(classes)[:10]}{' ...' if len(classes) > 10 else ''}"
    if not subdirs:
        raise ClassMismatchError(f"{root}: no class sub-folders; a labeled set has one folder per class, "
                                 f"named after the store's classes {shown}")
    unknown = [d.name for d in subdirs if d.name not in index]
    if unknown:
        raise ClassMismatchError(f"{root}: sub-folder(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} are "
                                 f"not among the classes the student learns (the store's, or the checkpoint's): "
                                 f"{shown}")
    paths, labels = [], []
    for d in subdirs:
        for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
            dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                    paths.append(Path(dirpath, name))
                    labels.append(index[d.name])
    if not paths:
        raise ImageError(f"{root}: the class folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    return LabeledFolder(root, paths, np.asarray(labels, np.int64))


class _LabeledImages(Dataset):
    def __init__(self, folder: LabeledFolder, spec: InputSpec):
        self.folder, self.spec = folder, spec

    def __len__(self) -> int:
        return len(self.folder.paths)

    def __getitem__(self, i: int) -> Any:
        path = self.folder.paths[i]
        try:
            img = decode_image(path.read_bytes(), self.spec.pre.mode)
        except Exception as exc:  # returned, not raised: a worker would wrap it in a traceback
            return Failed(ImageError(f"{path}: cannot read it as an image ({describe_failure(exc)})"))
        return self.spec.view(img, None, EVAL), int(self.folder.labels[i])


def _collate(items: list[Any]) -> Any:
    for it in items:
        if isinstance(it, Failed):
            return it
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)


@torch.no_grad()
def evaluate_model(model: nn.Module, folder: LabeledFolder, spec: InputSpec, device: torch.device,
                   batch_size: int = 256, num_workers: int = 0, precision: str = "fp32") -> EvalResult:
    """Accuracy of `model` on `folder`, fed through the eval transform of `spec`."""
    was_training = model.training
    model.eval()
    loader = DataLoader(_LabeledImages(folder, spec), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    correct1 = correct5 = n = 0
    k = 1
    for batch in loader:
        if isinstance(batch, Failed):
            raise batch.error
        pixels, labels = batch
        x = spec.to_input(pixels.to(device, non_blocking=True))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(precision, device):
            out = model(x).float()
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices.cpu()
        hit = top == labels[:, None]
        correct1 += int(hit[:, 0].sum())
        correct5 += int(hit.any(dim=1).sum())
        n += len(labels)
    model.train(was_training)
    return EvalResult(top1=correct1 / max(1, n), top5=correct5 / max(1, n), n=n, k=k)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint dict, loaded without running code (weights_only, uncompressed zip entries)."""
    ckpt = load_weights_only(path, CheckpointError)
    missing = [k for k in ("arch", "state_dict", "classes", "preprocess") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: a checkpoint must be a dict with arch, arch_kwargs, state_dict, classes and "
                              f"preprocess; this one lacks {missing}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], where: str, trust_modules: Sequence[str] = ()) -> nn.Module:
    """The checkpoint's network with its weights; its architecture resolves under the trust rule
    (logitstore/arch.py): registries, built-in students and `trust_modules` only."""
    model = build_model(ckpt["arch"], ckpt.get("arch_kwargs"), trust_modules=trust_modules, where=where)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, AttributeError, ValueError) as exc:
        raise CheckpointError(f"{where}: the weights do not fit {ckpt['arch']} "
                              f"({' '.join(str(exc).split())[:300]})") from None
    return model


def evaluate(checkpoint: str | os.PathLike, images: str | os.PathLike, *, batch_size: int = 256,
             device: str | None = None, num_workers: int = 0, precision: str = "auto",
             trust_modules: Sequence[str] = ()) -> EvalResult:
    """Top-1 / top-5 of a saved student (or any checkpoint in the same format) on a labeled folder."""
    ckpt = load_checkpoint(checkpoint)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    classes = [str(c) for c in ckpt["classes"]]
    folder = labeled_folder(images, classes)
    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt, str(checkpoint), trust_modules).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    spec = InputSpec(pre, tuple(pre.size), pre.channels)
    return evaluate_model(model, folder, spec, dev, batch_size, num_workers, resolve_precision(precision, dev, TRAIN_PRECISIONS))
