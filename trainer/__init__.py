"""trainer: distil image classifiers from logitstore stores, with no teacher in memory.

    from trainer import fit, evaluate
    result = fit(["cache.zarr"], "runs/lenet", student="lenet", epochs=10)
    print(evaluate(result.checkpoint, "test/").top1)
"""
from .errors import (CheckpointError, ClassMismatchError, ConfigError, ImageError, RunDirError, StoreMismatchError,
                     StudentError, TrainerError)
from .evaluate import EvalResult, evaluate
from .fit import FitResult, fit

__version__ = "0.1.0"

__all__ = ["fit", "evaluate", "FitResult", "EvalResult", "TrainerError", "ConfigError", "StudentError",
           "StoreMismatchError", "ImageError", "ClassMismatchError", "RunDirError", "CheckpointError"]
