"""Millions of rows on this machine's disk: the store against raw NumPy files, and the reader's memory.

    python -m benchmarks.scale [--rows 5000000] [--repeats 2] [--workers 2] [--chunk-rows R] [--keep]
                               [--phases write] [--no-old] [--zstd-level L]

  write   the real writer (`open_writer`, `StoreWriter.submit` of teacher-sized `Rows`,
          `close(finalize=True)`) against `ndarray.tofile` of the same bytes into one file per
          array; both flushed to the disk (sync) before the clock stops. Finalize (format 1.4:
          fingerprints from the chunk records kept while writing, no read-back) is timed apart.
          The 1.3 writer (no records; its finalize reads every chunk back) runs interleaved unless
          --no-old; --zstd-level L also times the 1.4 writer with Zstd level L (other bytes than the
          format's level 3: an option measured, never what `dump` writes). "CPU s" is the process's
          CPU time (all threads) for write + finalize: it moves far less with other work on the machine.
  inspect `info` (from the stored statistics), `verify` (every chunk against its record, in
          threads) and `verify --sample 0.01`, on the store just written; with --zarrs also `verify`
          through zarrs' Rust codec pipeline (reads only: it writes other Zstd bytes, see RESULTS.md).
  read    the trainer's reader, `StoreSet.requests` behind `read_ahead`, alone and feeding the
          trainer's DataLoader with --workers workers, against the very same code reading the same
          bytes from raw `np.memmap` files (`MemmapStore`), so the block-shuffled order, the copies
          and the batching are identical and only the storage differs. Cold: the files' pages are
          dropped from the page cache first (posix_fadvise DONTNEED, after a sync); warm: read again.
  memory  peak RSS of the reader (open + decode-cache layout + one epoch of requests + one held-out
          pass) in a fresh process per size, on `head(n)` of the one store.

Synthetic rows: teacher-like float16 logits (C = 1000, V = 1) cycled from a 16,384-row pool (more
than a chunk, so every chunk compresses like fresh logits), ImageNet-like ids, random digests,
4x4 greyscale image sizes (so the DataLoader's workers take the decode cache's gather path).

Targets (issue 7): the store within 2x of raw on writes and reads; the reader's memory flat in the
number of rows. Runs are interleaved and the best of --repeats counts; the write phase also prints every
repeat's raw and store times with their ratio, and the median ratio (raw and store alternate who goes
first). Results: benchmarks/RESULTS.md.

Every timed store is written into a path of its own and none is deleted until the write phase's clocks
have stopped: on ext4 without a journal (this machine's disk), allocating an inode skips, one by one, every
inode of its group deleted in the last 5-10 minutes (the kernel's `recently_deleted`), so deleting the
previous repeat's ~11 inodes a chunk right before a write made that write pay for the benchmark's own cleanup
(perf: 19% of the writer's CPU in `find_inode_bit` / `recently_deleted`; the raw side's 5 files never pay
it). A run started within ~10 minutes of another run's cleanup still pays for that one: the disk needs
about 2.2 GB a million rows per store kept.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr
from rich.console import Console
from zarr.codecs import Crc32cCodec, ZstdCodec
from rich.table import Table

import logitstore.writer as writer_module
from benchmarks.chunk_size import teacher_like_logits
from logitstore import schema
from logitstore.schema import CorpusInfo, Preprocess, StoreMeta, TeacherInfo, ViewSpec
from logitstore.store import open_store
from logitstore.rows import Rows as StoreRows
from logitstore.writer import open_writer

CLASSES = 1000
BATCH = 256          # rows per teacher batch (the writer's input) and per training batch (the reader's output)
POOL = 16384         # distinct logit rows, cycled
ID_WIDTH = 24        # raw ids: fixed-width bytes, as wide as the longest id
# One file per array for the raw side: the bytes the store holds, uncompressed, row-major.
RAW = {schema.LOGITS: ("float16", (1, CLASSES)), schema.IDS: (f"S{ID_WIDTH}", ()),
       schema.DIGESTS: ("uint8", (32,)), schema.IMAGE_HW: ("int32", (2,)), schema.VIEW_PARAMS: ("int32", (1, 5))}
ROW_BYTES = sum(np.dtype(d).itemsize * int(np.prod(s)) for d, s in RAW.values())


# --------------------------------------------------------------------------------------------
# Synthetic rows
# --------------------------------------------------------------------------------------------
def make_meta(n: int, root: Path, chunk_rows: int | None = None) -> StoreMeta:
    """What pipeline.dump would record for a 1000-class float16 eval-view dump of n images."""
    pre = Preprocess(size=(4, 4), mean=(0.5,), std=(0.25,), mode="L")
    return StoreMeta(
        format_version=schema.FORMAT_VERSION, complete=False,
        classes=tuple(f"n{i:08d}" for i in range(CLASSES)), preprocess=pre, views=ViewSpec(),
        teacher=TeacherInfo("synthetic", "factory", "", "0" * 64),
        corpus=CorpusInfo(str(root), "directory", "0" * 64, n), dtype="float16", precision="fp32", seed=0,
        chunk_rows=chunk_rows or schema.default_chunk_rows(1, CLASSES, 2), batch_size=BATCH,
        created=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        versions={"numpy": np.__version__, "zarr": zarr.__version__})


class Rows:
    """Teacher batches of synthetic rows: the same bytes for the store and for the raw files."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.logits = teacher_like_logits(POOL, CLASSES)
        self.digests = rng.integers(0, 256, size=(POOL, 32), dtype=np.uint8)
        self.image_hw = np.full((BATCH, 2), 4, np.int32)
        self.view_params = np.tile(np.array([0, 0, 4, 4, 0], np.int32), (BATCH, 1, 1))

    def batch(self, a: int, b: int) -> StoreRows:
        p = a % POOL  # POOL is a multiple of BATCH: a batch is one slice of the pool
        return StoreRows(np.array([f"n{i // 1300:08d}/{i:09d}.JPEG" for i in range(a, b)], dtype=object),
                         self.logits[p:p + b - a], self.digests[p:p + b - a], self.image_hw[:b - a],
                         self.view_params[:b - a], source=np.arange(a, b))


