"""User-facing error types. The CLI catches these (and logitstore's) and prints one line."""
from __future__ import annotations


class TrainerError(Exception):
    """Base of every error a user can cause and fix."""


class ConfigError(TrainerError):
    """A flag or argument value that cannot work (unknown optimizer, negative temperature, ...)."""


class StudentError(TrainerError):
    """A student name that cannot be resolved or built, or a network that does not fit the store."""


class StoreMismatchError(TrainerError):
    """Several stores that cannot be read as one dataset, or stores that differ from a resumed run's."""


class ImageError(TrainerError):
    """The corpus is not where the store says, or an image is missing or differs from its stored digest."""


class ClassMismatchError(TrainerError):
    """A labeled folder or labels file names classes that the store does not have."""


class RunDirError(TrainerError):
    """The run directory holds another run, or --resume finds no usable checkpoint there."""


class CheckpointError(TrainerError):
    """A checkpoint file that cannot be read, or is not a {arch, arch_kwargs, state_dict, ...} dict."""


class DivergedError(TrainerError):
    """A training step whose loss (or the weights it left) is not finite; the last good checkpoint is kept."""


class CompileError(TrainerError):
    """--compile on a student or platform that torch.compile cannot compile (no C compiler, unsupported op)."""
