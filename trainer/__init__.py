"""trainer: distil image classifiers from logitstore stores, with no teacher in memory.

    from trainer import FitConfig, evaluate, fit, run_fit
    result = fit(["cache.zarr"], "runs/lenet", student="lenet", epochs=10)
    print(evaluate(result.checkpoint, "test/").top1)

    cfg = FitConfig(stores=["cache.zarr"], out="runs/lenet", epochs=10)   # what `trainer fit` builds
    result = run_fit(cfg, progress=True)

Where a batch comes from: storeset.py (the stores, read in the order of order.py), batches.py (the
rows and their pixels); where the loss is computed: loss.py; the loop: fit.py.
"""
from .errors import (CheckpointError, ClassMismatchError, CompileError, ConfigError, DivergedError, ImageError,
                     RunDirError, StoreMismatchError, StudentError, TrainerError)
from .evaluate import EvalResult, evaluate
from .fit import FitConfig, FitResult, fit, run_fit

__version__ = "0.1.0"

__all__ = ["fit", "run_fit", "FitConfig", "FitResult", "evaluate", "EvalResult", "TrainerError", "ConfigError",
           "StudentError", "StoreMismatchError", "ImageError", "ClassMismatchError", "RunDirError",
           "CheckpointError", "DivergedError", "CompileError"]
