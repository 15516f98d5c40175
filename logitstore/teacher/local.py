"""`logitstore.dump`: the teacher over a corpus, in this process or, under torchrun, in many."""
from __future__ import annotations

import time
from typing import Any

from ..cli_common import progress_bar
from ..device import Torchrun, torchrun_env
from ..errors import OptionError
from ..locations import stored_bytes
from ..writer import already_complete, open_writer
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
    ctx = torchrun_env()
    if ctx is None and not cfg.overwrite and distributed.is_distributed_store(cfg.out, so):
        ctx = Torchrun()  # finish it in this one process
    job = prepare_dump(cfg, None if ctx is None else ctx.local_rank)
    protected = job.corpus.protected()
    done = None if cfg.overwrite else already_complete(cfg.out, job.meta, so, protected)
    if done is not None:  # the same command after the store completed: nothing to do
        return make_summary(job, cfg.out, done, done.corpus.n_images, 0.0, 0, [], nothing_to_do=True)
    if ctx is not None:
        return distributed.dump_distributed(job, cfg.out, ctx, overwrite=cfg.overwrite, storage_options=so,
                                            segment_rows=cfg.segment_rows, progress=cfg.progress,
                                            on_batch=cfg.on_batch)
    if cfg.segment_rows is not None:
        raise OptionError("--segment-rows applies to distributed dumps only (run under torchrun)")
    writer = open_writer(cfg.out, job.meta, overwrite=cfg.overwrite, storage_options=so, protected=protected)
    resumed_rows, start = writer.progress.rows, writer.progress.next_source
    n_listed = job.corpus.n_listed
    t0 = time.perf_counter()
    bar = progress_bar(cfg.progress)
    with bar:
        task = bar.add_task("dump", total=n_listed, completed=(start // job.batch_size) * job.batch_size)
        meta = run_into(job, writer, start, n_listed, bar, task, cfg.on_batch,
                        saved=f"{{rows}} images are saved in {cfg.out}", whole=True)
    return make_summary(job, cfg.out, meta, resumed_rows, time.perf_counter() - t0, stored_bytes(writer.group.store),
                        [(f[0], f[1]) for f in writer.progress.failures])
