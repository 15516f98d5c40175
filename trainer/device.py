"""Pick the device and the numeric precision; the one place that knows CPU from CUDA."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from .errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device (use cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto = bf16 on GPUs (no loss scaling needed, unlike fp16), fp32 on CPUs."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> ContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
