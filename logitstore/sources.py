"""Where a corpus lives: a local folder or listing (corpus.py), a listing of URLs, an fsspec prefix of
loose images, WebDataset tar shards, or Parquet / Arrow files with an image column.

Each kind is a `Source`: its identity (root, listing, n_listed, the listing's sha256) from one
streaming pass that keeps one count per unit (shard, file, or a prefix's slice: listing.py), never
one entry per image; a remote unit fetched to be listed is kept for the dump (fetched once), and a
shard's sample places found by that pass are kept for the dump (its headers read once), both within
budgets; its items streamed from any listing position (`items`); and what a store records to find a
row's bytes again (`record`, docs/FORMAT.md "1.4: row sources"). `open_reader` reads rows back by id (trainer, show,
verify): a unit at a time, remote units fetched concurrently into a bounded local cache.

Ids say where an image is: `UNIT/KEY` for a shard (the tar file's path under the root, then the
WebDataset `__key__`: the member's name up to the first dot of its basename), `UNIT/ROW` for a
Parquet or Arrow file (the row's index in the file) or `UNIT/ID` with --id-column, and the path
under the root for loose images.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from .corpus import IMAGE_EXTENSIONS, Corpus, describe_failure, list_corpus
from .errors import CorpusError

KIND_URLS, KIND_PREFIX, KIND_WEBDATASET, KIND_PARQUET = "urls", "prefix", "webdataset", "parquet"
KINDS = (KIND_URLS, KIND_PREFIX, KIND_WEBDATASET, KIND_PARQUET)
SHARD_EXTENSIONS = (".tar",)
TABLE_EXTENSIONS = (".parquet", ".arrow")
# Loose remote images are fetched this many at a time (object stores answer each request in tens of ms).
CONCURRENT_REQUESTS = 16
# A prefix of loose images is cut into at most this many slices of equal count (a power of two times
# PREFIX_SLICE_FIRST images each, the last shorter): the units a distributed dump deals out.
PREFIX_SLICES = 4096
PREFIX_SLICE_FIRST = 8
# Remote shards and tables a dump fetches at once, ahead of the one it reads.
UNITS_AHEAD = 3
# Remote shards and tables are read through a local cache of whole units, at most this many bytes.
DEFAULT_CACHE_BYTES = 4 << 30
# A remote unit is fetched whole to be listed, and kept for the dump to read (fetched once), while the
# kept units of a process stay under this many bytes; past it a unit is listed and fetched again later.
LISTED_KEEP_BYTES = DEFAULT_CACHE_BYTES
# A shard on local disk (or a kept copy) is indexed when listed, so the dump reads its headers once: the
# (key, offset, size) of each sample is kept while a process's indexes stay under this many bytes.
LISTED_INDEX_BYTES = 256 << 20
_UNREADABLE = "\0unreadable"  # in a SourceReader's shard index (no member name holds NUL): why it ends early
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: key up to the first dot


class Member(NamedTuple):
    """Where a local shard keeps an image: read by the dump's decoding workers, not the main process."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), self.size, self.offset)


class Item(NamedTuple):
    """One listing position: the image's bytes (or where a local shard keeps them), or why not."""

    pos: int
    id: str
    data: bytes | Member | None
    error: str | None


@dataclass
class ShardIndex:
    """A local shard's samples as its listing read them from its headers: their keys, and where each
    image is (offset, size; size -1 for a sample without an image member), so the dump does not read
    the headers again. Compact: one string of keys and two int64 arrays (about 26 B a sample)."""

    keys: str     # the samples' keys, each followed by NUL (no tar member name holds one)
    offsets: Any  # np.ndarray int64
    sizes: Any    # np.ndarray int64

    @property
    def nbytes(self) -> int:
        return len(self.keys) + self.offsets.nbytes + self.sizes.nbytes

    def key_list(self) -> list[str]:
        return self.keys.split("\0")[:-1]

    def items(self, location: str, unit: str, skip: int) -> Iterator[tuple[str, Member | None, str | None]]:
        for key, offset, size in zip(self.key_list()[skip:], self.offsets[skip:].tolist(), self.sizes[skip:].tolist()):
            if size < 0:
                yield f"{unit}/{key}", None, describe_failure(_no_image(key))
            else:
                yield f"{unit}/{key}", Member(location, offset, size), None


def index_shard(location: str) -> ShardIndex:
    """Read a local shard's headers once (tarfile; webdataset's grouping of members into samples)."""
    keys, offsets, sizes = [], [], []
    for key, value in _shard_samples(location, {}, read=True, members=True):
        keys.append(key + "\0")
        offsets.append(value.offset if isinstance(value, Member) else 0)
        sizes.append(value.size if isinstance(value, Member) else -1)
    return ShardIndex("".join(keys), np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64))


def is_url(spec: str) -> bool:
    return "://" in str(spec)


def _fs(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def _join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}" if is_url(root) else os.path.join(root, rel)


def _protocol_root(url: str, fs: Any, path: str) -> str:
    """`path` (as the filesystem names it) back as a URL with `url`'s protocol."""
    proto = url.split("://", 1)[0]
    return f"{proto}://{path.lstrip('/')}" if proto not in ("file", "local") else f"{proto}:///{path.lstrip('/')}"


class _Sha:
    """The listing's identity, computed as today's `Corpus.listing_sha256` over the ids in order."""

    def __init__(self) -> None:
        self.h, self.n = hashlib.sha256(), 0

    def add(self, image_id: str) -> None:
        self.h.update(image_id.encode("utf-8", "surrogateescape") + b"\n")
        self.n += 1


