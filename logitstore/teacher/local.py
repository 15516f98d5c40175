"""`logitstore.dump`: the teacher over a corpus, in this process or, under torchrun, in many."""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from ..allocator import keep_freed_memory
from ..cli_common import progress_bar
from ..device import Torchrun, torchrun_env
from ..errors import DumpInterrupted, LogitStoreError, OptionError
from ..destination import ABSENT, EMPTY
from ..locations import check_store_destination, open_group, stored_bytes
from ..rows import Rows
from ..writer import StoreWriter, already_complete, open_writer
from . import distributed
from .job import DumpConfig, DumpSummary, make_summary, prepare_dump, run_into


def dump(teacher: str, images: str, out: str, **options: Any) -> DumpSummary:
    """Run `teacher` over `images` and write (or resume) the store at `out`.

    `options` are the fields of `DumpConfig` (the flags of `logitstore dump --help`).
    """
    return run_dump(DumpConfig(teacher, images, out, **options))


def run_dump(cfg: DumpConfig) -> DumpSummary:
    """Dump as `cfg` says. Under torchrun (WORLD_SIZE set), or to finish a store a distributed dump
    started, the work is split over the processes (distributed.py); `segment_rows` is its unit."""
    so = cfg.storage_options
    keep_freed_memory()  # every batch reuses its tensors' memory (logitstore/allocator.py); workers fork after
    ctx = torchrun_env()
    if ctx is None and not cfg.overwrite and distributed.is_distributed_store(cfg.out, so):
        ctx = Torchrun()  # finish it in this one process
    job = prepare_dump(cfg, None if ctx is None else ctx.local_rank,
                       list_later=ctx is None and cfg.segment_rows is None and _fresh(cfg.out, so))
    protected = job.corpus.protected()
    if job.listing_pending:
        return _dump_while_listing(job, cfg, protected)
    done = None if cfg.overwrite else already_complete(cfg.out, job.meta, so, protected)
    if done is not None:  # the same command after the store completed: nothing to do
        return make_summary(job, cfg.out, done, done.corpus.n_images, 0.0,
                            stored_bytes(open_group(cfg.out, "r", so).store), [], nothing_to_do=True)
    if ctx is not None:
        return distributed.dump_distributed(job, cfg.out, ctx, overwrite=cfg.overwrite, storage_options=so,
                                            segment_rows=cfg.segment_rows, progress=cfg.progress,
                                            on_batch=cfg.on_batch)
    if cfg.segment_rows is not None:
        raise OptionError("--segment-rows applies to distributed dumps only (run under torchrun)")
    writer = open_writer(cfg.out, job.meta, overwrite=cfg.overwrite, storage_options=so, protected=protected)
    return _dump_here(job, cfg, writer, writer.progress.next_source, job.corpus.n_listed, writer.progress.rows)


