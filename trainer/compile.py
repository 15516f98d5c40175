"""--compile: torch.compile the student, and compile it before training so a failure is one line.

torch.compile compiles lazily, at the first forward and backward; its failures there (no working C
compiler, an unsupported platform or operator) surface as long tracebacks from deep inside the first
training step. So the compiled student runs one forward and backward of the training step's shape
here, before any step: if that fails the run stops with a CompileError naming the cause, rather than
falling back to eager (a user who asked for --compile and silently got a slower run would not know
why; dropping the flag is one edit). The probe leaves no trace: weights, batch-norm statistics,
gradients and the RNG are as they were.
"""
from __future__ import annotations

import torch
from torch import nn

from logitstore.device import autocast

from .errors import CompileError


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).strip().splitlines()[:1])[:240]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def compile_student(model: nn.Module, example: torch.Tensor, precision: str) -> nn.Module:
    """torch.compile(model), already compiled for training on inputs shaped like `example`.

    `model` is what the loop calls (the student, or its DDP wrapper); the compiled module shares its
    parameters, so the optimizer and the checkpoints keep using the bare student."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    devices = [example.device] if example.device.type == "cuda" else []
    try:
        compiled = torch.compile(model)
        model.train()
        with torch.random.fork_rng(devices=devices):
            with autocast(precision, example.device):
                out = compiled(example)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            sum(o.float().sum() for o in outs).backward()
    except Exception as exc:  # whatever the compiler stack raises, the cause is its first line
        raise CompileError(f"--compile: torch.compile cannot compile this student here ({_first_line(exc)}); "
                           "drop --compile to train without it") from None
    finally:
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return compiled