@dataclass
class Source:
    """A streamed corpus: units of work, each with its count of listing positions."""

    kind: str
    root: str                       # local folder or URL every id is relative to
    listing: str                    # what was given (--images)
    units: list[str]                # unit names relative to root (shards, tables); [""] for a flat listing;
                                    # a prefix's slices: the first id of each ("" for the first)
    counts: list[int]               # listing positions per unit
    sha256: str
    image_column: str | None = None
    id_column: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    unit_shas: list[str] = field(default_factory=list)  # sha256 of each unit's ids (shards, tables)
    positional = False              # items are streamed, not read by position in DataLoader workers
    kept: dict[int, str] = field(default_factory=dict, repr=False)  # remote units fetched when listed
    _keep: Any = field(default=None, repr=False)                  # (folder, lock, [bytes kept])
    indexes: dict[int, ShardIndex] = field(default_factory=dict, repr=False)  # shards indexed when listed
    _index_bytes: int = field(default=0, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)
    _lister: "_Lister | None" = field(default=None, repr=False)  # the listing under way (list_in_background)

    def __getstate__(self) -> dict[str, Any]:  # a copy in a DataLoader worker reads no kept unit
        return {**self.__dict__, "kept": {}, "_keep": None, "indexes": {}, "_index_bytes": 0, "_lock": None,
                "_lister": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def list_units(self, ks: Sequence[int]) -> dict[int, tuple[int, str]]:
        """`list_unit` of units `ks`: remote ones UNITS_AHEAD at once (fetching); shards' headers parsed
        in processes, one a core (tarfile is Python work: threads would share one core)."""
        return dict(self._list_in_order(ks))

    def _list_in_order(self, ks: Sequence[int], cancel: threading.Event | None = None
                       ) -> Iterator[tuple[int, tuple[int, str]]]:
        """(k, `list_unit(k)`) for k in `ks`, in that order, each as soon as it and those before it are
        listed; once `cancel` is set, no unit not yet started is listed."""
        remote = is_url(self.root)
        if remote:
            self._keep_folder()  # before the threads that fill it
        procs = min(len(ks), _cores()) if self.kind == KIND_WEBDATASET else 1
        if procs < 2:
            with ThreadPoolExecutor(UNITS_AHEAD if remote else 1) as threads:
                yield from _in_order(ks, threads.map(self.list_unit, ks), cancel)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        def parse(path: str) -> ShardIndex:
            try:
                return parsers.submit(index_shard, path).result()
            except BrokenProcessPool:  # a child killed (out of memory, a signal): one line, not a traceback
                raise CorpusError(f"{path}: the process listing it died; run the same command again, or with "
                                  "fewer processes on this machine") from None

        # fork: the children run only tarfile, and start at once (no re-import of torch)
        with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_ignore_interrupts) as parsers, \
                ThreadPoolExecutor(max(procs, UNITS_AHEAD) if remote else procs) as threads:
            yield from _in_order(ks, threads.map(lambda k: self.list_unit(k, parse), ks), cancel)

    # -- listing in the background: a fresh dump runs its teacher on the first units meanwhile --------
    def list_in_background(self) -> None:
        """Start listing every unit in a thread. `items(0)` streams each unit as soon as it is listed;
        `settle_listing` waits for the rest and settles the identity; `stop_listing` abandons it."""
        if self._lister is None and not self.counts:
            self._lister = _Lister(self)

    @property
    def listing_pending(self) -> bool:
        return self._lister is not None

    @property
    def listing_finished(self) -> bool:
        """Whether `settle_listing` would return without waiting."""
        return self._lister is None or self._lister.finished

    def settle_listing(self) -> None:
        """Wait until every unit is listed, then settle the listing's identity (its error, if it failed)."""
        if self._lister is None:
            return
        self._lister.wait(len(self.units))
        self._lister.thread.join()
        listed, self._lister = self._lister.listed, None
        self.settle(listed)

    def stop_listing(self) -> None:
        """Abandon a listing under way: units not started are not listed; returns once the others are."""
        if self._lister is not None:
            self._lister.cancel.set()
            self._lister.thread.join()

    def list_unit(self, k: int, index_of: Callable[[str], ShardIndex] = index_shard) -> tuple[int, str]:
        """(count, sha256 of its ids) of unit k, from its tar headers (`index_of` a local copy) or its
        table's metadata and ids. A remote unit is fetched whole for this and kept for `items` while
        LISTED_KEEP_BYTES allows, so the dump does not fetch it again."""
        location = _join(self.root, self.units[k])
        sha = _Sha()
        with _unit_errors(location):
            local = self._fetch_to_keep(k, location) if is_url(location) else None
            try:
                if self.kind == KIND_WEBDATASET:
                    listed = self._listed_index(k, index_of(local or location))
                else:
                    for image_id in _table_ids(local or location, self.units[k], self.image_column,
                                               self.id_column, self.storage_options):
                        sha.add(image_id)
            except BaseException:
                if local is not None:
                    os.unlink(local)
                raise
        if local is not None and not self._admit(k, local):
            os.unlink(local)
            self._forget_index(k)  # it pointed into the copy
        return listed if self.kind == KIND_WEBDATASET else (sha.n, sha.h.hexdigest())

    def _listed_index(self, k: int, index: ShardIndex) -> tuple[int, str]:
        """(count, sha256 of its ids) of shard k from its index, which is kept while LISTED_INDEX_BYTES allows."""
        sha = _Sha()
        for key in index.key_list():
            sha.add(f"{self.units[k]}/{key}")
        size = index.nbytes
        with self._lock:
            if self._index_bytes + size <= LISTED_INDEX_BYTES:
                self._index_bytes += size
                self.indexes[k] = index
        return sha.n, sha.h.hexdigest()

    def _forget_index(self, k: int) -> None:
        with self._lock:
            index = self.indexes.pop(k, None)
            if index is not None:
                self._index_bytes -= index.nbytes

    def release(self, pos: int) -> None:
        """Every listing position before `pos` has been read (by the dump's workers, from Members that
        point into kept copies): the kept copies of the units that end there go, and leave the budget."""
        if not self.kept:
            return
        # While the listing runs, the counts of the units listed so far (a kept unit may not be among them yet)
        ends = np.cumsum(self.counts if self._lister is None else [c for c, _ in list(self._lister.listed)])
        for k in list(self.kept):
            if k < len(ends) and ends[k] <= pos:
                self._drop(k)

    def _keep_folder(self) -> str:
        if self._keep is None:
            folder = tempfile.mkdtemp(prefix="logitstore-listed-")
            weakref.finalize(self, _remove_folder, folder, os.getpid())
            self._keep = (folder, threading.Lock(), [0])
        return self._keep[0]

    def _fetch_to_keep(self, k: int, location: str) -> str:
        fs, path = _fs(location, self.storage_options)
        local = os.path.join(self._keep_folder(), f"{k:09d}{os.path.splitext(location)[1]}")
        try:
            fs.get_file(path, local)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(local)
            raise
        return local

    def _admit(self, k: int, local: str) -> bool:
        size = os.path.getsize(local)
        _, lock, total = self._keep
        with lock:
            if total[0] + size > LISTED_KEEP_BYTES:
                return False
            total[0] += size
            self.kept[k] = local
        return True

    def _drop(self, k: int) -> None:
        """Unit k's kept copy is read (or useless): its bytes leave the budget."""
        local = self.kept.pop(k, None)
        if local is not None and self._keep is not None:
            with self._keep[1]:
                self._keep[2][0] -= os.path.getsize(local)
            os.unlink(local)

    def settle(self, listed: Sequence[tuple[int, str]]) -> None:
        """Every unit's (count, sha): the listing's identity is the sha256 of the lines
        `UNIT TAB COUNT TAB SHA LF` in unit order, so processes that each list their own units agree."""
        self.counts = [c for c, _ in listed]
        self.unit_shas = [h for _, h in listed]
        if not sum(self.counts):
            raise CorpusError(f"{self.listing}: the {'shards' if self.kind == KIND_WEBDATASET else 'tables'} "
                              "hold no samples")
        h = hashlib.sha256()
        for unit, (c, u) in zip(self.units, listed):
            h.update(f"{unit}\t{c}\t{u}\n".encode("utf-8"))
        self.sha256 = h.hexdigest()

    @property
    def n_listed(self) -> int:
        return sum(self.counts)

    def listing_sha256(self) -> str:
        return self.sha256

    def record(self) -> dict[str, Any]:
        """The store's `corpus.source` (format 1.4): how to find a row's bytes from its id."""
        rec: dict[str, Any] = {"kind": self.kind}
        if self.kind == KIND_PARQUET:
            rec["image_column"] = self.image_column
            rec["id_column"] = self.id_column
        return rec

    def protected(self) -> list[str]:
        """What a dump reads, which its --out must not overlap: the shards or tables, or the root."""
        if self.kind == KIND_PREFIX:
            return [self.root]
        return [_join(self.root, u) for u in self.units if u] or [self.root]

    def locate(self, pos: int) -> tuple[int, int]:
        """(unit index, position within it) of listing position `pos`."""
        for u, c in enumerate(self.counts):
            if pos < c:
                return u, pos
            pos -= c
        return len(self.counts), 0

    def items(self, start: int = 0, stop: int | None = None) -> Iterator[Item]:
        """Every listing position from `start` on, in order, read one unit at a time. Remote shards and
        tables are fetched whole, UNITS_AHEAD at once, into a temporary folder, and read there.
        `stop`: no unit past the one that holds position stop - 1 is listed or fetched (read-ahead
        would otherwise reach into the units another torchrun process dumps). While the listing runs in
        the background (`list_in_background`), from position 0 only: each unit once it is listed."""
        lister = self._lister
        if lister is not None and (start or stop is not None):
            raise ValueError("a listing under way streams from its first position to its end")
        u, skip = self.locate(start) if lister is None else (0, 0)
        end = len(self.units) if stop is None or stop <= start else min(len(self.units), self.locate(stop - 1)[0] + 1)
        for k in [k for k in set(self.kept) | set(self.indexes) if k < u]:
            self._drop(k)  # listed here, dumped before (a resumed dump)
            self._forget_index(k)
        pos = start
        if self.kind in (KIND_PREFIX, KIND_URLS):  # loose images: one stream of requests across units
            for image_id, data, error in _fetch_all(self, u, skip, end):
                yield Item(pos, image_id, data, error)
                pos += 1
            return
        remote = self.kind in (KIND_WEBDATASET, KIND_PARQUET) and is_url(self.root)
        with tempfile.TemporaryDirectory(prefix="logitstore-dump-") as tmp, \
                ThreadPoolExecutor(UNITS_AHEAD) as pool:
            cache = _UnitCache(1 << 62, self.storage_options, tmp)
            ahead: dict[int, Any] = {}
            for k in range(u, end):
                listed = end if lister is None else lister.wait(k + 1)  # raises the listing's error
                index = self.indexes.get(k) if not remote or k in self.kept else None
                if index is not None:  # listed here: its samples' places are known, read by the workers
                    location = self.kept.get(k) or _join(self.root, self.units[k])
                    for image_id, data, error in index.items(location, self.units[k], skip):
                        yield Item(pos, image_id, data, error)
                        pos += 1
                    self._forget_index(k)  # a kept copy stays until the workers have read it (`release`)
                    skip = 0
                    continue
                local = None
                if remote and k in self.kept:
                    local = self.kept[k]  # fetched when it was listed
                elif remote:
                    for j in range(k, min(end, listed, k + UNITS_AHEAD)):  # listed: kept or not is known
                        if j not in ahead and j not in self.kept:
                            ahead[j] = pool.submit(cache.local, _join(self.root, self.units[j]))
                    try:
                        local = ahead.pop(k).result()
                    except Exception as exc:
                        raise CorpusError(f"{_join(self.root, self.units[k])}: cannot be fetched "
                                          f"({describe_failure(exc)}); run the same command again to resume") from None
                for image_id, data, error in _unit_items(self, k, skip, local):
                    yield Item(pos, image_id, data, error)
                    pos += 1
                if k in self.kept:
                    self._drop(k)
                elif local is not None:
                    os.unlink(local)  # read here in the main process: no worker needs it any more
                skip = 0


