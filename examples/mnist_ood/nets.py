"""The MNIST teacher, importable by name as `examples.mnist_ood.nets:teacher_cnn`.

A teacher checkpoint names its architecture rather than pickling it, so this module must be
importable wherever the checkpoint is loaded: run the tools from the repository root
(`python -m logitstore ...`, `python -m trainer ...`) or put the root on PYTHONPATH.
"""
from __future__ import annotations

from torch import nn

TEACHER_ARCH = "examples.mnist_ood.nets:teacher_cnn"
# The demo trusts its own module: a checkpoint naming it loads only where it is trusted (logitstore/arch.py).
TRUSTED = (TEACHER_ARCH.split(":")[0],)


def teacher_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> nn.Module:
    """Two conv blocks and a 128-unit head (~420k parameters); sized to train in minutes on 2 CPU cores."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(2 * width * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.25),
        nn.Linear(128, num_classes))
