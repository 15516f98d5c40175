"""Device and numeric precision from flags: the one place (for both tools) that knows CPU from CUDA."""
from __future__ import annotations

from typing import Sequence

import torch

from .errors import LogitStoreError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str | None) -> torch.device:
    """'auto' (or None): cuda when present, else cpu; anything else must exist on this machine."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LogitStoreError(f"--device {device!r} is not a torch device (use cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LogitStoreError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_precision(precision: str, device: torch.device, choices: Sequence[str] = PRECISIONS) -> str:
    """auto = bf16 autocast on GPUs (no loss scaling needed, unlike fp16), fp32 on CPUs."""
    if precision not in choices:
        raise LogitStoreError(f"--precision {precision!r} is not one of {', '.join(choices)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise LogitStoreError("--precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    return precision
