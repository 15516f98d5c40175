"""Write a store: whole chunks from buffered rows, off the main thread, with a resumable commit point.

Commit protocol (docs/FORMAT.md, W2-W4; docs/DESIGN.md): rows land in whole chunks; after chunks'
arrays are written, the progress attribute records how many rows are final and how far through
the corpus listing they reach (at most every COMMIT_INTERVAL_S). A crash before a record only
costs rewriting those chunks with the same bytes. `complete` is set last, after the arrays are
trimmed to N.
"""
from __future__ import annotations

import queue
from collections import deque
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from . import schema
from .destination import OURS
from .errors import ResumeMismatchError, StoreStateError, WriteError
from .schema import StoreMeta
from .rows import Rows
from .store import LogitStore, array_names, row_array_names, row_nbytes
from .fingerprint import row_fingerprints
from .records import (STAT_BLOCK_ROWS, Statistics, Written, chunk_records, contents_fingerprint, corpus_entries,
                      corpus_hash_of, failures_by_reason, record_names)
from .locations import stored_bytes
from .chunk_io import ChunkWriter, Pending, put
from .locations import StoreLock, check_store_destination, delete_all, open_group, remove_stray_keys, retire_root


def chunk_codecs() -> list[Any]:
    """The codec chain after serialisation: Zstd level 3, then a CRC32C checksum of every chunk.

    benchmarks/chunk_size.py: on float16 logits Zstd-3 matched Blosc(zstd, byte-shuffle) in size
    (both ~1.08x: a teacher's mantissas are close to random) and was as fast or faster; LZ4 did
    not compress at all. One codec for every array keeps the spec short.
    """
    return [ZstdCodec(level=3), Crc32cCodec()]


def logits_filters(keep_bits: int | None) -> list[Any]:
    """Lossy option: BitRound keeps `keep_bits` mantissa bits so Zstd finds the zeros (see FORMAT.md)."""
    if keep_bits is None:
        return []
    try:
        from zarr.codecs.numcodecs import BitRound
    except ImportError:  # zarr < 3.1.3
        from numcodecs.zarr3 import BitRound
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "numcodecs codecs are not in the Zarr v3 spec": known, specified
        return [BitRound(keepbits=keep_bits)]


@dataclass
class Progress:
    rows: int = 0                # rows that are final
    next_source: int = 0         # listing position after the last final row
    failures: list[list[str]] = field(default_factory=list)  # the first FIRST_FAILURES [id, reason], for a summary
    n_failures: int = 0          # entries of failed_ids / failed_reasons that are final (positions < next_source)
    statistics: dict[str, Any] | None = None  # 1.4: running statistics of rows [0, rows)

    def to_dict(self) -> dict[str, Any]:
        d = {"rows": self.rows, "next_source": self.next_source, PROGRESS_N_FAILURES: self.n_failures}
        return {**d, schema.STATISTICS: self.statistics} if self.statistics is not None else d


# Failures are appended to the failed_ids / failed_reasons arrays as they come (format 1.4: W2), in chunks
# of this many entries; the progress attribute keeps only their count, so it stays small on a dirty corpus.
PROGRESS_N_FAILURES = schema.PROGRESS_N_FAILURES
FAILURE_CHUNK = 4096
FIRST_FAILURES = 1000  # kept in memory for the dump's summary


def create_failure_arrays(group: zarr.Group, n: int = 0) -> dict[str, zarr.Array]:
    return {name: group.create_array(name, shape=(n,), chunks=(FAILURE_CHUNK,), dtype=str, fill_value="",
                                     compressors=chunk_codecs(), overwrite=True) for name in schema.FAILURE_ARRAYS}


def failure_arrays(group: zarr.Group, keep: int, legacy: list[list[str]] | None = None) -> dict[str, zarr.Array]:
    """The growing failure arrays of a store being written, cut back to the `keep` entries its progress
    records as final (a crash may have appended more); `legacy`: a pre-1.4 progress's own list."""
    names = array_names(str(group.store), group)
    if legacy is not None or not set(schema.FAILURE_ARRAYS) <= names:
        arrays = create_failure_arrays(group)
        append_failures(arrays, 0, [(f[0], f[1]) for f in legacy or []])
        return arrays
    arrays = {name: group[name] for name in schema.FAILURE_ARRAYS}
    for a in arrays.values():
        if a.shape[0] != keep:
            a.resize((keep,))
    return arrays


