"""logitstore: run a teacher once over an image corpus; keep its raw logits in a Zarr v3 store."""
from .errors import (ArchitectureError, CorpusError, FormatError, IntegrityError, LogitRangeError,
                     LogitStoreError, ResumeMismatchError, StoreStateError, TeacherError)
from .schema import FORMAT_VERSION, Preprocess, StoreMeta, ViewSpec
from .store import LogitStore, Rows, open_store

__version__ = "0.1.0"

__all__ = ["dump", "DumpSummary", "DumpInterrupted", "open_store", "LogitStore", "Rows", "StoreMeta", "Preprocess", "ViewSpec",
           "FORMAT_VERSION", "LogitStoreError", "FormatError", "StoreStateError", "ResumeMismatchError",
           "TeacherError", "CorpusError", "LogitRangeError", "IntegrityError", "ArchitectureError"]


def __getattr__(name: str):
    # `dump` pulls in the teacher loader; import it on first use so that readers (the trainer)
    # never load teacher code.
    if name in ("dump", "DumpSummary", "DumpInterrupted"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'logitstore' has no attribute {name!r}")
