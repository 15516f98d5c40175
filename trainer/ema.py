"""An exponential moving average of a student's weights (--ema DECAY), the model users take away.

After every optimizer step each parameter of the average moves towards the trained model's:
avg <- decay * avg + (1 - decay) * weight. Buffers (BatchNorm's running statistics and step count) are
copied: they are already averages, of the activations the current weights produce. The average starts
as the initial weights and never trains itself.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def ema_step(average: list[torch.Tensor], current: list[torch.Tensor], decay: float) -> None:
    """average <- decay * average + (1 - decay) * current, in place (two fused passes over the list)."""
    if average:
        torch._foreach_mul_(average, decay)
        torch._foreach_add_(average, current, alpha=1.0 - decay)


class ModelEMA:
    """The average of `model`'s weights, kept in a copy of it (`module`, always in eval mode).

    `update()` folds in `model`'s weights as they are now; call it after each optimizer step. `model` is
    the bare student (not a DDP or compiled wrapper), already on its device.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay} must be in (0, 1)")
        self.decay, self.updates = float(decay), 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        # Listed once: the optimizer and load_state_dict update these tensors in place, so they stay current.
        self._avg = [p.detach() for p in self.module.parameters()]
        self._cur = [p.detach() for p in model.parameters()]
        self._buffers = list(zip(self.module.buffers(), model.buffers()))

    @torch.no_grad()
    def update(self) -> None:
        ema_step(self._avg, self._cur, self.decay)
        for avg, cur in self._buffers:
            avg.copy_(cur)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps beside the averaged weights (saved as the checkpoint's state_dict)."""
        return {"decay": self.decay, "updates": self.updates}

    def load(self, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Restore the average exactly: its weights and its update count (resume)."""
        self.module.load_state_dict(weights)
        self.updates = int(state.get("updates", 0))
