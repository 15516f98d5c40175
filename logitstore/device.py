"""Device and numeric precision from flags: the one place (for both tools) that knows CPU from CUDA."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import ContextManager, Sequence

import torch

from .errors import OptionError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")  # training autocasts in bf16 only: fp16 would need loss scaling


def resolve_device(device: str | None) -> torch.device:
    """'auto' (or None): cuda when present, else cpu; anything else must exist on this machine."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise OptionError(f"--device {device!r} is not a torch device (use cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_precision(precision: str, device: torch.device, choices: Sequence[str] = PRECISIONS) -> str:
    """auto = bf16 autocast on GPUs (no loss scaling needed, unlike fp16), fp32 on CPUs."""
    if precision not in choices:
        raise OptionError(f"--precision {precision!r} is not one of {', '.join(choices)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise OptionError("--precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    return precision


def autocast(precision: str, device: torch.device) -> ContextManager:
    """The autocast context for a resolved precision (none for fp32)."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Torchrun:
    """This process's place in a torchrun job (read from the variables torchrun sets)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def torchrun_env() -> Torchrun | None:
    """The torchrun job this process belongs to, or None when it was not started by torchrun."""
    if "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return Torchrun(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")),
                    int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
