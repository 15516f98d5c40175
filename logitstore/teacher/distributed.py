"""A dump spread over processes (torchrun): each dumps its own segments of the listing, then all
copy the segments into the store's row arrays, each its own chunks.

Why segments: rows are in listing order with unreadable files left out (docs/FORMAT.md), so an
image's row is only known once every earlier image has been read. Each process therefore writes
whole segments (fixed runs of `segment_rows` listing positions, dealt round robin) as ordinary
resumable stores under `_segments/<k>/`: one writer per segment, whole chunks, progress after
written chunks, exactly like a single-process dump. When every segment is done the row offsets are
known; each process then writes whole blocks of RECORDS_PER_CHUNK final chunks (block j when
j % world == rank), so no chunk, and no chunk of the 1.4 records, ever has two writers. Rank 0 alone writes the root metadata. A process that dies loses only the chunks it had
not committed; the same command (with any number of processes) finishes what is missing.

torch.distributed (gloo: the dump needs no collective on the GPU) only carries small Python
objects: the plan, each process's outcome, and the barriers between phases.
"""
from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any, Callable

import numpy as np
import torch.distributed as dist
from zarr.core.sync import sync

from .. import schema
from ..cli_common import progress_bar
from ..device import Torchrun, torchrun_env
from ..errors import LogitStoreError, OptionError, ResumeMismatchError, StoreStateError
from ..locations import check_store_destination, delete_all, is_zip, open_group, remove_stray_keys, retire_root, stored_bytes
from ..schema import StoreMeta
from ..sources import Source
from ..rows import Rows
from ..store import LogitStore, open_store, row_array_names
from .job import DumpJob, make_summary, run_into
from ..records import Statistics, Written, chunk_records, corpus_hash_of, record_names
from ..writer import (FIRST_FAILURES, PROGRESS_N_FAILURES, append_failures, check_resumable, create_arrays,
                      every_chunk_written, failure_arrays, finalize_store, open_writer, stored_failures, write_rows)

# Segments per process when the segment size is not given: enough that processes finish close
# together and a dead one loses little, few enough that a segment is many chunks long.
SEGMENTS_PER_PROCESS = 8
MAX_SEGMENT_CHUNKS = 64
# A streamed corpus (shards, tables) is cut at its units: the plan lists each segment's first listing
# position and the end (segment_rows is then 0). A segment that starts or ends inside a teacher batch
# reads that batch whole and keeps its own positions, so every image is in the batch it has in one process.
SEGMENT_BOUNDS = "segment_bounds"
# Fast processes wait for slow ones between phases; a dead process ends the job through torchrun.
PHASE_TIMEOUT = timedelta(hours=24)




def unit_share(n_units: int, world: int) -> int:
    """Consecutive units (shards, files) per segment of a streamed corpus: about SEGMENTS_PER_PROCESS
    segments per process."""
    return max(1, math.ceil(n_units / max(1, SEGMENTS_PER_PROCESS * world)))


def unit_groups(n_units: int, world: int) -> list[range]:
    """The units (shards, files, slices) of each segment of a streamed corpus over `world` processes, in
    order: the one derivation both the listing (`list_units`) and the cut (`DumpJob.unit_bounds`) use,
    so a process lists the units it dumps. (A group of units that hold no samples makes no segment:
    the later segments then go round robin one process further on than they were listed.)"""
    per = unit_share(n_units, world)
    return [range(g, min(n_units, g + per)) for g in range(0, n_units, per)]


def open_shared(spec: str, **options: Any) -> tuple[Any, bool]:
    """--images under torchrun, unlisted (`open_source(listed=False)`): rank 0 alone makes the identity
    pass (a prefix's listing sha256, count and slice bounds, whether it holds shards or tables) and
    broadcasts the Source, so the other processes list only the units they dump. A local path (also file://) is
    opened by every process at once, as before (a folder of loose images is a `Corpus`, one path per
    image: the others would wait for rank 0 only to list it again).
    Returns (corpus, whether this call started the process group)."""
    from ..corpus import describe_failure
    from ..errors import CorpusError
    from ..sources import is_url, open_source

    ctx = torchrun_env() or Torchrun()
    if ctx.world == 1 or not is_url(spec) or spec.startswith("file://"):
        return open_source(spec, listed=False, **options), False
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", timeout=PHASE_TIMEOUT)  # the dump's _Comm uses it, and ends it
    box: list[Any] = [None]
    corpus: Any = None
    failure: BaseException | None = None
    if ctx.rank == 0:
        try:
            corpus = open_source(spec, listed=False, **options)
            box = [corpus if isinstance(corpus, Source) else None]
        except LogitStoreError as exc:
            box, failure = [exc], exc
        except Exception as exc:  # the others must not wait for a Source that never comes
            box, failure = [CorpusError(f"{spec}: rank 0 could not list it ({describe_failure(exc)})")], exc
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if isinstance(box[0], LogitStoreError):
        raise box[0]
    if ctx.rank != 0:
        corpus = box[0] if box[0] is not None else open_source(spec, listed=False, **options)
    return corpus, started