def _in_order(ks: Sequence[int], results: Iterator[Any], cancel: threading.Event | None
              ) -> Iterator[tuple[int, Any]]:
    """(k, result) pairs of an Executor.map over `ks`, stopping early once `cancel` is set; closing the
    map's iterator cancels the calls not started (the executor would otherwise run them all on exit)."""
    try:
        for k, r in zip(ks, results):
            yield k, r
            if cancel is not None and cancel.is_set():
                return
    finally:
        results.close()  # type: ignore[attr-defined]


class _Lister:
    """A Source's units listed in order in a thread; readers wait for the units they need."""

    def __init__(self, source: Source):
        self.listed: list[tuple[int, str]] = []
        self.finished = False
        self.error: BaseException | None = None
        self.cancel = threading.Event()
        self._cond = threading.Condition()
        units = source._list_in_order(range(len(source.units)), self.cancel)
        self.thread = threading.Thread(target=self._run, args=(units,), name="logitstore-listing", daemon=True)
        self.thread.start()

    def _run(self, units: Iterator[tuple[int, tuple[int, str]]]) -> None:
        try:
            for _, result in units:
                with self._cond:
                    self.listed.append(result)
                    self._cond.notify_all()
        except BaseException as exc:  # handed to whoever waits for a unit it did not list
            self.error = exc
        finally:
            with self._cond:
                self.finished = True
                self._cond.notify_all()

    def wait(self, n: int) -> int:
        """Until at least `n` units are listed or the listing ended: how many are; the listing's error
        if it failed (or was stopped) before unit n."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.listed) >= n or self.finished)
            if len(self.listed) < n:
                if self.error is not None:
                    raise self.error
                raise CorpusError("the corpus's listing was stopped")
            return len(self.listed)


def _cores() -> int:
    """Cores this process may use, shared with the other processes of a torchrun on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _ignore_interrupts() -> None:
    """A listing child leaves Ctrl-C to its parent, which stops the listing with one line."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _remove_folder(folder: str, pid: int) -> None:
    if os.getpid() == pid:  # not in a forked worker, whose copy of the Source goes away first
        shutil.rmtree(folder, ignore_errors=True)


def open_source(spec: str | os.PathLike, *, image_column: str | None = None, id_column: str | None = None,
                storage_options: dict[str, Any] | None = None, listed: bool = True) -> Corpus | Source:
    """--images as a corpus: a local folder or listing of local paths (a `Corpus`, as always), or a
    `Source` for a listing of URLs, an fsspec prefix, WebDataset shards or Parquet / Arrow files.
    With `listed` False, shards and tables are not listed yet: the caller lists each unit
    (`Source.list_unit`, any process any unit) and hands every result to `Source.settle`."""
    source = _open_source(spec, image_column, id_column, storage_options)
    if listed and isinstance(source, Source) and not source.counts:
        listed_units = source.list_units(range(len(source.units)))
        source.settle([listed_units[k] for k in range(len(source.units))])
    return source


def _open_source(spec: str | os.PathLike, image_column: str | None, id_column: str | None,
                 storage_options: dict[str, Any] | None) -> Corpus | Source:
    so = dict(storage_options or {})
    text = os.fspath(spec)
    if id_column is not None and image_column is None:
        raise CorpusError(f"{text}: --id-column names rows of a Parquet table; give --image-column too")
    if text.startswith("file://"):
        text = text[len("file://"):] or "/"
    if "{" in text and "}" in text:
        return _from_files(text, _expand(text, so), image_column, id_column, so)
    if is_url(text):
        fs, path = _fs(text, so)
        if text.lower().endswith(SHARD_EXTENSIONS + TABLE_EXTENSIONS):
            return _from_files(text, [text], image_column, id_column, so)
        try:
            return _from_prefix(text, fs, path, image_column, id_column, so)
        except (OSError, ValueError) as exc:
            raise CorpusError(f"{text}: cannot list it ({describe_failure(exc)}); check the URL and "
                              "--storage-option") from None
    src = Path(text).expanduser()
    if src.is_file() and src.name.lower().endswith(SHARD_EXTENSIONS + TABLE_EXTENSIONS):
        return _from_files(text, [str(src.resolve())], image_column, id_column, so)
    if src.is_dir() and (image_column is not None or not _has_images(src)):
        files = sorted(str(p) for p in src.resolve().rglob("*") if p.is_file())
        return _from_listed(text, str(src.resolve()), files, image_column, id_column, so)
    if src.is_file() and _first_line(src).find("://") >= 0:
        return _url_listing(src, so)
    if image_column is not None:
        raise CorpusError(f"{text}: --image-column applies to Parquet or Arrow files (a file, a folder of "
                          "them or a pattern)")
    return list_corpus(src)


def _has_images(folder: Path) -> bool:
    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".") for f in files):
            return True
    return False


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    return line
    except (UnicodeDecodeError, OSError):
        pass
    return ""


def _expand(pattern: str, so: dict[str, Any]) -> list[str]:
    from braceexpand import braceexpand

    names = list(braceexpand(pattern))
    if not is_url(pattern):
        missing = [n for n in names if not Path(n).expanduser().is_file()]
        if missing:
            raise CorpusError(f"{pattern}: {len(missing)} of its {len(names)} files are missing (first: {missing[0]}); "
                              "fix the pattern")
        return [str(Path(n).expanduser().resolve()) for n in names]
    return names


def _from_listed(spec: str, root: str, files: list[str], image_column: str | None, id_column: str | None,
                 so: dict[str, Any]) -> Source:
    """A folder or prefix: its shards, else its tables (with --image-column), else its loose images."""
    lower = [f.lower() for f in files]
    if image_column is not None:
        tables = [f for f, lo in zip(files, lower) if lo.endswith(TABLE_EXTENSIONS)]
        tables = _hf_order(tables, files, so) or tables
        if not tables:
            raise CorpusError(f"{spec}: no Parquet or Arrow files ({', '.join(TABLE_EXTENSIONS)}) found for "
                              "--image-column")
        return _tables(spec, root, tables, image_column, id_column, so)
    shards = [f for f, lo in zip(files, lower) if lo.endswith(SHARD_EXTENSIONS)]
    if shards:
        return _shards(spec, root, shards, so)
    images = [f for f, lo in zip(files, lower) if lo.endswith(IMAGE_EXTENSIONS)
              and not os.path.basename(f).startswith(".")]
    if not images:
        raise CorpusError(f"{spec}: no images ({', '.join(IMAGE_EXTENSIONS)}), .tar shards or (with "
                          "--image-column) Parquet files found; check --images")
    return list_corpus(root)  # a local folder (a URL prefix of loose images is `_from_prefix`'s)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(name).startswith(".")


def _from_prefix(spec: str, fs: Any, path: str, image_column: str | None, id_column: str | None,
                 so: dict[str, Any]) -> Source:
    """A URL prefix, listed as a stream (logitstore/listing.py): one pass in name order keeps its shards
    and tables (few), and for loose images only the listing's sha256 (as `sorted(fs.find(path))` would
    give it) and at most PREFIX_SLICES slices of equal count (each a name range, its first image's id
    the bound), so memory does not grow with the number of images."""
    from .listing import walk_sorted

    base = path.rstrip("/")
    root = _protocol_root(spec, fs, base)
    bounds, counts, per = [""], [0], PREFIX_SLICE_FIRST
    sha, kept = _Sha(), []
    for p in walk_sorted(fs, base):
        rel = p[len(base) + 1:]
        if rel.lower().endswith(SHARD_EXTENSIONS + TABLE_EXTENSIONS) or os.path.basename(rel) == "state.json":
            kept.append(_protocol_root(spec, fs, p))
        elif _is_image(rel):
            if counts[-1] == per:
                bounds.append(rel)
                counts.append(0)
                if len(bounds) > PREFIX_SLICES:  # twice as long, half as many: every slice but the last is full
                    bounds, counts, per = bounds[::2], [sum(counts[i:i + 2]) for i in range(0, len(counts), 2)], per * 2
            counts[-1] += 1
            sha.add(rel)
    if image_column is not None or any(f.lower().endswith(SHARD_EXTENSIONS) for f in kept) or not sha.n:
        return _from_listed(spec, root, kept, image_column, id_column, so)  # tables, shards, or the error
    return Source(KIND_PREFIX, root, spec, bounds, counts, sha.h.hexdigest(), storage_options=so)


def _hf_order(tables: list[str], files: list[str], so: dict[str, Any]) -> list[str]:
    """A Hugging Face `save_to_disk` export: its Arrow files in the order its state.json lists them."""
    import json

    states = [f for f in files if os.path.basename(f) == "state.json"]
    if len(states) != 1:
        return []
    try:
        with _open(states[0], so) as f:
            names = [d["filename"] for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    folder = states[0].rsplit("/", 1)[0] if is_url(states[0]) else os.path.dirname(states[0])
    return [_join(folder, n) for n in names]


def _from_files(spec: str, files: list[str], image_column: str | None, id_column: str | None,
                so: dict[str, Any]) -> Source:
    if not files:
        raise CorpusError(f"{spec}: the pattern names no files")
    root = os.path.commonpath([os.path.dirname(f) for f in files]) if not is_url(files[0]) else \
        _common_url([f.rsplit("/", 1)[0] for f in files])
    if all(f.lower().endswith(SHARD_EXTENSIONS) for f in files) and image_column is None:
        return _shards(spec, root, files, so)
    if all(f.lower().endswith(TABLE_EXTENSIONS) for f in files):
        if image_column is None:
            raise CorpusError(f"{spec}: Parquet/Arrow files need --image-column (the column holding the images)")
        return _tables(spec, root, files, image_column, id_column, so)
    raise CorpusError(f"{spec}: give .tar shards, or Parquet/Arrow files with --image-column, not a mix")


def _common_url(folders: list[str]) -> str:
    parts = [f.split("/") for f in folders]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return "/".join(common)


def _rel(root: str, f: str) -> str:
    return f[len(root.rstrip("/")) + 1:] if is_url(root) else os.path.relpath(f, root).replace(os.sep, "/")


def _open(location: str, so: dict[str, Any]) -> Any:
    if not is_url(location):
        return open(location, "rb")
    import fsspec

    return fsspec.open(location, "rb", **so).open()


@contextlib.contextmanager
def _unit_errors(location: str) -> Iterator[None]:
    """A shard or table that cannot be listed through is a corpus fault: one line naming it."""
    try:
        yield
    except CorpusError:
        raise
    except (OSError, tarfile.TarError, EOFError, ValueError) as exc:
        raise CorpusError(f"{location}: cannot be read ({describe_failure(exc)}); check --images and "
                          "--storage-option, or remove it from the corpus") from None


# -- WebDataset shards ----------------------------------------------------------------------------

def _shards(spec: str, root: str, files: list[str], so: dict[str, Any]) -> Source:
    return Source(KIND_WEBDATASET, root, spec, [_rel(root, f) for f in files], [], "", storage_options=so)


def _shard_samples(location: str, so: dict[str, Any], read: bool, skip: int = 0, members: bool = False
                   ) -> Iterator[tuple[str, bytes | Member | BaseException]]:
    """(key, image bytes) of each sample of a shard in member order (webdataset's grouping: consecutive
    members sharing a key); b"" when not `read` or before `skip`; with `members`, where the bytes are
    instead; an exception when the sample has no image member. Local shards are read seekably, so
    skipped and unread members cost no read."""
    f = _open(location, so)
    try:
        mode = "r|" if is_url(location) else "r:"
        with tarfile.open(fileobj=f, mode=mode) as tf:
            key, image, n = None, None, 0
            for m in tf:
                if not m.isfile():
                    continue
                match = _KEY.match(m.name)
                if match is None:
                    continue
                k, ext = match.group(1), match.group(2).lower()
                if k != key:
                    if key is not None:
                        yield key, image if image is not None else _no_image(key)
                        n += 1
                    key, image = k, None
                if image is None and ("." + ext.rsplit(".", 1)[-1]) in IMAGE_EXTENSIONS:
                    image = (b"" if not read or n < skip else Member(location, m.offset_data, m.size) if members
                             else tf.extractfile(m).read())
                tf.members = []  # headers are not kept: a shard of any length costs the same memory
            if key is not None:
                yield key, image if image is not None else _no_image(key)
    finally:
        f.close()


def _no_image(key: str) -> BaseException:
    return CorpusError(f"sample {key} has no image member ({', '.join(IMAGE_EXTENSIONS)})")


# -- Parquet and Arrow tables ---------------------------------------------------------------------

def _tables(spec: str, root: str, files: list[str], image_column: str, id_column: str | None,
            so: dict[str, Any]) -> Source:
    return Source(KIND_PARQUET, root, spec, [_rel(root, f) for f in files], [], "", image_column, id_column, so)


def _batches(location: str, columns: list[str], so: dict[str, Any], skip: int = 0) -> Iterator[Any]:
    """Record batches of `columns`, from row `skip` on (Parquet skips whole row groups unread)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = _open(location, so)
    try:
        if location.lower().endswith(".parquet"):
            pf = pq.ParquetFile(f)
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise CorpusError(f"{location}: no column {missing[0]!r} (columns: {', '.join(pf.schema_arrow.names)})")
            first, rows = 0, 0
            while first < pf.num_row_groups and rows + pf.metadata.row_group(first).num_rows <= skip:
                rows += pf.metadata.row_group(first).num_rows
                first += 1
            for batch in pf.iter_batches(batch_size=1024, row_groups=range(first, pf.num_row_groups),
                                         columns=columns):
                if rows + batch.num_rows > skip:
                    yield batch.slice(max(0, skip - rows))
                rows += batch.num_rows
        else:
            try:
                reader = pa.ipc.open_stream(f)
            except pa.ArrowInvalid:
                f.seek(0)
                reader = pa.ipc.open_file(f)
                reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
            rows = 0
            for batch in reader:
                missing = [c for c in columns if c not in batch.schema.names]
                if missing:
                    raise CorpusError(f"{location}: no column {missing[0]!r} (columns: {', '.join(batch.schema.names)})")
                if rows + batch.num_rows > skip:
                    yield batch.select(columns).slice(max(0, skip - rows))
                rows += batch.num_rows
    except (OSError, ValueError) as exc:
        if isinstance(exc, CorpusError):
            raise
        raise CorpusError(f"{location}: not a readable Parquet/Arrow table ({describe_failure(exc)})") from None
    finally:
        f.close()


def _table_ids(location: str, unit: str, image_column: str, id_column: str | None,
               so: dict[str, Any]) -> Iterator[str]:
    """The ids of a table's rows: UNIT/ROW, or UNIT/VALUE of --id-column, which must name every row once (ids are
    unique in a store): a null, an empty value or a value given twice is refused, naming it."""
    row = 0
    hashes = bytearray()  # 8 bytes a row, not the ids themselves, to find a value given twice
    for batch in _batches(location, [id_column or image_column] if id_column else [image_column], so):
        if not id_column:
            for _ in range(batch.num_rows):
                yield f"{unit}/{row}"
                row += 1
            continue
        for v in batch.column(0).to_pylist():
            if v is None or str(v) == "":
                raise CorpusError(f"{location}: row {row} has {'no' if v is None else 'an empty'} value in --id-column "
                                  f"{id_column!r}; every row needs an id of its own, or drop --id-column to number "
                                  "the rows")
            hashes += hashlib.blake2b(str(v).encode("utf-8", "surrogateescape"), digest_size=8).digest()
            yield f"{unit}/{v}"
            row += 1
    h = np.frombuffer(bytes(hashes), np.uint64)
    if len(np.unique(h)) < len(h):
        _name_repeated_id(location, id_column or "", so)


def _name_repeated_id(location: str, id_column: str, so: dict[str, Any]) -> None:
    """Raise naming the first value of `id_column` that names a second row (exact: the hashes only said one may)."""
    seen: set[str] = set()
    for batch in _batches(location, [id_column], so):
        for v in map(str, batch.column(0).to_pylist()):
            if v in seen:
                raise CorpusError(f"{location}: the value {v[:80]!r} of --id-column {id_column!r} names more than "
                                  "one row; ids must be unique (pick a unique column, or drop --id-column to number "
                                  "the rows)")
            seen.add(v)


def _image_bytes(value: Any) -> bytes | BaseException:
    """A cell of the image column: raw bytes, or Hugging Face's Image feature `{bytes, path}`."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return CorpusError("the image cell holds no bytes" + ("" if value is None else f" ({type(value).__name__})"))


def _table_rows(location: str, unit: str, image_column: str, id_column: str | None, so: dict[str, Any],
                skip: int = 0) -> Iterator[tuple[str, bytes | BaseException]]:
    row = skip
    columns = [image_column] + ([id_column] if id_column else [])
    for batch in _batches(location, columns, so, skip):
        images = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if id_column else range(row, row + batch.num_rows)
        for v, i in zip(images, ids):
            yield f"{unit}/{i}", _image_bytes(v)
        row += batch.num_rows


# -- streaming items ------------------------------------------------------------------------------

def _unit_items(src: Source, k: int, skip: int, local: str | None = None
                ) -> Iterator[tuple[str, bytes | Member | None, str | None]]:
    """Unit k's items from position `skip` in it; `local`: a fetched copy of a remote unit."""
    unit = src.units[k]
    location = local or (_join(src.root, unit) if unit else src.root)

    def out(image_id: str, value: Any) -> tuple[str, bytes | None, str | None]:
        if isinstance(value, BaseException):
            return image_id, None, describe_failure(value)
        return image_id, value, None

    try:
        if src.kind == KIND_WEBDATASET:
            n = 0
            # A shard on local disk is read by the decoding workers (Member), a fetched copy here.
            for key, value in _shard_samples(location, src.storage_options, read=True, skip=skip,
                                             members=local is None):
                if n >= skip:
                    yield out(f"{unit}/{key}", value)
                n += 1
        else:
            for image_id, value in _table_rows(location, unit, src.image_column, src.id_column,
                                               src.storage_options, skip):
                yield out(image_id, value)
    except CorpusError:
        raise
    except (OSError, tarfile.TarError, EOFError) as exc:
        # A shard or table that cannot be read through is a corpus fault, not per-image failures.
        raise CorpusError(f"{location}: cannot be read through ({describe_failure(exc)}); fix or remove it, then "
                          "run the same command again to resume") from None


def _fetch_all(src: Source, k: int, skip: int, end: int) -> Iterator[tuple[str, bytes | None, str | None]]:
    """Loose remote images from position `skip` of unit k to the end of unit end - 1, CONCURRENT_REQUESTS
    requests in flight across unit bounds, yielded in listing order. A unit is listed only when its ids
    are due."""
    fs, _ = _fs(src.root, src.storage_options)

    def fetch(image_id: str) -> tuple[str, bytes | None, str | None]:
        try:
            return image_id, fs.cat_file(_join(src.root, image_id)), None
        except Exception as exc:  # a missing or unreadable object is that image's failure
            return image_id, None, describe_failure(exc)

    ids = _ids_from(src, k, skip, end)
    with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
        window: list[Any] = []
        for image_id in ids:
            window.append(pool.submit(fetch, image_id))
            if len(window) >= 4 * CONCURRENT_REQUESTS:
                yield window.pop(0).result()
        for fut in window:
            yield fut.result()


def _ids_from(src: Source, k: int, skip: int, end: int) -> Iterator[str]:
    for j in range(k, end):
        try:
            yield from _listed_ids(src, j, skip if j == k else 0)
        except (OSError, ValueError) as exc:
            if isinstance(exc, CorpusError):
                raise
            raise CorpusError(f"{_join(src.root, src.units[j]) if src.units[j] else src.root}: cannot be listed "
                              f"({describe_failure(exc)}); run the same command again to resume") from None


def _listed_ids(src: Source, k: int, skip: int) -> Iterator[str]:
    if src.kind == KIND_PREFIX:
        yield from _slice_ids(src, k, skip)
        return
    n = 0
    for url in _listing_lines(Path(src.listing)):
        if n >= skip:
            yield _rel(src.root, url)
        n += 1


def _slice_ids(src: Source, k: int, skip: int) -> Iterator[str]:
    """The ids of a prefix's slice k from its position `skip` on, listed afresh: this process lists no
    other slice. A count that differs from the one listed first means the prefix changed meanwhile."""
    from .listing import walk_sorted

    fs, path = _fs(src.root, src.storage_options)
    base = path.rstrip("/")
    hi = src.units[k + 1] if k + 1 < len(src.units) else None
    n = 0
    for p in walk_sorted(fs, base, src.units[k], hi):
        rel = p[len(base) + 1:]
        if not _is_image(rel):
            continue
        if n >= src.counts[k]:
            n += 1  # more than listed: the prefix changed
            break
        if n >= skip:
            yield rel
        n += 1
    if n != src.counts[k]:
        raise CorpusError(f"{_join(src.root, src.units[k])}: now lists {n} images where the dump listed "
                          f"{src.counts[k]}; the prefix changed during the dump: dump it again with --overwrite")


# -- a listing of URLs ----------------------------------------------------------------------------

def _listing_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def _url_listing(path: Path, so: dict[str, Any]) -> Source:
    """One URL a line, streamed twice (root, then ids); nothing kept per image."""
    root = _url_listing_root(path)
    sha = _Sha()
    for url in _listing_lines(path):
        sha.add(_rel(root, url))
    return Source(KIND_URLS, root, str(path.resolve()), [""], [sha.n], sha.h.hexdigest(), storage_options=so)


def _url_listing_root(path: Path) -> str:
    """The common folder of a listing's URLs: what its ids are relative to."""
    root: str | None = None
    for url in _listing_lines(path):
        if not is_url(url):
            raise CorpusError(f"{path}: mixes URLs and local paths (line {url!r}); list one kind")
        folder = url.rsplit("/", 1)[0]
        root = folder if root is None else _common_url([root, folder])
    return root or ""


# -- reading rows back by id ----------------------------------------------------------------------

class _UnitCache:
    """Remote units as whole local files in one folder that every process of a run may share (a file is
    fetched under a temporary name and renamed, so a reader never sees half of one); past `limit` bytes
    the least recently fetched go first."""

    def __init__(self, limit: int, so: dict[str, Any], folder: str | None = None):
        self.limit, self.so = limit, so
        self.dir = folder or tempfile.mkdtemp(prefix="logitstore-units-")
        self.owned = folder is None
        os.makedirs(self.dir, exist_ok=True)

    def path_of(self, url: str) -> str:
        return os.path.join(self.dir, hashlib.sha256(url.encode()).hexdigest()[:32] + os.path.splitext(url)[1])

    def local(self, url: str) -> str:
        dest = self.path_of(url)
        if os.path.exists(dest):
            return dest
        fs, path = _fs(url, self.so)
        tmp = f"{dest}.{os.getpid()}.{threading.get_ident()}.partial"
        fs.get_file(path, tmp)
        os.replace(tmp, dest)
        self._evict(keep=dest)
        return dest

    def _evict(self, keep: str) -> None:
        try:
            files = [(e.stat().st_mtime, e.stat().st_size, e.path) for e in os.scandir(self.dir)
                     if not e.name.endswith(".partial")]
        except OSError:
            return
        total = sum(f[1] for f in files)
        for _, size, path in sorted(files):
            if total <= self.limit:
                break
            if path != keep:
                try:
                    os.unlink(path)  # a reader that has it open keeps reading it
                    total -= size
                except OSError:
                    pass

    def close(self) -> None:
        if self.owned:
            shutil.rmtree(self.dir, ignore_errors=True)


class SourceReader:
    """Bytes of stored rows by id, wherever the store's corpus lives (`open_reader`)."""

    def __init__(self, root: str, record: dict[str, Any] | None, storage_options: dict[str, Any] | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, cache_dir: str | None = None):
        self.root, self.record = str(root), record or {}
        self.kind = self.record.get("kind")
        self.so = dict(storage_options or {})
        self.cache_bytes, self.cache_dir = cache_bytes, cache_dir
        self._cache: _UnitCache | None = None
        self._index: OrderedDict[str, dict[str, Any]] = OrderedDict()  # unit -> key -> where
        self._groups: OrderedDict[tuple[str, int], tuple[list[Any], int]] = OrderedDict()  # row groups, bytes
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers get their own caches
        return {**self.__dict__, "_cache": None, "_index": OrderedDict(), "_groups": OrderedDict(), "_fds": OrderedDict(),
                "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def read(self, image_id: str) -> bytes:
        if self.kind in (KIND_WEBDATASET, KIND_PARQUET):
            unit, key = self._split(image_id)
            return self._read_in_unit(unit, key)
        location = _join(self.root, image_id)
        if not is_url(location):
            return Path(location).read_bytes()
        fs, path = _fs(location, self.so)
        return fs.cat_file(path)

    def read_many(self, ids: Sequence[str]) -> list[bytes | BaseException]:
        """Each id's bytes (or why not), units fetched concurrently, then read in id order."""
        def one(i: str) -> bytes | BaseException:
            try:
                return self.read(i)
            except Exception as exc:  # the caller names the row
                return exc
        if self.kind in (KIND_WEBDATASET, KIND_PARQUET) and is_url(self.root):
            units = [u for u in dict.fromkeys(self._split(i)[0] for i in ids) if not self._have(u)]
            if units:
                with ThreadPoolExecutor(min(len(units), CONCURRENT_REQUESTS)) as pool:
                    list(pool.map(lambda u: self._safe(self._unit_file, u), units))
            return [one(i) for i in ids]
        if is_url(self.root):
            with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
                return list(pool.map(one, ids))
        return [one(i) for i in ids]

    def _have(self, unit: str) -> bool:
        return self._cache is not None and os.path.exists(self._cache.path_of(_join(self.root, unit)))

    @staticmethod
    def _safe(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:  # reported again, per row, by the read that needs it
            return None

    def _split(self, image_id: str) -> tuple[str, str]:
        exts = SHARD_EXTENSIONS if self.kind == KIND_WEBDATASET else TABLE_EXTENSIONS
        lower = image_id.lower()
        for ext in exts:
            at = lower.find(ext + "/")
            if at >= 0:
                return image_id[:at + len(ext)], image_id[at + len(ext) + 1:]
        raise CorpusError(f"{image_id}: not an id of a {self.kind} corpus (UNIT{exts[0]}/KEY)")

    def _unit_file(self, unit: str) -> str:
        location = _join(self.root, unit)
        if not is_url(location):
            return location
        if self._cache is None:
            self._cache = _UnitCache(self.cache_bytes, self.so, self.cache_dir)
        return self._cache.local(location)

    def _read_in_unit(self, unit: str, key: str) -> bytes:
        with self._lock:
            index = self._index.get(unit)
            if index is not None:
                self._index.move_to_end(unit)
        local = self._unit_file(unit)
        if is_url(self.root) and not os.path.exists(local):  # evicted by another process just now
            local = self._unit_file(unit)
        if index is None:
            index = self._build_index(local, unit)
            with self._lock:
                self._index[unit] = index
                while len(self._index) > 64:
                    self._index.popitem(last=False)
        if key not in index:
            if _UNREADABLE in index:
                raise OSError(f"{unit} cannot be read through to {key} ({index[_UNREADABLE]}): the shard is truncated "
                              "or damaged; restore it")
            raise FileNotFoundError(f"{unit} holds no {key}")
        where = index[key]
        if self.kind == KIND_WEBDATASET:
            offset, size = where
            return os.pread(self._fd(local), size, offset)
        value = _image_bytes(self._table_cell(local, self.record["image_column"], where))
        if isinstance(value, BaseException):
            raise value
        return value

    def _fd(self, local: str) -> int:
        """An open descriptor of a shard (a few kept: a block's rows come from one or two shards)."""
        with self._lock:
            fd = self._fds.get(local)
            if fd is not None:
                self._fds.move_to_end(local)
                return fd
            fd = self._fds[local] = os.open(local, os.O_RDONLY)
            while len(self._fds) > 16:
                os.close(self._fds.popitem(last=False)[1])
            return fd

    def _table_cell(self, local: str, column: str, row: int) -> Any:
        with self._lock:
            for (path, first), (values, _) in self._groups.items():
                if path == local and first <= row < first + len(values):
                    self._groups.move_to_end((path, first))
                    return values[row - first]
        first, values = _table_group(local, column, row)
        nbytes = sum(len(v.get("bytes") or b"") if isinstance(v, dict) else len(v or b"") for v in values)
        with self._lock:
            self._groups[(local, first)] = (values, nbytes)
            while len(self._groups) > 1 and (len(self._groups) > TABLE_GROUPS_KEPT or
                                             sum(n for _, n in self._groups.values()) > TABLE_CACHE_BYTES):
                self._groups.popitem(last=False)
        return values[row - first]

    def _build_index(self, local: str, unit: str) -> dict[str, Any]:
        """Key -> (offset, size) of each sample's image member; or -> row of a table."""
        index: dict[str, Any] = {}
        if self.kind == KIND_WEBDATASET:
            try:
                with tarfile.open(local, "r:") as tf:
                    for m in tf:
                        match = _KEY.match(m.name) if m.isfile() else None
                        if match and ("." + match.group(2).lower().rsplit(".", 1)[-1]) in IMAGE_EXTENSIONS:
                            index.setdefault(match.group(1), (m.offset_data, m.size))
            except (tarfile.TarError, EOFError) as exc:  # truncated or damaged: the samples before it still read
                index[_UNREADABLE] = f"{type(exc).__name__}: {exc}"
            return index
        id_column = self.record.get("id_column")
        if id_column:
            row = 0
            for batch in _batches(local, [id_column], {}):
                for v in batch.column(0).to_pylist():
                    index.setdefault(str(v), row)
                    row += 1
            return index
        return _RowIndex()

    def __enter__(self) -> "SourceReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._cache is not None:
            self._cache.close()


class _RowIndex(dict):
    """Rows of a table without an id column: the key is the row number."""

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.isdigit()

    def __getitem__(self, key: str) -> int:
        return int(key)


# Decoded row groups a reader keeps: the trainer shuffles rows within blocks of >= 2,048 rows, so a
# batch touches a few neighbouring groups; each is decoded once while its block is being read.
TABLE_GROUPS_KEPT = 64
TABLE_CACHE_BYTES = 256 << 20  # ... and at most this many image bytes, per reader


def _table_group(local: str, column: str, row: int) -> tuple[int, list[Any]]:
    """(first row, cells) of the row group (or, for Arrow, the whole file) holding `row`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if local.lower().endswith(".parquet"):
        pf = pq.ParquetFile(local)
        first = 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row < first + n:
                return first, pf.read_row_group(g, columns=[column]).column(0).to_pylist()
            first += n
        raise IndexError(f"row {row} is past the end of {os.path.basename(local)}")
    with pa.memory_map(local) as mm:
        try:
            table = pa.ipc.open_stream(mm).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(mm).read_all()
    return 0, table.column(column).to_pylist()


def open_reader(root: str, record: dict[str, Any] | None, storage_options: dict[str, Any] | None = None,
                cache_bytes: int = DEFAULT_CACHE_BYTES, cache_dir: str | None = None) -> SourceReader:
    """A reader of the rows of a store whose corpus is at `root` (a folder or URL; --images may say where
    it is now), of the kind its `corpus.source` records (None: loose files under `root`). Remote shards
    and tables are fetched whole into `cache_dir` (a fresh temporary folder if None), `cache_bytes` at most."""
    return SourceReader(root, record, storage_options, cache_bytes, cache_dir)


def images_root(images: str | os.PathLike) -> str:
    """--images given to a reader (trainer, show, verify) -> the root its stored ids are relative to:
    a pattern's or a single shard's or table's folder, else the folder or URL itself."""
    text = os.fspath(images)
    if text.startswith("file://"):
        text = text[len("file://"):] or "/"
    if "{" in text:
        text = text[:text.index("{")].rsplit("/", 1)[0]
    elif text.lower().endswith(SHARD_EXTENSIONS + TABLE_EXTENSIONS):
        text = text.rsplit("/", 1)[0]
    elif not is_url(text) and Path(text).expanduser().is_file():  # the listing file the dump was given
        listing = Path(text).expanduser()
        return _url_listing_root(listing) if "://" in _first_line(listing) else str(list_corpus(listing).root)
    return text.rstrip("/") if is_url(text) else str(Path(text).expanduser())
