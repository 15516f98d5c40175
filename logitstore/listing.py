"""A prefix of files listed as a stream, in name order, with memory independent of how many there are.

`sorted(fs.find(path))` holds every name at once; a corpus of tens of millions of loose images on object
storage must not. `walk_sorted` yields the same names in the same order, a page (S3) or a directory
(any other fsspec filesystem) at a time, and can start and stop at any name (`lo`, `hi`), so one
process lists one slice of a prefix (a name range) without listing the rest.

Why the order is the same: S3 lists keys in UTF-8 byte order, which is Python's code-point order. A
directory walk matches a global sort when each directory's entries are sorted by their name, with a
`/` after a subdirectory's name: every path under an entry starts with that key, and no two keys of
one directory are such that one is a proper prefix of the other, except a file name that is a prefix of
a subdirectory's key, and that file sorts first in both orders.
"""
from __future__ import annotations

from typing import Any, Iterator

# Keys per S3 listing request (the most S3 returns).
PAGE_KEYS = 1000


def walk_sorted(fs: Any, path: str, lo: str = "", hi: str | None = None) -> Iterator[str]:
    """The files under `path` (named as `fs.find` names them) whose name relative to `path` is in
    [lo, hi), in `sorted(fs.find(path))` order, streamed."""
    base = path.rstrip("/")
    if _is_s3(fs):
        yield from _s3_keys(fs, base, lo, hi)
    else:
        yield from _walk(fs, base, "", lo, hi)


def _is_s3(fs: Any) -> bool:
    return any(p in ("s3", "s3a") for p in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))) \
        and hasattr(fs, "call_s3")


def _split(base: str) -> tuple[str, str]:
    bucket, _, key = base.partition("/")
    return bucket, f"{key}/" if key else ""


def _s3_keys(fs: Any, base: str, lo: str, hi: str | None) -> Iterator[str]:
    """ListObjectsV2 pages from `lo` on: keys come in byte order, so the listing stops at `hi`."""
    bucket, key = _split(base)
    token = None
    while True:
        kw: dict[str, Any] = {"Bucket": bucket, "Prefix": key, "MaxKeys": PAGE_KEYS}
        if token:
            kw["ContinuationToken"] = token
        elif lo:
            kw["StartAfter"] = key + (lo if lo.endswith("/") else lo[:-1])  # exclusive; a "dir/" bound names no file
        page = fs.call_s3("list_objects_v2", **kw)
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(key):]
            if hi is not None and rel >= hi:
                return
            if rel >= lo and rel and not rel.endswith("/"):  # "dir/" markers are no files (find skips them)
                yield f"{bucket}/{obj['Key']}"
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return


def _ls(fs: Any, path: str) -> list[dict[str, Any]]:
    entries = fs.ls(path, detail=True)
    if getattr(fs, "dircache", None) is not None:
        fs.invalidate_cache(path)  # a listing cache would keep every directory listed so far
    return entries


def _name(entry: dict[str, Any]) -> str:
    return entry["name"].rstrip("/").rsplit("/", 1)[-1]


def _walk(fs: Any, base: str, rel: str, lo: str, hi: str | None) -> Iterator[str]:
    here = f"{base}/{rel}".rstrip("/") if rel else base
    keys = sorted(rel + _name(e) + ("/" if e["type"] == "directory" else "") for e in _ls(fs, here))
    for key in keys:
        if hi is not None and key >= hi:
            return  # every later key, and every name under it, is past the slice
        if key.endswith("/"):
            if key < lo and not lo.startswith(key):
                continue  # every name under it is before the slice
            yield from _walk(fs, base, key, lo, hi)
        elif key >= lo:
            yield f"{base}/{key}"