def append_failures(arrays: dict[str, zarr.Array], at: int, failures: Sequence[tuple[str, str]]) -> None:
    if not failures:
        return
    for k, name in enumerate(schema.FAILURE_ARRAYS):
        a = arrays[name]
        a.resize((at + len(failures),))
        a[at:] = np.array([f[k] for f in failures], dtype=object)


def create_arrays(group: zarr.Group, meta: StoreMeta, capacity: int) -> None:
    r, v = meta.chunk_rows, meta.views.count
    specs = {
        **{name: ((capacity, v, last), (r, v, last), dtype, 0) for name, (last, dtype) in meta.target_arrays().items()},
        schema.IDS: ((capacity,), (r,), str, ""),
        schema.DIGESTS: ((capacity, 32), (r, 32), "uint8", 0),
        schema.IMAGE_HW: ((capacity, 2), (r, 2), "int32", 0),
        schema.VIEW_PARAMS: ((capacity, v, 5), (r, v, 5), "int32", 0),
        **{name: ((capacity, v, *tail), (r, v, *tail), dtype, 0)
           for name, (tail, dtype) in schema.view_extra_arrays(meta.views).items()},
    }
    if meta.embedded_pixels:
        pre = meta.preprocess
        tail = (v, pre.channels, *pre.size)
        specs[schema.PIXELS] = ((capacity, *tail), (meta.pixel_chunk_rows, *tail), "uint8", 0)
    if meta.has_records:  # 1.4: one record per chunk of rows and row array (docs/FORMAT.md)
        k, a = -(-capacity // r), len(record_names(meta))
        specs[schema.CHUNK_SHA256] = ((k, a, 32), (schema.RECORDS_PER_CHUNK, a, 32), "uint8", 0)
    for name, (shape, chunks, dtype, fill) in specs.items():
        group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                           filters=logits_filters(meta.keep_bits) if name in lossy_arrays(meta) else None,
                           compressors=chunk_codecs(), overwrite=True)


def lossy_arrays(meta: StoreMeta) -> tuple[str, ...]:
    """The arrays --keep-bits rounds: the teacher's logits, in whichever form the store keeps them."""
    return tuple(name for name, (_, dtype) in meta.target_arrays().items() if dtype == meta.dtype)


def round_lossy(values: np.ndarray, keep_bits: int) -> np.ndarray:
    """`values` as --keep-bits stores them: the BitRound filter's own rounding, which is idempotent, so
    records and statistics computed on these are those of the stored, decoded values."""
    from numcodecs import BitRound

    return BitRound(keepbits=keep_bits).encode(values).view(values.dtype).reshape(values.shape)


def stored_values(rows: Rows, meta: StoreMeta) -> Rows:
    """`rows` as a store with `meta` gives them back (only --keep-bits changes values on the way)."""
    if meta.keep_bits is None:
        return rows
    lossy = lossy_arrays(meta)
    if rows.targets is not None:
        return replace(rows, targets={k: round_lossy(v, meta.keep_bits) if k in lossy else v
                                      for k, v in rows.targets.items()})
    return replace(rows, logits=round_lossy(rows.logits, meta.keep_bits)) if schema.LOGITS in lossy else rows


def write_rows(arrays: dict[str, zarr.Array], a: int, rows: Rows, chunks: ChunkWriter | None = None,
               per_chunk: Callable[[int], Any] | None = None, chunk_rows: int = 0) -> Pending | None:
    """Rows into every row array at [a, a + len(rows)); with `chunks`, whole chunks of every array it can encode
    are written by its pool, one job per `chunk_rows` rows, each returning `per_chunk(i)` (the same bytes,
    without zarr's per-chunk Python: logitstore/chunk_io.py), and the rest through zarr meanwhile. The jobs
    may still run on return: wait with `.results()` on what is returned."""
    b = a + len(rows)
    values: dict[str, Any] = {**rows.target_arrays(), schema.IDS: np.array(list(rows.ids), dtype=object),
                              schema.DIGESTS: rows.digests, schema.IMAGE_HW: rows.image_hw,
                              schema.VIEW_PARAMS: rows.view_params, **(rows.view_extras or {})}
    if schema.PIXELS in arrays:
        values[schema.PIXELS] = rows.pixels
    pending = chunks.start(arrays, a, values, len(rows), chunk_rows, per_chunk) if chunks is not None else None
    for name, v in values.items():
        done = pending.done[name] if pending is not None else 0
        if done < len(v):
            arrays[name][a + done:b] = v[done:]
    return pending


def every_chunk_written(arr: zarr.Array) -> zarr.Array:
    """The array, writing every chunk even when all its values are the fill value.

    zarr otherwise compares each chunk with the fill value before writing it (and deletes it when
    equal): a full pass over every chunk. Without it, zarr 3.1 wrote 1000-class float16 logits in
    4 MiB chunks, four a write, at 650 MB/s instead of 408 on this 2-core machine. Readers see the
    same values either way.
    """
    with_config = getattr(arr, "with_config", None)  # zarr >= 3.1
    return with_config({"write_empty_chunks": True}) if with_config is not None else arr


def describe_differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = [f"{k}: store has {old.get(k)!r}, this run has {new.get(k)!r}"
             for k in new if old.get(k) != new.get(k)]
    return "; ".join(diffs)


# The progress attribute is rewritten at most this often: each rewrite is a read-modify-write of the
# root zarr.json (the whole metadata, ~2.5 ms with 1000 class names), as long as writing a 160 KiB
# chunk (benchmarks/scale.py). Rows written since are final on disk already; a crash before the
# next commit only makes a resumed dump write them again, with the same bytes.
COMMIT_INTERVAL_S = 0.25

# Whole chunks handed to zarr in one write when rows are waiting (the teacher is ahead of storage).
# zarr encodes the chunks of one write concurrently (Zstd in its thread pool), one write at a time:
# 1000-class float16 logits in 4 MiB chunks wrote at 325 MB/s one chunk a call, 548 MB/s four a
# call, 529 MB/s eight (zarr 3.1, 2 cores; the whole writer: benchmarks/RESULTS.md, "Millions of
# rows"). A slow teacher still gets one chunk a write, so a kill loses at most what is unwritten.
# (Since chunk_io's per-chunk jobs, zarr writes only what they cannot encode; a write is still the unit
# of one commit, and four chunks keep both pool threads busy between commits.)
CHUNKS_PER_WRITE = 4
IN_FLIGHT_WRITES = 2  # writes whose chunk jobs run at once (memory: their rows, 2 x 16 MiB of logits)
WRITE_BYTES = 64 << 20  # ... and at most this many decoded bytes a write (embedded pixels are large)


