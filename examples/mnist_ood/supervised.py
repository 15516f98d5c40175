"""Training on labels: the MNIST teacher, the supervised student references and label fine-tuning.

Distillation itself is `trainer fit`'s job; this module only does what needs labels, with one
plain loop so every labeled run in the table is trained the same way.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from logitstore.arch import build_model

from .mnist import CLASSES, PREPROCESS
from .nets import TRUSTED

MEAN, STD = PREPROCESS["mean"][0], PREPROCESS["std"][0]


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] -> normalised float [N, 1, 28, 28], exactly what `logitstore dump` feeds the teacher."""
    return (torch.from_numpy(images).float().div_(255.0).sub_(MEAN).div_(STD)).unsqueeze(1)


def random_affine(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample rotation (+-10 deg), scale (0.9-1.1) and shift (+-2 px): the usual MNIST jitter."""
    n = x.shape[0]
    u = torch.rand(n, 4, generator=gen) * 2 - 1
    angle, scale, shift = u[:, 0] * math.radians(10), 1 + 0.1 * u[:, 1], u[:, 2:] * (2 * 2 / 28)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Pad with the normalised value of a black pixel, not with zero (which is grey after normalising).
    return F.grid_sample(x + MEAN / STD, grid, align_corners=False, padding_mode="zeros") - MEAN / STD


def train_classifier(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, epochs: float,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0, augment: bool = True,
                     log: Any = None) -> dict[str, float]:
    """Cross-entropy with Adam and a one-cycle schedule for `epochs` passes (fractions allowed)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = to_input(images), torch.from_numpy(np.asarray(labels, dtype=np.int64))
    n = len(x_all)
    steps = max(1, round(epochs * n / batch_size))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    t0, step, loss_sum = time.perf_counter(), 0, 0.0
    while step < steps:
        order = torch.randperm(n, generator=gen)
        for a in range(0, n, batch_size):
            idx = order[a:a + batch_size]
            x = random_affine(x_all[idx], gen) if augment else x_all[idx]
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item()
            step += 1
            if log and step % 100 == 0:
                log(f"    step {step}/{steps}  loss {loss_sum / 100:.3f}")
                loss_sum = 0.0
            if step >= steps:
                break
    model.eval()
    return {"steps": steps, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    model.eval()
    x, correct = to_input(images), 0
    for a in range(0, len(x), batch_size):
        correct += int((model(x[a:a + batch_size]).argmax(1).numpy() == labels[a:a + batch_size]).sum())
    return correct / len(x)


def save_checkpoint(model: nn.Module, arch: str, arch_kwargs: dict[str, Any], path: Path) -> Path:
    """The one checkpoint format both tools read: a dict naming its architecture (never a pickled module)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"arch": arch, "arch_kwargs": arch_kwargs, "state_dict": model.state_dict(),
                "classes": CLASSES, "preprocess": PREPROCESS}, path)
    return path


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ckpt["arch"], ckpt.get("arch_kwargs"), trust_modules=TRUSTED)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt
