"""Where a store lives: a local directory, a read-only .zip, or an fsspec URL (s3://, file://, ...).

Only zarr's own stores are used (LocalStore, ZipStore, FsspecStore); this module picks one and
offers the few raw-key operations that copying a store byte for byte needs.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .checkpoint import check_zip_entries
from .destination import ABSENT, OURS, check_local_destination, is_logitstore_root, root_attrs
from .errors import DestinationError, FormatError, StoreStateError
from .schema import ATTR_ROOT

ROOT_KEY = "zarr.json"  # the root group's metadata, with our attributes
# zarr's LocalStore writes each key to "KEY.<32 hex>.partial" and renames it; a kill can leave one.
# Such a file is never part of the store: readers and copies skip it, a writer removes it.
TEMP_KEY = re.compile(r"\.[0-9a-f]{32}\.partial$")
# Writers hold an exclusive lock on this file inside a local store, a fit a shared one (see StoreLock);
# not part of the store.
LOCK_KEY = ".logitstore.lock"


def is_url(location: str) -> bool:
    return "://" in location


def is_zip(location: str) -> bool:
    return location.endswith(".zip") and not is_url(location)


def parse_storage_options(pairs: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs (from --storage-option) -> fsspec storage options; VALUE is JSON when it parses.

    `endpoint_url` and `region_name` are passed to the S3 client (s3fs `client_kwargs`).
    """
    opts: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise StoreStateError(f"--storage-option {pair!r} must be KEY=VALUE (e.g. endpoint_url=http://...)")
        key, value = pair.split("=", 1)
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
    client = {k: opts.pop(k) for k in ("endpoint_url", "region_name") if k in opts}
    if client:
        opts.setdefault("client_kwargs", {}).update(client)
    return opts


def _missing_backend(location: str, exc: ImportError) -> StoreStateError:
    scheme = location.split("://", 1)[0]
    hint = "pip install 'logitstore[s3]'" if scheme in ("s3", "s3a") else f"install the fsspec backend for {scheme}://"
    return StoreStateError(f"{location}: no filesystem for {scheme}:// ({exc}); {hint}")


def open_raw_store(location: str | os.PathLike, mode: str = "r",
                   storage_options: dict[str, Any] | None = None) -> Store:
    """A zarr Store for `location` (mode 'r' or 'w'; zip stores are read-only here)."""
    loc = os.fspath(location)
    read_only = mode == "r"
    try:
        if is_zip(loc):
            from zarr.storage import ZipStore

            if not read_only:
                raise StoreStateError(f"{loc}: a zip store is written once with `logitstore pack`, never in place")
            if not os.path.isfile(loc):
                raise StoreStateError(f"{loc}: no such zip store; check the path")
            check_zip_entries(Path(loc), FormatError, stored_only=True)  # R7: no inflation bomb
            return sync(ZipStore.open(loc, mode="r"))
        if is_url(loc):
            from zarr.storage import FsspecStore

            return FsspecStore.from_url(loc, storage_options=storage_options or {}, read_only=read_only)
        from zarr.storage import LocalStore

        if read_only and not os.path.isdir(loc):
            raise StoreStateError(f"{loc}: no store there; check the path (create one with `logitstore dump`)")
        return LocalStore(loc, read_only=read_only)
    except ImportError as exc:
        raise _missing_backend(loc, exc) from None