class StoreWriter:
    """Buffered, whole-chunk writer with a background thread. Use `open_writer`.

    `end` is the listing position after the last row this writer may receive: the listing's length,
    or the end of a distributed dump's segment. A segment is never completed as a store of its own:
    closing it commits its last rows (progress `next_source` = `end`) and leaves it for assembly.
    """

    def __init__(self, group: zarr.Group, meta: StoreMeta, progress: Progress, queue_chunks: int = 4,
                 end: int | None = None, segment: bool = False):
        self.group, self.meta, self.progress = group, meta, progress
        self.lock: StoreLock | None = None  # held by open_writer's writer until close
        self.end = meta.corpus.n_listed if end is None else end
        self.segment = segment
        self._arrays = {name: every_chunk_written(group[name]) for name in row_array_names(meta)}
        self._failed = failure_arrays(group, progress.n_failures)
        self._buffer: list[Rows] = []
        self._buffered = 0
        self._pending_failures: list[tuple[int, str, str]] = []
        # Bounded: if storage falls behind, the teacher waits rather than RAM filling up.
        self._queue: queue.Queue[Rows | None] = queue.Queue(maxsize=queue_chunks * 8)
        self._error: BaseException | None = None
        self._committed_at = 0.0  # monotonic time of the last progress commit
        self._behind = False       # the recorded progress is behind self.progress
        chunk_bytes = row_nbytes(self._arrays) * meta.chunk_rows
        self._per_write = max(1, min(CHUNKS_PER_WRITE, WRITE_BYTES // max(1, chunk_bytes)))  # chunks a write
        self._ended = False        # the writer thread has taken close()'s end marker
        self._records_open(meta.has_records)
        self._chunks = ChunkWriter()  # whole chunks, encoded beside zarr (same bytes), with their records
        # Writes whose chunk jobs may still run, oldest first: (first row, rows, their stored values, jobs).
        # The next write's jobs start before the last one's are waited for, so the pool never idles while
        # this thread gathers rows, records and commits.
        self._in_flight: deque[tuple[int, Rows, Rows, Pending | None]] = deque()
        self._next_row = progress.rows  # where the next write starts
        self._thread = threading.Thread(target=self._run, name="logitstore-writer", daemon=True)
        self._thread.start()

    # -- main-thread side -------------------------------------------------------------------
    def submit(self, batch: Rows) -> None:
        self._raise_if_failed()
        self._queue.put(batch)

    def close(self, finalize: bool) -> StoreMeta:
        """Drain the queue; with `finalize`, write the last partial chunk and mark complete. The lock is
        released whatever happens."""
        try:
            self._queue.put(None)
            self._thread.join()
            self._raise_if_failed()
            if finalize:
                self._flush(final=True)
                return self.meta if self.segment else self._finalize()
            self._commit(self.progress.rows, self.progress.next_source)  # an interruption keeps what is written
        except OSError as exc:
            raise write_failure(str(self.group.store), exc) from None
        finally:
            self._chunks.shutdown()
            if self.lock is not None:
                self.lock.release()
        return self.meta

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # -- writer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        group = self.meta.chunk_rows * self._per_write
        try:
            while not self._ended:
                try:
                    self._take(self._queue.get(timeout=COMMIT_INTERVAL_S))
                except queue.Empty:  # the teacher is slow: record what is written meanwhile
                    self._finish_writes(0)
                    if self._behind:
                        self._commit(self.progress.rows, self.progress.next_source)
                    continue
                while not self._ended and self._buffered < group:  # what is already waiting, up to a write
                    try:
                        self._take(self._queue.get_nowait())
                    except queue.Empty:
                        break
                self._flush(final=False)
                if self._queue.empty():  # the teacher is behind: nothing to overlap, so commit what is written now
                    self._finish_writes(0)
            self._finish_writes(0)
        except BaseException as exc:  # surfaced on the main thread at the next submit/close
            self._error = write_failure(str(self.group.store), exc) if isinstance(exc, OSError) else exc
            while not self._ended:  # unblock the producer
                self._ended = self._queue.get() is None

    def _take(self, batch: Rows | None) -> None:
        if batch is None:
            self._ended = True
            return
        self._buffer.append(batch)
        self._buffered += len(batch)
        self._pending_failures.extend(batch.failures)

    def _flush(self, final: bool) -> None:
        """Write the buffered whole chunks (with `final`, the last partial one too), up to
        CHUNKS_PER_WRITE chunks a write."""
        r = self.meta.chunk_rows
        while self._buffered >= r or (final and self._buffered > 0):
            rows = Rows.concat(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
            n = min(len(rows) if final else len(rows) // r * r, r * self._per_write)
            self._write_rows(rows.take(slice(0, n)))
            rest = rows.take(slice(n, None))
            self._buffer, self._buffered = ([rest] if len(rest) else []), len(rest)
        if final:
            self._finish_writes(0)
            self._commit(self.progress.rows, self.end)

    def _write_rows(self, rows: Rows) -> None:
        # One pool job per chunk of rows encodes and writes its arrays and computes its records and statistics
        # (hashlib, Zstd, CRC32C and NumPy release the GIL), two chunks at once: finalize then reads nothing back.
        r, meta, a = self.meta.chunk_rows, self.meta, self._next_row
        per_chunk, stored = None, rows
        if self._has_records:
            stored = stored_values(rows, meta)
            names = record_names(meta)
            # Statistics chunk by chunk cut the rows into the same STAT_BLOCK_ROWS blocks as one call over the
            # write (which starts on a chunk boundary) did, so they are the same bits; other chunk sizes: one
            # call, in _finish_writes.
            split = r % STAT_BLOCK_ROWS == 0

            def per_chunk(i: int) -> tuple[np.ndarray, Statistics | None]:
                part = stored.take(slice(i * r, (i + 1) * r))
                stats = None
                if split:
                    stats = Statistics(meta.num_classes)
                    stats.add(part, meta)
                return chunk_records(part, names, r)[0], stats
        self._in_flight.append((a, rows, stored, write_rows(self._arrays, a, rows, self._chunks, per_chunk, r)))
        self._next_row = a + len(rows)
        self._finish_writes(IN_FLIGHT_WRITES - 1)

    def _finish_writes(self, keep: int) -> None:
        """Wait for the oldest writes' chunk jobs until `keep` are left; take up their records and statistics,
        then commit the rows they complete."""
        r = self.meta.chunk_rows
        while len(self._in_flight) > keep:
            a, rows, stored, pending = self._in_flight.popleft()
            done = pending.results() if pending is not None else []
            if self._has_records:
                for _, stats in done:
                    self._stats = self._stats.merged(stats) if stats is not None else self._stats
                if r % STAT_BLOCK_ROWS:
                    self._stats.add(stored, self.meta)
                self._corpus.update(corpus_entries(stored))
                recs = np.stack([rec for rec, _ in done])
                self._records[a // r:a // r + len(recs)] = recs
                self._write_records(a // r, a // r + len(recs))  # before the commit that covers these rows
            self._commit(a + len(rows), int(rows.source[-1]) + 1, force=False)

    def _write_records(self, k0: int, k1: int) -> None:
        """Records [k0, k1) into the store: the whole record chunks holding them, encoded from the records kept in
        memory (no read-modify-write through zarr's event loop, which held the GIL ~1 ms a write), or through
        zarr where chunk_io cannot encode the array."""
        arr = self._record_array
        encode, rpc = self._chunks.encoder(arr), arr.chunks[0]
        if encode is None:
            arr[k0:k1] = self._records[k0:k1]
            return
        for c in range(k0 // rpc, (k1 - 1) // rpc + 1):
            block = self._records[c * rpc:(c + 1) * rpc]
            if len(block) < rpc:  # the array's last chunk: zarr stores it whole, padded with the fill value, 0
                block = np.concatenate([block, np.zeros((rpc - len(block), *block.shape[1:]), block.dtype)])
            put(arr, c, encode(block))

    # -- 1.4 chunk records and statistics ------------------------------------------------------
    def _records_open(self, enabled: bool) -> None:
        """Take up the records, statistics and corpus hash of the rows already committed (a resume)."""
        self._has_records = enabled
        if not enabled:
            return
        r, n = self.meta.chunk_rows, self.progress.rows
        self._record_array = self.group[schema.CHUNK_SHA256]
        self._records = np.zeros(self._record_array.shape, np.uint8)
        done = -(-n // r)
        if done:
            self._records[:done] = self._record_array[:done]
        self._stats = Statistics.from_dict(self.progress.statistics, self.meta.num_classes)
        self._corpus = corpus_hash_of(self.group, n)

    def written(self) -> Written:
        """The records, statistics and corpus fingerprint of the rows written so far."""
        k = -(-self.progress.rows // self.meta.chunk_rows)
        return Written(self._records[:k], self._stats, "sha256:" + self._corpus.hexdigest())

    def _commit(self, rows: int, next_source: int, force: bool = True) -> None:
        """Advance the progress to `rows` final rows covering listing positions [0, next_source); record
        it in the store now if `force`d or if the last record is COMMIT_INTERVAL_S old."""
        done = [f for f in self._pending_failures if f[0] < next_source]
        self._pending_failures = [f for f in self._pending_failures if f[0] >= next_source]
        append_failures(self._failed, self.progress.n_failures, [(i, r) for _, i, r in done])
        first = self.progress.failures + [[i, r] for _, i, r in done[:max(0, FIRST_FAILURES - len(self.progress.failures))]]
        self.progress = Progress(rows, next_source, first, self.progress.n_failures + len(done))
        now = time.monotonic()
        self._behind = not (force or now - self._committed_at >= COMMIT_INTERVAL_S)
        if not self._behind:
            if self._has_records:  # built only when recorded (3 x 1000 counts: not every write)
                self.progress.statistics = self._stats.to_dict()
            self.group.attrs[schema.ATTR_PROGRESS] = self.progress.to_dict()
            self._committed_at = now

    def _finalize(self) -> StoreMeta:
        written = self.written() if self._has_records else None
        self.meta = finalize_store(self.group, self.meta, self.progress.rows, None, self.progress.n_failures, written)
        return self.meta


def write_failure(location: str, exc: OSError) -> WriteError:
    """A write the destination refused, as one line: what failed, and that the same command resumes."""
    what = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    return WriteError(f"{location}: a write failed: {what}{where}. The store is left incomplete; free space or "
                      "fix the destination, then run the same command again to resume")


def finalize_store(group: zarr.Group, meta: StoreMeta, n: int, failures: list[list[str]] | None,
                   n_failures: int = 0, written: Written | None = None) -> StoreMeta:
    """Rows [0, n) are written: add the failure arrays (or keep the `n_failures` entries written as the
    dump went, when `failures` is None), trim to n, fingerprint, mark complete.

    A 1.4 store is fingerprinted from what its writer computed while writing (`written`); an older
    one (never written now) by reading every chunk back."""
    if failures is None:
        failure_arrays(group, n_failures)
    else:
        n_failures = len(failures)
        for name in schema.FAILURE_ARRAYS:
            values = [f[0] if name == schema.FAILED_IDS else f[1] for f in failures]
            arr = group.create_array(name, shape=(len(values),), chunks=(max(1, min(len(values), 65536)),),
                                     dtype=str, fill_value="", compressors=chunk_codecs(), overwrite=True)
            if values:
                arr[:] = np.array(values, dtype=object)
    for name in row_array_names(meta):
        a = group[name]
        if a.shape[0] != n:
            a.resize((n, *a.shape[1:]))
    meta = replace(meta, corpus=replace(meta.corpus, n_images=n, n_failed=n_failures), complete=True)
    if meta.has_records:
        if written is None:
            raise ValueError("finalize_store: a 1.4 store needs the records its writer computed")
        k = -(-n // meta.chunk_rows)
        rec = group[schema.CHUNK_SHA256]
        if rec.shape[0] != k:
            rec.resize((k, *rec.shape[1:]))
        if failures is None:  # the failures were written as the dump went: count their reasons once, here
            failures = stored_failures(group, n_failures)
        stats = replace(written.statistics, failures_by_reason=failures_by_reason(failures))
        rows = {"corpus": written.corpus, "contents": contents_fingerprint(written.records[:k])}
        # Stored bytes per row array, listed once here so `info` lists nothing (copies keep chunk bytes).
        meta = replace(meta, statistics={**stats.to_dict(), "stored_bytes": {
            name: stored_bytes(group.store, name) for name in row_array_names(meta)}})
    else:
        # Reading every chunk back both fingerprints the contents and proves each chunk decodes
        # (checksums included) before the store is called complete.
        rows = row_fingerprints(LogitStore(str(group.store), group, meta, n))
    meta = replace(meta, fingerprints={"teacher": meta.teacher.fingerprint(), **rows}).sealed()
    group.attrs[schema.ATTR_ROOT] = meta.to_dict()
    if schema.ATTR_PROGRESS in group.attrs:
        del group.attrs[schema.ATTR_PROGRESS]
    return meta


def stored_failures(group: zarr.Group, n: int) -> list[tuple[str, str]]:
    """The first `n` entries of the failure arrays."""
    if n <= 0:
        return []
    ids, reasons = (group[name][:n] for name in schema.FAILURE_ARRAYS)
    return [(str(i), str(r)) for i, r in zip(ids, reasons)]


def check_resumable(path: str, old: StoreMeta, meta: StoreMeta) -> None:
    """Refuse to resume a complete store, or one started with different settings (naming them)."""
    diff = describe_differences(old.run_fingerprint(), meta.run_fingerprint())
    if old.complete:
        what = f"made with a different recipe ({diff})" if diff else "made with this recipe"
        raise StoreStateError(f"{path} is already a complete store {what}; pass --overwrite to replace it "
                              "or choose another --out")
    if diff:
        raise ResumeMismatchError(f"{path} holds an unfinished dump started differently ({diff}); "
                                  "re-run with the original settings, or pass --overwrite to start over")


def already_complete(path: str, meta: StoreMeta, storage_options: dict[str, Any] | None = None,
                     protected: Sequence[str] = ()) -> StoreMeta | None:
    """The metadata of the complete store at `path` if this very recipe made it (a re-run has nothing
    to do), None if there is no complete store there; a complete store of another recipe is refused."""
    if check_store_destination(path, storage_options, protected) != OURS:
        return None
    group = open_group(path, mode="r", storage_options=storage_options)
    if schema.ATTR_ROOT not in group.attrs:
        return None
    old = schema.meta_from_attrs(dict(group.attrs))
    if not old.complete:
        return None
    if describe_differences(old.run_fingerprint(), meta.run_fingerprint()):
        check_resumable(path, old, meta)  # raises, naming the differences
    return old


def open_writer(path: str, meta: StoreMeta, overwrite: bool = False,
                storage_options: dict[str, Any] | None = None,
                span: tuple[int, int] | None = None, protected: Sequence[str] = ()) -> StoreWriter:
    """Create a store at `path`, or resume the incomplete one there if it was started identically.

    `path` must be absent, empty or a store of ours (`check_store_destination`); `protected` are the
    paths the command reads (the corpus, source stores), which it must not overlap.
    `span` = (lo, hi): the store receives only listing positions [lo, hi) (one segment of a
    distributed dump; see logitstore/distributed.py) and is left for assembly when closed.
    """
    check_store_destination(path, storage_options, protected)
    try:
        lock = StoreLock(path, exclusive=True)
    except OSError as exc:
        raise write_failure(path, exc) from None
    try:
        writer = _open_writer(path, meta, overwrite, storage_options, span)
    except OSError as exc:
        lock.release()
        raise write_failure(path, exc) from None
    except BaseException:
        lock.release()
        raise
    writer.lock = lock
    return writer


def _open_writer(path: str, meta: StoreMeta, overwrite: bool, storage_options: dict[str, Any] | None,
                 span: tuple[int, int] | None) -> StoreWriter:
    lo, hi = span or (0, meta.corpus.n_listed)
    group = open_group(path, mode="a", storage_options=storage_options)
    remove_stray_keys(group.store)  # an interrupted run's temporary files
    existing = group.attrs.get(schema.ATTR_ROOT)
    if existing is not None and not overwrite:
        old = schema.meta_from_attrs(dict(group.attrs))
        check_resumable(path, old, meta)
        if old.has_records != meta.has_records:
            raise ResumeMismatchError(f"{path} holds an unfinished dump of format {old.format_version}, which this "
                                      f"logitstore (format {meta.format_version}) cannot continue; pass --overwrite "
                                      "to start over")
        p = group.attrs.get(schema.ATTR_PROGRESS) or {}
        if schema.PROGRESS_SEGMENT_ROWS in p:
            raise StoreStateError(f"{path} is an unfinished distributed dump; finish it with the same command "
                                  "under torchrun (any number of processes), or pass --overwrite to start over")
        legacy = p.get("failures")  # a progress written before 1.4 lists its failures itself
        progress = Progress(int(p.get("rows", 0)), int(p.get("next_source", lo)), [],
                            len(legacy) if isinstance(legacy, list) else int(p.get(PROGRESS_N_FAILURES, 0)),
                            p.get(schema.STATISTICS))
        if isinstance(legacy, list):
            failure_arrays(group, 0, legacy)
        progress.failures = [list(f) for f in stored_failures(group, min(progress.n_failures, FIRST_FAILURES))]
        needed = set(row_array_names(meta)) | ({schema.CHUNK_SHA256} if meta.has_records else set())
        if progress.rows == 0 and not needed <= array_names(path, group):
            create_arrays(group, meta, hi - lo)  # killed while creating them: nothing to keep
        return StoreWriter(group, replace(meta, created=old.created), progress, end=hi, segment=span is not None)
    retire_root(group.store)
    delete_all(group.store)
    group = open_group(path, mode="a", storage_options=storage_options)
    group.attrs[schema.ATTR_ROOT] = meta.to_dict()
    create_arrays(group, meta, hi - lo)
    progress = Progress(0, lo)
    create_failure_arrays(group)
    group.attrs[schema.ATTR_PROGRESS] = progress.to_dict()
    return StoreWriter(group, meta, progress, end=hi, segment=span is not None)
