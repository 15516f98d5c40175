"""logitstore: run a teacher once over an image corpus; keep its raw logits in a Zarr v3 store.

    import logitstore
    logitstore.dump("teacher.pt", "corpus/", "cache.zarr", views=4)     # the teacher, once
    store = logitstore.open_store("cache.zarr")                          # any reader
    rows = store[0:1024]                                                 # logitstore.Rows
    logitstore.verify(store).ok, logitstore.info(store)["images"]

The teacher side (`dump`, `add_teacher`) lives in logitstore.teacher and is imported on first use,
so a reader (the trainer) never loads teacher code.
"""
from .errors import (ArchitectureError, CorpusError, DestinationError, DumpInterrupted, FormatError, IntegrityError,
                     LogitRangeError, LogitStoreError, MismatchError, OptionError, ResumeMismatchError,
                     StoreStateError, TeacherError, UntrustedCodeError)

__version__ = "0.1.0"

# name -> module that defines it, imported on first use: `import logitstore` loads neither NumPy nor zarr
# nor torch, so the command line's entry (logitstore/entry.py) starts before they load and can turn a
# Ctrl-C during their import into one line.
_LAZY = {
    "Rows": "rows", "FORMAT_VERSION": "schema", "Preprocess": "schema", "StoreMeta": "schema", "ViewSpec": "schema",
    "LogitStore": "store", "open_store": "store",
    "dump": "teacher.local", "run_dump": "teacher.local", "DumpConfig": "teacher.job", "DumpSummary": "teacher.job",
    "add_teacher": "teacher.add", "AddTeacherSummary": "teacher.add",
    "describe_teacher": "teacher.load", "TeacherSummary": "teacher.load",
    "info": "tools.inspect_store", "verify": "tools.inspect_store", "VerifyReport": "tools.inspect_store",
    "merge": "tools.combine", "select": "tools.combine", "MergeReport": "tools.combine",
    "SelectReport": "tools.combine", "copy_store": "tools.transfer", "CopyReport": "tools.transfer",
    "contact_sheet": "tools.show", "SheetSummary": "tools.show",
}

__all__ = sorted([*_LAZY, "LogitStoreError", "FormatError", "StoreStateError", "ResumeMismatchError", "TeacherError",
                  "CorpusError", "LogitRangeError", "IntegrityError", "ArchitectureError", "UntrustedCodeError",
                  "DestinationError", "OptionError", "MismatchError", "DumpInterrupted"])


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if not name.startswith("_"):  # a submodule not imported yet (logitstore.schema, ...)
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'logitstore' has no attribute {name!r}")