@contextlib.contextmanager
def known_zarr_warnings_silenced() -> Iterator[None]:
    """zarr warns about what the spec allows: numcodecs' BitRound on --keep-bits stores, at every open,
    and, when a group's members are listed, files that are no zarr node (a distributed dump's
    _segments/, a writer's lock)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")
        warnings.filterwarnings("ignore", message=r"Object at (_segments|\.logitstore\.lock) is not recognized")
        yield


def open_group(location: str | os.PathLike, mode: str = "r",
               storage_options: dict[str, Any] | None = None) -> zarr.Group:
    """Open the root group; mode 'r' (read-only), 'a' (create or update) or 'w' (replace)."""
    loc = os.fspath(location)
    store = open_raw_store(loc, "r" if mode == "r" else "w", storage_options)
    try:
        with known_zarr_warnings_silenced():
            return zarr.open_group(store, mode=mode, zarr_format=3)
    except FileNotFoundError:
        raise StoreStateError(f"{loc}: no store there; check the path (create one with `logitstore dump`)") from None
    except (ValueError, TypeError, KeyError) as exc:
        if mode == "r":
            raise FormatError(f"{loc}: not a readable Zarr v3 store: its root metadata ('zarr.json') does not parse "
                              f"({' '.join(str(exc).split())[:160]}); restore the store from its source") from None
        raise


def list_all_keys(store: Store, prefix: str = "") -> list[str]:
    """Every key under `prefix`, temporary ones included."""
    async def collect() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    return sorted(sync(collect()))


def list_keys(store: Store) -> list[str]:
    """The store's keys, without writers' temporary leftovers (TEMP_KEY) and lock (LOCK_KEY)."""
    return [k for k in list_all_keys(store) if not TEMP_KEY.search(k) and k != LOCK_KEY]


class StoreLock:
    """A non-blocking lock on a local store, held for as long as a command writes it (`exclusive`: a
    single-process dump, copy, merge, select, add-teacher) or a long reader reads it (shared: a fit):
    a writer never meets another writer or a running fit, and a fit never starts on a store being
    written. The OS drops it when the process ends, however it ends. A no-op for URL and zip stores,
    and for a store folder nobody can write; a distributed dump's many processes take none on the
    root (each holds its segments')."""

    def __init__(self, location: str, exclusive: bool):
        self.location, self._fd = location, None
        if is_url(location) or is_zip(location) or not (exclusive or os.path.isdir(location)):
            return
        path = os.path.join(location, LOCK_KEY)
        for _ in range(3):  # a lock on a file its last holder unlinked meanwhile is no lock: again
            try:
                if exclusive:
                    os.makedirs(location, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                if exclusive:
                    raise
                return  # a read-only store: nobody can write it either
            try:
                self._acquire(fd, exclusive)
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    self._fd = fd
                    return
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise StoreStateError(f"{location}: could not lock the store (its lock file kept changing); run this "
                              "command again")

    def _acquire(self, fd: int, exclusive: bool) -> None:
        import fcntl

        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "another process (a running fit)"
            raise StoreStateError(f"{self.location} is in use by {holder}; wait for it to finish (or stop it), "
                                  "then run this command again") from None
        if exclusive:
            os.ftruncate(fd, 0)
            os.write(fd, f"process {os.getpid()} on {os.uname().nodename}".encode("ascii", "replace"))

    def release(self) -> None:
        """Let go; the last holder out removes the lock file, so none is left in the store between runs
        (a process that opened it meanwhile sees the unlink and takes a fresh one)."""
        if self._fd is None:
            return
        import fcntl

        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # not while another reader holds it
            os.unlink(os.path.join(self.location, LOCK_KEY))
        except OSError:
            pass  # shared with another reader, or the folder went away with an overwrite
        os.close(self._fd)
        self._fd = None


def stray_keys(store: Store) -> list[str]:
    """Temporary files an interrupted write left behind (harmless; a writer removes them)."""
    return [k for k in list_all_keys(store) if TEMP_KEY.search(k)]


def remove_stray_keys(store: Store) -> int:
    """Delete the temporary leftovers of an interrupted run (only files named by TEMP_KEY)."""
    keys = stray_keys(store)
    for k in keys:
        sync(store.delete(k))
    return len(keys)


def _has_any_key(store: Store) -> bool:
    async def first() -> bool:
        async for _ in store.list():
            return True
        return False

    return bool(sync(first()))


def _local_store_is_ours(path: Path) -> bool:
    names = {p.name for p in path.iterdir()} - {LOCK_KEY}
    if not names:
        return True  # a writer's lock alone: it was stopped before it wrote anything
    root = path / ROOT_KEY
    if not root.is_file():
        return False
    attrs = root_attrs(root.read_bytes())
    # An empty root group alone is a store killed between creating its root and its attributes.
    return is_logitstore_root(attrs) or (attrs == {} and names == {ROOT_KEY})


def check_store_destination(location: str, storage_options: dict[str, Any] | None = None,
                            protected: Sequence[str] = (), flag: str = "--out") -> str:
    """ABSENT, EMPTY or OURS for a store a command wants to write; refuses anything else in one line
    (docs/FORMAT.md, W1): a tool writes or replaces only a store of its own."""
    if is_url(location):
        for p in protected:
            if p is not None and _url_overlaps(location, os.fspath(p)):
                raise DestinationError(f"{flag} {location!r} overlaps {os.fspath(p)!r}, which this command reads; "
                                       "write the store under another prefix")
        store = open_raw_store(location, "w", storage_options)
        if is_logitstore_root(root_attrs(get_bytes(store, ROOT_KEY))):
            return OURS
        if not _has_any_key(store):  # one listing page at most, not the whole prefix
            return ABSENT
        raise DestinationError(f"{flag} {location} holds objects that are not a logitstore store; nothing was "
                               "changed there; choose another prefix")
    if is_zip(location):
        raise DestinationError(f"{flag} {location}: a zip store is written once with `logitstore pack`")
    return check_local_destination(location, is_ours=_local_store_is_ours, what="logitstore store",
                                   protected=protected, flag=flag)


def _url_overlaps(a: str, b: str) -> bool:
    """Whether two URLs name the same prefix or one lies inside the other (s3://b/x and s3://b/x/y, not s3://b/xy)."""
    if not is_url(b):
        return False
    x, y = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return x.startswith(y) or y.startswith(x)


def get_bytes(store: Store, key: str) -> bytes | None:
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def set_bytes(store: Store, key: str, data: bytes) -> None:
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def key_exists(store: Store, key: str) -> bool:
    return bool(sync(store.exists(key)))


def delete_all(store: Store) -> None:
    """Empty a store of ours, its root metadata last, its writer's lock kept (W1: only after the
    destination was found to be ours)."""
    keys = [k for k in list_all_keys(store) if k != LOCK_KEY]
    for k in sorted(keys, key=lambda k: k == ROOT_KEY):
        sync(store.delete(k))


def retire_root(store: Store) -> None:
    """Mark a complete store incomplete before it is cleared for an overwrite, so that a run killed
    while clearing cannot leave the old root saying "complete" over missing chunks."""
    raw = get_bytes(store, ROOT_KEY)
    try:
        doc = json.loads(raw) if raw is not None else None
    except ValueError:
        return
    meta = doc.get("attributes", {}).get(ATTR_ROOT) if isinstance(doc, dict) else None
    if isinstance(meta, dict) and meta.get("complete"):
        meta["complete"] = False
        set_bytes(store, ROOT_KEY, json.dumps(doc).encode("utf-8"))


def crc32c_ok(data: bytes) -> bool:
    """A chunk's last 4 bytes are the little-endian CRC32C of the rest (zarr's crc32c codec, R6)."""
    import google_crc32c

    return len(data) >= 4 and google_crc32c.value(data[:-4]).to_bytes(4, "little") == data[-4:]


def stored_bytes(store: Store, prefix: str = "") -> int:
    """Bytes stored under `prefix` (the whole store for ""), wherever the store lives."""
    return int(sync(store.getsize_prefix(prefix)))