# --------------------------------------------------------------------------------------------
# The disk: flushing, and dropping a file's pages from the page cache
# --------------------------------------------------------------------------------------------
def files_under(path: Path) -> Iterator[str]:
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            yield from files_under(Path(entry.path))
        else:
            yield entry.path


def flush_to_disk() -> None:
    """Write every dirty page to the disk, then return: the same call ends both sides' clocks.

    One sync(2) rather than an fsync per file: the store's layout has ~2,400 files per million
    rows, and fsyncing them one by one costs a journal commit each (1.4 s of 7.5 s per million
    rows here), which no dump pays (the OS writes pages back on its own)."""
    os.sync()


def drop_cached(path: Path) -> None:
    """Evict the (clean) pages of every file under `path`: the next read comes from the disk. Dropping
    the whole page cache needs privileges the machine does not give; this needs none."""
    for f in files_under(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# Writes
# --------------------------------------------------------------------------------------------
def write_raw(rows: Rows, n: int, where: Path) -> float:
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    t0 = time.perf_counter()
    files = {name: open(where / f"{name}.bin", "wb") for name in RAW}
    for a in range(0, n, BATCH):
        b = rows.batch(a, min(n, a + BATCH))
        b.logits.tofile(files[schema.LOGITS])
        np.array(b.ids, dtype=f"S{ID_WIDTH}").tofile(files[schema.IDS])
        b.digests.tofile(files[schema.DIGESTS])
        b.image_hw.tofile(files[schema.IMAGE_HW])
        b.view_params.tofile(files[schema.VIEW_PARAMS])
    for f in files.values():
        f.close()
    flush_to_disk()
    return time.perf_counter() - t0


def timed_raw(rows: Rows, n: int, raw: Path, times: dict[str, list[float]], cpu: dict[str, list[float]],
              console: Console) -> None:
    c = time.process_time()
    times["raw"].append(write_raw(rows, n, raw))
    cpu["raw"].append(time.process_time() - c)
    console.print(f", raw {times['raw'][-1]:.1f} s", end="")


def repeats_table(times: dict[str, list[float]], cpu: dict[str, list[float]], repeats: int) -> Table:
    """Every repeat's raw and store times with its own ratio (the two measured back to back), and the median
    ratio: how far the baseline moves between repeats shows here, not only in the best-of table."""
    t = Table(title=f"each repeat (raw and stores back to back; who goes first alternates); median of {repeats}")
    cols = ["repeat", "raw s", "1.4 store + finalize s", "x raw", "CPU s"]
    if times["store13"]:
        cols += ["1.3 store + finalize s", "1.3 x raw"]
    for col in cols:
        t.add_column(col, justify="right")
    ratios, ratios13 = [], []
    for i in range(repeats):
        total = times["store"][i] + times["finalize"][i]
        ratios.append(times["raw"][i] / total)
        row = [str(i + 1), f"{times['raw'][i]:.1f}", f"{total:.1f}", f"{ratios[-1]:.2f}", f"{cpu['store'][i]:.1f}"]
        if times["store13"]:
            total13 = times["store13"][i] + times["finalize13"][i]
            ratios13.append(times["raw"][i] / total13)
            row += [f"{total13:.1f}", f"{ratios13[-1]:.2f}"]
        t.add_row(*row)
    med = [f"{float(np.median(times['raw'])):.1f}",
           f"{float(np.median(np.add(times['store'], times['finalize']))):.1f}",
           f"[bold]{float(np.median(ratios)):.2f}[/]", f"{float(np.median(cpu['store'])):.1f}"]
    if ratios13:
        med += [f"{float(np.median(np.add(times['store13'], times['finalize13']))):.1f}", f"{float(np.median(ratios13)):.2f}"]
    t.add_row("median", *med)
    spread = max(times["raw"]) / min(times["raw"])
    t.caption = f"the raw baseline's spread: slowest / fastest repeat = {spread:.2f}"
    return t


def write_store(rows: Rows, n: int, path: Path, meta: StoreMeta, zstd_level: int | None = None) -> tuple[float, float]:
    """(seconds writing, including fsync; seconds of finalize) of a new store at `path`. `zstd_level`: chunks
    compressed at that Zstd level instead of the format's 3 (other bytes: an option measured, never what `dump`
    writes)."""
    if path.exists():
        raise SystemExit(f"{path} exists: the benchmark writes every store to a new path (see the module's docstring)")
    finalize, codecs = writer_module.finalize_store, writer_module.chunk_codecs
    if zstd_level is not None:
        writer_module.chunk_codecs = lambda: [ZstdCodec(level=zstd_level), Crc32cCodec()]
    spent: list[float] = []

    def timed_finalize(*args: Any, **kw: Any) -> Any:
        flush_to_disk()  # every row is written by now: its flush is the write's, not finalize's
        t = time.perf_counter()
        out = finalize(*args, **kw)
        flush_to_disk()
        spent.append(time.perf_counter() - t)
        return out

    writer_module.finalize_store = timed_finalize
    try:
        t0 = time.perf_counter()
        w = open_writer(str(path), meta, overwrite=True)
        for a in range(0, n, BATCH):
            w.submit(rows.batch(a, min(n, a + BATCH)))
        w.close(finalize=True)
        flush_to_disk()
        total = time.perf_counter() - t0
    finally:
        writer_module.finalize_store, writer_module.chunk_codecs = finalize, codecs
    return total - spent[0], spent[0]


def inspect_times(store: Path, zarrs: bool) -> dict[str, float]:
    """Seconds of `info` (open included), full `verify`, `verify --sample 0.01` (and full verify via zarrs)."""
    from logitstore.tools.inspect_store import info, verify

    out = {}
    t = time.perf_counter()
    info(open_store(store))
    out["info"] = time.perf_counter() - t
    t = time.perf_counter()
    rep = verify(open_store(store))
    out["verify"] = time.perf_counter() - t
    assert rep.ok, rep.problems
    t = time.perf_counter()
    rep = verify(open_store(store), sample=0.01)
    out["verify --sample 0.01"] = time.perf_counter() - t
    out["chunks"], out["sampled"] = rep.chunks, rep.chunks_checked
    if zarrs:
        with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
            t = time.perf_counter()
            assert verify(open_store(store)).ok
            out["verify (zarrs pipeline)"] = time.perf_counter() - t
    return out


# --------------------------------------------------------------------------------------------
# Reads
# --------------------------------------------------------------------------------------------
class MemmapStore:
    """The raw files behind the reader's interface (as fit_throughput's InMemoryStore is for RAM):
    StoreSet reads it with the same code, each array of a block copied out of its memmap."""

    def __init__(self, where: Path, meta: StoreMeta, n: int):
        self.meta, self.location, self._n = meta, f"{where} (raw np.memmap)", n
        self.chunk_rows = meta.chunk_rows
        self.mm = {name: np.memmap(where / f"{name}.bin", dtype=d, mode="r", shape=(n, *s))
                   for name, (d, s) in RAW.items()}

    def __len__(self) -> int:
        return self._n

    def read(self, a: int, b: int, pixels: bool = False) -> "_Slice":
        return _Slice(self.mm, a, b)


class _Slice:
    """Rows [a, b), each array read (copied) only when asked for, as the store reads one array at a time."""

    def __init__(self, mm: dict[str, np.memmap], a: int, b: int):
        self._mm, self._a, self._b = mm, a, b

    def __getattr__(self, name: str) -> np.ndarray:
        if name.startswith("_"):
            raise AttributeError(name)
        return np.array(self._mm[name][self._a:self._b])


def read_rate(data: Any, rows: int, epoch: int, batches: Any = None) -> float:
    """Rows/s of the first `rows` rows of an epoch: requests behind read_ahead, as trainer.fit drives
    them, consumed directly or through the DataLoader (`batches`)."""
    from trainer.batches import read_ahead

    n = max(1, rows // BATCH)
    t0 = time.perf_counter()
    reqs = read_ahead(data.requests(epoch, BATCH, seed=0))
    got = 0
    try:
        if batches is None:
            for _, r in zip(range(n), reqs):
                got += len(r)
        else:
            for b in batches(r for _, r in zip(range(n), reqs)):
                got += len(b["keys"])
    finally:
        reqs.close()
    return got / (time.perf_counter() - t0)


def open_readers(store: Path, raw: Path, images: Path, n: int) -> dict[str, Any]:
    """{"raw": a StoreSet over the memmaps, "store": a StoreSet over the store}: the same blocks."""
    from trainer.storeset import StoreSet

    meta = open_store(store).meta
    out = {"raw": StoreSet([MemmapStore(raw, meta, n)], [images]), "store": StoreSet([open_store(store)], [images])}
    assert out["raw"].train_blocks == out["store"].train_blocks
    return out


def make_loaders(readers: dict[str, Any], workers: int) -> dict[str, Any]:
    """The trainer's DataLoader for each reader, its decode cache filled (as from the second epoch on)."""
    from trainer.batches import CACHED, make_batches
    from trainer.inputs import make_input_spec

    out = {}
    for side, data in readers.items():
        spec = make_input_spec(data.pre, None, 1)
        batches = make_batches(data, spec, cache_bytes=len(data) * 16, num_workers=workers)
        batches.source.cache.state.fill_(CACHED)  # 4x4 grey originals, all decoded: the gather path
        for _ in batches(iter([next(data.requests(0, BATCH))])):  # start the workers
            pass
        out[side] = batches
    return out


# --------------------------------------------------------------------------------------------
# Memory: a fresh process per size
# --------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reader_footprint(store: str, n: int, images: str) -> dict[str, Any]:
    """In this process: open head(n) of the store as the trainer does, lay out its decode cache
    (budget 0, so no pixels), one epoch of requests behind read_ahead, one held-out pass."""
    from trainer.batches import make_batches, read_ahead
    from trainer.inputs import make_input_spec
    from trainer.storeset import open_stores

    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    data = open_stores([open_store(store).head(n)], images=[images])
    make_batches(data, make_input_spec(data.pre, None, 1), cache_bytes=0)
    opened = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = sum(len(r) for r in read_ahead(data.requests(0, BATCH)))
    epoch = time.perf_counter() - t0
    held = sum(len(r) for r in data.holdout_requests(BATCH))
    return {"rows": n, "trained": rows, "held": held, "open_s": opened, "epoch_s": epoch,
            "base_kib": base, "peak_kib": _status_kib("VmHWM")}


def footprint_in_child(store: Path, n: int, images: Path, cwd: Path) -> dict[str, Any]:
    code = ("import json, sys; from benchmarks.scale import reader_footprint; "
            "print(json.dumps(reader_footprint(sys.argv[1], int(sys.argv[2]), sys.argv[3])))")
    r = subprocess.run([sys.executable, "-c", code, str(store), str(n), str(images)], capture_output=True,
                       text=True, cwd=cwd)
    if r.returncode:
        raise RuntimeError(f"reader footprint at {n} rows failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Layout: what sharding would change
# --------------------------------------------------------------------------------------------
def layout(store: Path) -> list[tuple[str, int, int]]:
    """(array, chunk files, bytes on disk) of each row array."""
    out = []
    for name in RAW:
        files = [f for f in files_under(store / name) if not f.endswith("zarr.json")]
        out.append((name, len(files), sum(os.path.getsize(f) for f in files)))
    return out


def machine() -> str:
    cpu = platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {mem:.0f} GiB; Python {platform.python_version()}, "
            f"zarr {zarr.__version__}, NumPy {np.__version__}")


def best(values: list[float], higher: bool = True) -> float:
    return max(values) if higher else min(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5_000_000, help="Rows in the store (C = 1000, float16).")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/logitstore-scale"),
                    help="Where the store and the raw files go (about 2.1 kB a row each).")
    ap.add_argument("--repeats", type=int, default=2, help="Interleaved runs of each side; the best counts.")
    ap.add_argument("--read-rows", type=int, default=1_000_000,
                    help="Rows per timed read (the first ones of an epoch's shuffled order, spread over the store).")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers behind the reader.")
    ap.add_argument("--sizes", type=str, default="0.1,0.2,0.4,1",
                    help="Store sizes for the memory test, as fractions of --rows.")
    ap.add_argument("--phases", type=str, default="write,read,memory",
                    help="Which to run; read and memory without write reuse the files a --keep run left.")
    ap.add_argument("--chunk-rows", type=int, default=None,
                    help="Rows per chunk of the store [default: what `logitstore dump` picks for C = 1000].")
    ap.add_argument("--keep", action="store_true", help="Leave the store and the raw files in --workdir.")
    ap.add_argument("--no-old", action="store_true", help="Skip the 1.3 writer (no records) in the write phase.")
    ap.add_argument("--zarrs", action="store_true", help="Also time verify through zarrs' Rust codec pipeline.")
    ap.add_argument("--zstd-level", type=int, default=None,
                    help="Also time the 1.4 writer with chunks at this Zstd level (format-visible: other bytes than "
                         "the format's level 3; measured as an option only).")
    args = ap.parse_args()
    console = Console()
    started = time.perf_counter()
    w, n = args.workdir, args.rows
    store, raw, images = w / "store.zarr", w / "raw", w / "images"
    timed = w / "timed"  # every timed write's store, each at a path of its own; removed after the write phase
    phases = set(args.phases.split(","))
    # Leftovers a write replaces (this run's writes pay for deleting them: see above); without the write phase,
    # read and memory use the store a --keep run left.
    for stale in (store, timed) if "write" in phases else (timed,):
        shutil.rmtree(stale, ignore_errors=True)
    images.mkdir(parents=True, exist_ok=True)  # the corpus root the reader checks for; never read
    meta = make_meta(n, images, args.chunk_rows)
    console.print(f"[bold]{n:,} rows[/] x {CLASSES} classes, float16, chunks of {meta.chunk_rows} rows; "
                  f"{n * ROW_BYTES / 1e9:.1f} GB of row bytes each side, in {w}")

    tables: list[Table] = []
    spent: dict[str, float] = {}
    try:
        if "write" in phases:
            rows = Rows()
            times: dict[str, list[float]] = {"raw": [], "store": [], "finalize": [], "store13": [], "finalize13": [],
                                             "storeL": [], "finalizeL": []}
            cpu: dict[str, list[float]] = {"raw": [], "store": [], "store13": [], "storeL": []}  # process CPU s
            load = [os.getloadavg()[0]]
            old = replace(meta, format_version="1.3")  # the 1.3 writer: no records, finalize reads every chunk back
            import torch  # noqa: F401  (loaded in every dump, by the teacher; the writer's statistics use it)

            for rep in range(args.repeats):
                # The raw baseline and the stores alternate within each repeat, and which goes first alternates
                # between repeats, so a drift of the disk (writeback, page cache) falls on both sides alike.
                raw_first = rep % 2 == 0
                console.print(f"  write {rep + 1}/{args.repeats}", end="")
                if raw_first:
                    timed_raw(rows, n, raw, times, cpu, console)
                if not args.no_old:
                    c = time.process_time()
                    s, f = write_store(rows, n, timed / f"1.3-{rep}.zarr", old)
                    cpu["store13"].append(time.process_time() - c)
                    times["store13"].append(s)
                    times["finalize13"].append(f)
                    console.print(f", 1.3 store {s:.1f} s + finalize read-back {f:.1f} s", end="")
                if args.zstd_level is not None:
                    c = time.process_time()
                    s, f = write_store(rows, n, timed / f"zstd-{rep}.zarr", meta, args.zstd_level)
                    cpu["storeL"].append(time.process_time() - c)
                    times["storeL"].append(s)
                    times["finalizeL"].append(f)
                    console.print(f", 1.4 Zstd-{args.zstd_level} store {s:.1f} s + finalize {f:.2f} s", end="")
                c = time.process_time()
                s, f = write_store(rows, n, timed / f"1.4-{rep}.zarr", meta)
                cpu["store"].append(time.process_time() - c)
                times["store"].append(s)
                times["finalize"].append(f)
                console.print(f", 1.4 store {s:.1f} s + finalize {f:.2f} s", end="")
                if not raw_first:
                    timed_raw(rows, n, raw, times, cpu, console)
                console.print(f" -> 1.4 store + finalize {times['raw'][-1] / (s + f):.2f}x raw")
            load.append(os.getloadavg()[0])
            (timed / f"1.4-{args.repeats - 1}.zarr").rename(store)  # the store the other phases inspect and read
            shutil.rmtree(timed)
            mb = n * ROW_BYTES / 1e6
            raw_s, store_s, fin_s = (best(times[k], higher=False) for k in ("raw", "store", "finalize"))
            on_disk = sum(b for _, _, b in layout(store))
            t = Table(title=f"write {n:,} rows ({mb / 1e3:.1f} GB of row bytes), synced to disk; best of {args.repeats}; "
                            f"load average {load[0]:.1f} before, {load[-1]:.1f} after (other work on the machine)")
            for col in ("writer", "seconds", "MB/s", "x raw", "CPU s", "on disk"):
                t.add_column(col, justify="right")

            def cpu_s(k: str) -> str:  # process CPU of write + finalize, all threads: far less load-sensitive
                return f"{best(cpu[k], higher=False):.1f}" if cpu[k] else ""
            t.add_row("raw: ndarray.tofile", f"{raw_s:.1f}", f"{mb / raw_s:,.0f}", "1.00", cpu_s("raw"),
                      f"{n * ROW_BYTES / 1e9:.2f} GB")
            if times["store13"]:
                s13, f13 = (best(times[k], higher=False) for k in ("store13", "finalize13"))
                t.add_row("1.3 store: StoreWriter", f"{s13:.1f}", f"{mb / s13:,.0f}", f"{raw_s / s13:.2f}", "", "")
                t.add_row("1.3 finalize: read every chunk back", f"{f13:.1f}", f"{mb / f13:,.0f}", "", "", "")
                t.add_row("1.3 store + finalize", f"{s13 + f13:.1f}", f"{mb / (s13 + f13):,.0f}",
                          f"{raw_s / (s13 + f13):.2f}", cpu_s("store13"), "")
            if times["storeL"]:
                sl, fl = (best(times[k], higher=False) for k in ("storeL", "finalizeL"))
                t.add_row(f"1.4 + finalize, Zstd-{args.zstd_level} (option*)",
                          f"{sl + fl:.1f}", f"{mb / (sl + fl):,.0f}", f"{raw_s / (sl + fl):.2f}", cpu_s("storeL"), "")
            t.add_row("1.4 store: StoreWriter (+ records, statistics)", f"{store_s:.1f}", f"{mb / store_s:,.0f}",
                      f"{raw_s / store_s:.2f}", "", f"{on_disk / 1e9:.2f} GB")
            t.add_row("finalize (from chunk records)", f"{fin_s:.2f}", f"{100 * fin_s / store_s:.1f}% of write", "", "", "")
            t.add_row("[bold]1.4 store + finalize[/]", f"{store_s + fin_s:.1f}",
                      f"{mb / (store_s + fin_s):,.0f}", f"{raw_s / (store_s + fin_s):.2f}", cpu_s("store"), "")
            t.caption = ("aim (issue 16): 1.4 store + finalize >= 0.45x raw, finalize < 10% of the write. CPU s: "
                         "process CPU time of write + finalize, all threads (moves less with the machine's load)"
                         + (f"; *Zstd level {args.zstd_level}: other chunk bytes than the format's level 3, "
                            "measured only" if times["storeL"] else ""))
            tables.append(t)
            console.print(t)
            tables.append(repeats_table(times, cpu, args.repeats))
            console.print(tables[-1])
            spent["write"] = time.perf_counter() - started
            drop_cached(store)  # verify reads from the disk, as a check of a store at rest would
            ins = inspect_times(store, args.zarrs)
            t = Table(title=f"inspect the {n:,}-row store ({int(ins['chunks']):,} chunks; verify from disk)")
            for col in ("command", "seconds", "MB/s of row bytes"):
                t.add_column(col, justify="right")
            for k, v in ins.items():
                if k not in ("chunks", "sampled"):
                    rate = mb * (ins["sampled"] / ins["chunks"] if "sample" in k else 1) / v
                    t.add_row(k + (f" ({int(ins['sampled'])} chunks)" if "sample" in k else ""), f"{v:.2f}",
                              "" if k == "info" else f"{rate:,.0f}")
            tables.append(t)
            console.print(t)

        if "read" in phases:
            t0 = time.perf_counter()
            readers = open_readers(store, raw, images, n)
            loaders = make_loaders(readers, args.workers) if args.workers >= 0 else {}
            kinds = [("requests (read_ahead)", None)]
            if loaders:
                kinds.append((f"+ DataLoader, {args.workers} workers", loaders))
            rates: dict[tuple[str, str, str], list[float]] = {}
            for rep in range(args.repeats):
                for label, lds in kinds:
                    for side in ("raw", "store"):
                        drop_cached(raw if side == "raw" else store)
                        for cache in ("cold", "warm"):  # warm: the same rows again, now in the page cache
                            r = read_rate(readers[side], args.read_rows, epoch=rep,
                                          batches=None if lds is None else lds[side])
                            rates.setdefault((label, cache, side), []).append(r)
                console.print(f"  read {rep + 1}/{args.repeats}: " + ", ".join(
                    f"{k[1]} {k[2]} {v[-1]:,.0f}" for k, v in rates.items() if k[0] == kinds[0][0]) + " rows/s")
            t = Table(title=f"read {args.read_rows:,} rows of an epoch's block-shuffled order, batch {BATCH}; "
                            f"best of {args.repeats}")
            for col in ("reader", "pages", "memmap rows/s", "store rows/s", "x raw", "store MB/s"):
                t.add_column(col, justify="right")
            for label, _ in kinds:
                for cache in ("cold", "warm"):
                    a, b = best(rates[(label, cache, "raw")]), best(rates[(label, cache, "store")])
                    t.add_row(label, cache, f"{a:,.0f}", f"{b:,.0f}", f"{b / a:.2f}", f"{b * ROW_BYTES / 1e6:,.0f}")
            tables.append(t)
            console.print(t)
            del loaders, readers
            spent["read"] = time.perf_counter() - t0

        if "memory" in phases:
            t0 = time.perf_counter()
            sizes = sorted({max(meta.chunk_rows, int(float(f) * n)) for f in args.sizes.split(",")})
            repo = Path(__file__).resolve().parents[1]
            t = Table(title="peak RSS of the trainer's reader: open + decode-cache layout + one epoch of requests "
                            "+ one held-out pass (fresh process per size)")
            for col in ("rows", "open s", "epoch rows/s", "peak RSS MiB", "x smallest", "after imports MiB"):
                t.add_column(col, justify="right")
            first = None
            for size in sizes:
                d = footprint_in_child(store, size, images, repo)
                console.print(f"  memory {size:,} rows: peak {d['peak_kib'] / 1024:,.0f} MiB")
                first = first or d["peak_kib"]
                t.add_row(f"{size:,}", f"{d['open_s']:.2f}", f"{d['trained'] / d['epoch_s']:,.0f}",
                          f"{d['peak_kib'] / 1024:,.0f}", f"{d['peak_kib'] / first:.3f}",
                          f"{d['base_kib'] / 1024:,.0f}")
            tables.append(t)
            console.print(t)
            spent["memory"] = time.perf_counter() - t0

        if store.is_dir():
            t = Table(title="store layout (no sharding: one file per chunk)")
            for col in ("array", "chunk files", "files per 1M rows", "on disk", "mean KiB/file"):
                t.add_column(col, justify="right")
            for name, files, nbytes in layout(store):
                t.add_row(name, f"{files:,}", f"{files / n * 1e6:,.0f}", f"{nbytes / 1e6:,.1f} MB",
                          f"{nbytes / max(1, files) / 1024:,.1f}")
            tables.append(t)
    finally:
        if not args.keep:
            for path in (store, raw, timed):
                shutil.rmtree(path, ignore_errors=True)

    console.rule(f"{machine()}; `python -m benchmarks.scale {' '.join(sys.argv[1:])}`")
    for t in tables:
        console.print(t)
    console.print(f"total run time: {time.perf_counter() - started:,.0f} s ("
                  + ", ".join(f"{k} {v:,.0f} s" for k, v in spent.items()) + ")")


if __name__ == "__main__":
    main()