def _dump_here(job: Any, cfg: DumpConfig, writer: "StoreWriter | WhileListing", start: int, total: int | None,
               resumed_rows: int) -> DumpSummary:
    """The single-process dump into `writer` from source `start` on (`total`: the listed count, None while
    it is unknown), under one progress bar, and its summary."""
    t0 = time.perf_counter()
    bar = progress_bar(cfg.progress)
    with bar:
        task = bar.add_task("dump", total=total, completed=(start // job.batch_size) * job.batch_size)
        if isinstance(writer, WhileListing):
            writer.follow(bar, task)
        meta = run_into(job, writer, start, total, bar, task, cfg.on_batch,
                        saved=f"{{rows}} images are saved in {cfg.out}", whole=True)
    store = writer.store if isinstance(writer, WhileListing) else writer
    assert store is not None  # finalized
    return make_summary(job, cfg.out, meta, resumed_rows, time.perf_counter() - t0, stored_bytes(store.group.store),
                        [(f[0], f[1]) for f in store.progress.failures])


# Rows a dump holds in memory while its corpus is still being listed; past this the teacher waits for the
# listing. Fixed, so a dump's memory does not grow with its corpus (~32,000 rows of 1,000 float16 logits).
WAITING_ROWS_BYTES = 64 << 20


def _fresh(out: str, storage_options: dict[str, Any] | None) -> bool:
    """Whether `out` holds no store yet (absent or empty): a dump there has nothing to resume, so it can
    start its teacher before the corpus is fully listed. Any doubt (a refused destination): not fresh,
    and the usual order of checks reports it."""
    try:
        return check_store_destination(out, storage_options) in (ABSENT, EMPTY)
    except (LogitStoreError, OSError):
        return False


class WhileListing:
    """The writer of a fresh dump whose shards or tables are still being listed. The store's identity (the
    listing's sha256 and count) exists only once every unit is listed, so the rows the teacher makes
    meanwhile wait here, in memory (at most WAITING_ROWS_BYTES: past that the teacher waits for the
    listing); the store is created, and they go in, as soon as the listing has ended. Nothing is written
    before: a listing that fails or is interrupted leaves no store behind."""

    def __init__(self, job: Any, cfg: DumpConfig, protected: list[str]):
        self.job, self.cfg, self.protected = job, cfg, protected
        self.bar: Any = None
        self.task: Any = None
        self.store: StoreWriter | None = None
        self.waiting: list[Rows] = []
        self.waiting_bytes = 0
        self._before = SimpleNamespace(rows=0, failures=[])  # what `DumpJob.run` reads before the store

    @property
    def progress(self) -> Any:
        """The store's progress once it exists (its writer replaces the object at each commit)."""
        return self._before if self.store is None else self.store.progress

    def follow(self, bar: Any, task: Any) -> None:
        """Give the progress bar's task its total once the listing has ended."""
        self.bar, self.task = bar, task

    def left_behind(self) -> str:
        return "nothing was written" if self.store is None else "the store is left incomplete"

    def submit(self, rows: Rows) -> None:
        if self.store is not None:
            self.store.submit(rows)
            return
        self.waiting.append(rows)
        self.waiting_bytes += _held_bytes(rows)
        if self.waiting_bytes > WAITING_ROWS_BYTES or self.job.corpus.listing_finished:
            self.open()

    def open(self) -> StoreWriter:
        """The store, created once the listing has ended (waiting for it), with the rows made meanwhile."""
        if self.store is None:
            self.job.settle_listing()
            self.store = open_writer(self.cfg.out, self.job.meta, overwrite=self.cfg.overwrite,
                                     storage_options=self.cfg.storage_options, protected=self.protected)
            if self.bar is not None:
                self.bar.update(self.task, total=self.job.corpus.n_listed)
            waiting, self.waiting = self.waiting, []
            for rows in waiting:
                self.store.submit(rows)
        return self.store

    def close(self, finalize: bool) -> Any:
        if finalize:
            return self.open().close(finalize=True)
        self.job.corpus.stop_listing()
        return None if self.store is None else self.store.close(finalize=False)


def _held_bytes(rows: Rows) -> int:
    """About what `rows` hold in memory: every array, and the ids as Python strings."""
    arrays = (rows.logits, rows.digests, rows.image_hw, rows.view_params, rows.pixels, rows.source,
              *(rows.targets or {}).values(), *(rows.view_extras or {}).values())
    return sum(a.nbytes for a in arrays if a is not None) + sum(len(i) + 56 for i in rows.ids)


def _dump_while_listing(job: Any, cfg: DumpConfig, protected: list[str]) -> DumpSummary:
    """A fresh dump of shards or tables: the teacher runs on the units listed first while the rest are
    listed (in other processes), instead of after the whole listing."""
    writer = WhileListing(job, cfg, protected)
    try:
        check_store_destination(cfg.out, cfg.storage_options, protected)  # W1 before the teacher runs, not after
        return _dump_here(job, cfg, writer, 0, None, 0)
    except DumpInterrupted:
        if writer.store is not None:
            raise
        raise DumpInterrupted(f"interrupted while the corpus was still being listed: nothing was written to "
                              f"{cfg.out}; run the same command again") from None
    finally:
        job.corpus.stop_listing()