def list_units(source: Source) -> bool:
    """List a streamed corpus under torchrun: each process reads the headers (or metadata) of the units
    it will dump (its segments, as `DumpJob.unit_bounds` cuts them), and all share the results."""
    ctx = torchrun_env() or Torchrun()
    started = ctx.world > 1 and not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", timeout=PHASE_TIMEOUT)  # the dump's _Comm uses it, and ends it
    groups = unit_groups(len(source.units), ctx.world)
    try:
        mine: Any = source.list_units([k for g, units in enumerate(groups) if g % ctx.world == ctx.rank
                                       for k in units])
    except LogitStoreError as exc:
        mine = exc
    parts: list[Any] = [mine]
    if ctx.world > 1:
        parts = [None] * ctx.world
        dist.all_gather_object(parts, mine)
    for part in parts:
        if isinstance(part, LogitStoreError):
            raise part
    listed = {k: v for part in parts for k, v in part.items()}
    source.settle([listed[k] for k in range(len(source.units))])
    return started


def is_distributed_store(location: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether `location` holds an unfinished distributed dump."""
    try:
        group = open_group(location, mode="r", storage_options=storage_options)
        progress = group.attrs.get(schema.ATTR_PROGRESS)
    except Exception:  # nothing there, or not a store: the caller's own checks say what is wrong
        return False
    return isinstance(progress, dict) and schema.PROGRESS_SEGMENT_ROWS in progress


def segment_location(out: str, k: int) -> str:
    return f"{out.rstrip('/')}/{schema.SEGMENTS}/{k:06d}"


def default_segment_rows(n_listed: int, batch_size: int, chunk_rows: int, world: int) -> int:
    rows = min(MAX_SEGMENT_CHUNKS * chunk_rows, math.ceil(n_listed / (SEGMENTS_PER_PROCESS * world)))
    return max(1, math.ceil(rows / batch_size)) * batch_size


class _Comm:
    """The few collectives a distributed dump needs; with one process, none at all."""

    def __init__(self, ctx: Torchrun, owns: bool = False):
        self.ctx, self._owns = ctx, owns  # owns: listing the corpus started the group (list_units)
        if ctx.world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=PHASE_TIMEOUT)
            self._owns = True

    def gather(self, obj: Any) -> list[Any]:
        if self.ctx.world == 1:
            return [obj]
        out: list[Any] = [None] * self.ctx.world
        dist.all_gather_object(out, obj)
        return out

    def outcome(self, fn: Callable[[], Any], only_rank0: bool = False) -> list[Any]:
        """Run fn (here, or on rank 0 only) and share every rank's result; a user error on any rank is
        raised on every rank, so all stop with the same one-line message instead of waiting forever."""
        result: Any = None
        if not only_rank0 or self.ctx.rank == 0:
            try:
                result = fn()
            except LogitStoreError as exc:
                result = exc
        results = self.gather(result)
        for r in results:
            if isinstance(r, LogitStoreError):
                raise r
        return results

    def close(self) -> None:
        if self._owns:
            dist.destroy_process_group()


def dump_distributed(job: DumpJob, out: str, ctx: Torchrun, *, overwrite: bool = False,
                     storage_options: dict[str, Any] | None = None, segment_rows: int | None = None,
                     progress: bool = False, on_batch: Callable[[int], None] | None = None) -> Any:
    """`logitstore.dump` for one process of a torchrun job (or one process finishing such a dump)."""

    if is_zip(out):
        raise StoreStateError(f"{out}: a zip store is written once with `logitstore pack`; dump to a "
                              "directory or URL, then pack it")
    meta, so = job.meta, storage_options
    comm = _Comm(ctx, job.owns_group)
    try:
        t0 = time.perf_counter()
        bounds = None if segment_rows is not None else job.unit_bounds(ctx.world)
        plan = comm.outcome(lambda: _open_root(out, meta, overwrite, so, segment_rows, ctx.world, bounds), True)[0]
        spans = segment_spans(plan, meta.corpus.n_listed)
        n_seg = len(spans)
        resumed = 0
        if plan[schema.PROGRESS_PHASE] == schema.PHASE_SEGMENTS:
            done = comm.outcome(lambda: _dump_segments(job, out, ctx, spans, so, progress, on_batch))
            resumed = sum(done)
            plan = comm.outcome(lambda: _plan_assembly(out, meta, n_seg, so), True)[0]
        if plan[schema.PROGRESS_PHASE] == schema.PHASE_ASSEMBLY:
            comm.outcome(lambda: _assemble(out, meta, plan["offsets"], ctx, so))
        final = comm.outcome(lambda: _finish(out, n_seg, so), True)[0]
        failures = stored_failures(open_group(out, "r", so), min(final.corpus.n_failed, FIRST_FAILURES))
        nbytes = stored_bytes(open_group(out, "r", so).store) if ctx.rank == 0 else 0
        return make_summary(job, out, final, resumed, time.perf_counter() - t0, nbytes, failures)
    finally:
        comm.close()


def _open_root(out: str, meta: StoreMeta, overwrite: bool, so: dict[str, Any] | None,
               segment_rows: int | None, world: int, bounds: list[int] | None = None) -> dict[str, Any]:
    """Rank 0: create the store (or check the one to resume) and return its progress."""
    check_store_destination(out, so, [meta.corpus.root])
    group = open_group(out, mode="a", storage_options=so)
    remove_stray_keys(group.store)
    if group.attrs.get(schema.ATTR_ROOT) is not None and not overwrite:
        check_resumable(out, schema.meta_from_attrs(dict(group.attrs)), meta)
        p = dict(group.attrs.get(schema.ATTR_PROGRESS) or {})
        if schema.PROGRESS_SEGMENT_ROWS not in p:
            raise StoreStateError(f"{out} is an unfinished single-process dump; finish it with the same command "
                                  "without torchrun, or pass --overwrite to start over")
        if segment_rows is not None and segment_rows != p[schema.PROGRESS_SEGMENT_ROWS]:
            raise ResumeMismatchError(f"{out} was started with --segment-rows {p[schema.PROGRESS_SEGMENT_ROWS]}; "
                                      "re-run with that (or without the flag), or pass --overwrite")
        return p
    if bounds is not None:  # a streamed corpus: each segment is whole shards or files (SEGMENT_BOUNDS)
        rows = 0
    else:
        rows = segment_rows or default_segment_rows(meta.corpus.n_listed, meta.batch_size, meta.chunk_rows, world)
    if bounds is None and (rows < 1 or rows % meta.batch_size):
        # Whole teacher batches keep every image in the batch it has in a single-process run.
        raise OptionError(f"--segment-rows {rows} must be a positive multiple of --batch-size "
                              f"{meta.batch_size}")
    retire_root(group.store)
    delete_all(group.store)
    group = open_group(out, mode="a", storage_options=so)
    group.attrs[schema.ATTR_ROOT] = meta.to_dict()
    p = {schema.PROGRESS_SEGMENT_ROWS: rows, schema.PROGRESS_PHASE: schema.PHASE_SEGMENTS,
         **({SEGMENT_BOUNDS: bounds} if bounds is not None else {})}
    group.attrs[schema.ATTR_PROGRESS] = p
    return p


def segment_spans(plan: dict[str, Any], n: int) -> list[tuple[int, int]]:
    """Listing positions [lo, hi) of each segment: fixed runs of segment_rows, or the plan's unit bounds."""
    bounds = plan.get(SEGMENT_BOUNDS)
    if bounds is not None:
        return list(zip(bounds[:-1], bounds[1:]))
    rows = plan[schema.PROGRESS_SEGMENT_ROWS]
    return [(lo, min(n, lo + rows)) for lo in range(0, n, rows)]


def _dump_segments(job: Any, out: str, ctx: Torchrun, spans: list[tuple[int, int]], so: dict[str, Any] | None,
                   progress: bool, on_batch: Callable[[int], None] | None) -> int:
    """Every segment of this rank, each resumed where it stopped; returns the rows that were already there."""

    mine = [(k, lo, hi) for k, (lo, hi) in enumerate(spans) if k % ctx.world == ctx.rank]
    resumed = 0
    bar = progress_bar(progress and ctx.rank == 0)
    with bar:
        label = f"dump (rank 0 of {ctx.world})" if ctx.world > 1 else "dump"
        task = bar.add_task(label, total=sum(hi - lo for _, lo, hi in mine))
        for k, lo, hi in mine:
            writer = open_writer(segment_location(out, k), job.meta, storage_options=so, span=(lo, hi))
            start = writer.progress.next_source
            resumed += writer.progress.rows
            bar.advance(task, min(hi, (start // job.batch_size) * job.batch_size) - lo)
            run_into(job, writer, start, hi, bar, task, on_batch, saved=f"the finished chunks are saved in {out}")
    return resumed


def _segments(out: str, n_seg: int, so: dict[str, Any] | None) -> list[LogitStore]:
    return [open_store(segment_location(out, k), allow_incomplete=True, storage_options=so) for k in range(n_seg)]


def _plan_assembly(out: str, meta: StoreMeta, n_seg: int, so: dict[str, Any] | None) -> dict[str, Any]:
    """Rank 0, once every segment is done: row offsets, failures, and the final arrays, created empty."""
    parts = _segments(out, n_seg, so)
    offsets = np.cumsum([0] + [len(p) for p in parts]).tolist()
    group = open_group(out, mode="a", storage_options=so)
    create_arrays(group, meta, offsets[-1])
    # The segments' failures go into the final failure arrays, in listing order, as a one-process dump's
    # do (W2): the progress keeps only their count, so it stays small on a dirty corpus.
    arrays, n_failures = failure_arrays(group, 0), 0
    for part in parts:
        found = part.failures()
        append_failures(arrays, n_failures, found)
        n_failures += len(found)
    p = {**dict(group.attrs[schema.ATTR_PROGRESS]), schema.PROGRESS_PHASE: schema.PHASE_ASSEMBLY,
         "offsets": offsets, PROGRESS_N_FAILURES: n_failures}
    if meta.has_records:  # integer counts: the segments' sum is what one process would have counted
        total = Statistics(meta.num_classes)
        for part in parts:
            seg = (part.group.attrs.get(schema.ATTR_PROGRESS) or {}).get(schema.STATISTICS)
            total = total.merged(Statistics.from_dict(seg, meta.num_classes))
        p[schema.STATISTICS] = total.to_dict()
    group.attrs[schema.ATTR_PROGRESS] = p
    return p


def _assemble(out: str, meta: StoreMeta, offsets: list[int], ctx: Torchrun, so: dict[str, Any] | None) -> None:
    """Copy segment rows into this rank's final chunks, each written whole, with their 1.4 records.

    A rank takes whole blocks of RECORDS_PER_CHUNK chunks (block j when j % world == rank), so each
    chunk of the records array, too, has one writer."""
    group = open_group(out, mode="a", storage_options=so)
    arrays = {name: every_chunk_written(group[name]) for name in row_array_names(meta)}
    parts: dict[int, LogitStore] = {}
    r, n = meta.chunk_rows, offsets[-1]
    per = schema.RECORDS_PER_CHUNK
    n_chunks = math.ceil(n / r)
    for j in range(ctx.rank, math.ceil(n_chunks / per), ctx.world):
        k0, k1 = j * per, min(n_chunks, (j + 1) * per)
        recs = [_assemble_chunk(meta, offsets, k, arrays, parts, out, so) for k in range(k0, k1)]
        if meta.has_records:
            group[schema.CHUNK_SHA256][k0:k1] = np.concatenate(recs)


def _assemble_chunk(meta: StoreMeta, offsets: list[int], k: int, arrays: dict[str, Any],
                    parts: dict[int, LogitStore], out: str, so: dict[str, Any] | None) -> np.ndarray | None:
    """Write final chunk k from the segments; its records [1, A, 32] (1.4)."""
    r, n = meta.chunk_rows, offsets[-1]
    a, b = k * r, min(n, (k + 1) * r)
    pieces, pos, s = [], a, int(np.searchsorted(offsets, a, side="right")) - 1
    while pos < b:
        while offsets[s + 1] <= pos:  # empty segments (every file failed) hold no rows
            s += 1
        if s not in parts:
            parts[s] = open_store(segment_location(out, s), allow_incomplete=True, storage_options=so)
        stop = min(b, offsets[s + 1])
        pieces.append(parts[s].read(pos - offsets[s], stop - offsets[s], pixels=meta.embedded_pixels))
        pos = stop
    rows = Rows.concat(pieces)
    write_rows(arrays, a, rows)
    return chunk_records(rows, record_names(meta), r) if meta.has_records else None


def _finish(out: str, n_seg: int, so: dict[str, Any] | None) -> StoreMeta:
    """Rank 0, once every chunk is assembled: drop the segments, fingerprint, mark complete (last)."""
    group = open_group(out, mode="a", storage_options=so)
    p = dict(group.attrs[schema.ATTR_PROGRESS])
    if p[schema.PROGRESS_PHASE] != schema.PHASE_ASSEMBLED:
        p[schema.PROGRESS_PHASE] = schema.PHASE_ASSEMBLED
        group.attrs[schema.ATTR_PROGRESS] = p
    sync(group.store.delete_dir(schema.SEGMENTS))
    meta = schema.meta_from_attrs(dict(group.attrs))
    n = int(p["offsets"][-1])
    written = None
    if meta.has_records:  # the records the ranks wrote, and the corpus hash from ids and digests alone
        records = group[schema.CHUNK_SHA256][:math.ceil(n / meta.chunk_rows)]
        written = Written(records, Statistics.from_dict(p.get(schema.STATISTICS), meta.num_classes),
                          "sha256:" + corpus_hash_of(group, n).hexdigest())
    legacy = p.get("failures")  # an assembly planned by logitstore before 1.4 listed its failures itself
    return finalize_store(group, meta, n, legacy if isinstance(legacy, list) else None,
                          int(p.get(PROGRESS_N_FAILURES, 0)), written=written)
