"""Where a tool may write: only to a place that is absent, empty, or already its own.

Every command that writes (dump, select, merge, copy, pack, and the trainer's run directory) asks
here first, before anything is created or deleted, so that a mistyped `--out` can never empty a
folder of the user's files, the corpus being dumped, or the current directory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import DestinationError

# The states a destination may be in when a tool is allowed to go on.
ABSENT, EMPTY, OURS = "absent", "empty", "ours"


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_local_destination(out: str | os.PathLike, *, is_ours: Callable[[Path], bool], what: str,
                            protected: Iterable[str | os.PathLike] = (), flag: str = "--out") -> str:
    """ABSENT, EMPTY or OURS for a local path a tool wants to write; anything else is refused.

    Refused in one line: '', '/', the current directory (or a folder above it), a path that is or
    holds or lies inside a `protected` path (the corpus, the source stores), an existing file, and a
    non-empty directory that `is_ours` does not recognise (whatever --overwrite says: a tool only
    replaces what it wrote).
    """
    text = os.fspath(out)
    if not text.strip():
        raise DestinationError(f"{flag} is empty; name a new {what}")
    path = _resolved(text)
    if path == Path(path.anchor):
        raise DestinationError(f"{flag} {text!r} is the root of the file system; name a new {what}")
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        raise DestinationError(f"{flag} {text!r} is the current directory or holds it; name a new {what} "
                               "inside it instead")
    for p in protected:
        if p is None or "://" in os.fspath(p):
            continue
        other = _resolved(p)
        if _overlaps(path, other.resolve() if other.exists() else other) or _overlaps(path, other):
            raise DestinationError(f"{flag} {text!r} overlaps {os.fspath(p)!r}, which this command reads; "
                                   f"write the {what} somewhere else")
    if not os.path.lexists(path):
        return ABSENT
    if not path.is_dir():
        raise DestinationError(f"{flag} {text!r} is an existing file, not a {what}; choose another path")
    try:
        entries = next(os.walk(path))[1:]
    except StopIteration:
        raise DestinationError(f"{flag} {text!r} cannot be listed; check its permissions") from None
    if not any(entries):
        return EMPTY
    if is_ours(path):
        return OURS
    raise DestinationError(f"{flag} {text!r} is a non-empty directory that is not a {what}; nothing was "
                           f"changed there (--overwrite only replaces a {what}); choose another path")


def root_attrs(raw: bytes | None) -> dict[str, Any] | None:
    """The attributes of a root `zarr.json`, or None when it is not a JSON object."""
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    return attrs if isinstance(attrs, dict) else {}


def is_logitstore_root(attrs: dict[str, Any] | None) -> bool:
    """A root written by these tools: it carries our metadata or our progress record."""
    from .schema import ATTR_PROGRESS, ATTR_ROOT

    return attrs is not None and (ATTR_ROOT in attrs or ATTR_PROGRESS in attrs)
