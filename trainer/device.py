"""The trainer's precision choices and autocast; device resolution is logitstore.device's."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from logitstore.device import resolve_device  # noqa: F401  (re-exported for fit and evaluate)
from logitstore.device import resolve_precision as _resolve_precision

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The trainer autocasts in bf16 only (fp16 would need loss scaling)."""
    return _resolve_precision(precision, device, PRECISIONS)


def autocast(precision: str, device: torch.device) -> ContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
