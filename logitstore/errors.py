"""User-facing error types. The CLIs catch these and print one line; anything else is a bug."""
from __future__ import annotations


class LogitStoreError(Exception):
    """Base of every error a user can cause and fix."""


class FormatError(LogitStoreError):
    """A store (or its metadata) breaks docs/FORMAT.md, or is of a version this reader refuses."""


class StoreStateError(LogitStoreError):
    """A store exists but is in the wrong state: incomplete, complete without --overwrite, missing."""


class ResumeMismatchError(LogitStoreError):
    """A dump was asked to resume into a store written with a different teacher, corpus or flags."""


class TeacherError(LogitStoreError):
    """A teacher file or spec cannot be loaded safely, or does not fit the classes/preprocessing."""


class CorpusError(LogitStoreError):
    """The image corpus cannot be listed or read (missing folder, empty listing, bad listing file)."""


class LogitRangeError(LogitStoreError):
    """A logit cannot be stored in the chosen dtype without becoming inf."""


class IntegrityError(LogitStoreError):
    """Stored bytes fail their checksum, or images no longer match their stored digests."""


class ArchitectureError(LogitStoreError):
    """An architecture name ("torchvision:NAME", "package.module:factory") cannot be built."""


class DestinationError(LogitStoreError):
    """An output path that a tool must not write: not empty and not its own, or overlapping its inputs."""


class UntrustedCodeError(LogitStoreError):
    """A file names code (an architecture factory) that nobody said to trust; nothing was imported."""


class OptionError(LogitStoreError):
    """A flag or argument value that cannot work, or flags that do not go together."""


class MismatchError(LogitStoreError):
    """Stores that cannot be combined: different teacher, classes, class order, preprocessing or views."""


class DumpInterrupted(LogitStoreError):
    """Ctrl-C: everything committed so far is kept; the same command resumes."""


class WriteError(LogitStoreError):
    """The destination refused a write (disk full, read-only, vanished, an object store's error)."""
