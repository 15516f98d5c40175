"""Where the writer's CPU goes, thread by thread: ms of CPU per chunk of rows, and the wall time.

    python -m benchmarks.writer_profile [--rows 1000000] [--repeats 2] [--tree DIR] [--pregenerated]
    python -m benchmarks.writer_profile --parts [--repeats 21]
    python -m benchmarks.writer_profile --floor [--rows 400000] [--repeats 3]

Runs the real writer (`open_writer`, `submit` of 256-row batches, `close(finalize=True)`, synced to disk) on
benchmarks/scale.py's synthetic rows, and samples every thread's CPU time from /proc/self/task every 50 ms,
grouped by the thread's name (the writer, records, encode pool, zarr's event loop and its pools, main).
--tree DIR: the library from another checkout (for example `git archive` of the code before a change), in a
fresh process per run, alternating with this checkout's; --pregenerated: the batches are made before the
clock starts, so the main thread's share is the writer's own (the synthetic ids cost ~1 ms a chunk).
--floor: the writer's floor on this machine: only the chunk pool's jobs (`ChunkWriter.start`: each chunk's five
arrays encoded and written, its records and statistics), on rows made before the clock starts, with nothing
around them (no queue, no buffering, no commits), in two threads of one process and in two processes of one
thread each (no GIL between them); wall and CPU ms a chunk, before the final sync. The whole writer cannot be
faster than this.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each live thread of this process, by native id."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def group_of(name: str) -> str:
    for prefix, group in (("logitstore-writer", "writer thread"), ("logitstore-records", "records thread"),
                          ("logitstore-encode", "encode pool"), ("logitstore-chunk", "chunk pool"),
                          ("zarr_io", "zarr event loop"), ("asyncio", "zarr's to_thread pool"),
                          ("MainThread", "main (benchmark rows, submit)")):
        if name.startswith(prefix):
            return group
    return "other: " + name.rstrip("0123456789_-")


class Sampler:
    """Keeps the last CPU time seen of every thread, under its Python thread's name."""

    def __init__(self, every: float = 0.05):
        self.last: dict[int, tuple[str, float]] = {}
        self._every, self._stop = every, threading.Event()
        self._thread = threading.Thread(target=self._run, name="profile-sampler", daemon=True)

    def sample(self) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        for tid, cpu in thread_cpu().items():
            if tid in names and names[tid] != "profile-sampler":
                self.last[tid] = (names[tid], cpu)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.sample()

    def __enter__(self) -> "Sampler":
        self.sample()
        self.start = dict(self.last)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def by_group(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for tid, (name, cpu) in self.last.items():
            out[group_of(name)] = out.get(group_of(name), 0.0) + cpu - self.start.get(tid, (name, 0.0))[1]
        return out


def one_run(rows: int, workdir: str, pregenerated: bool) -> dict:
    from benchmarks.scale import BATCH, Rows, flush_to_disk, make_meta
    from logitstore.writer import open_writer
    import shutil

    import torch  # noqa: F401  (a dump has the teacher's torch loaded; the statistics use it)

    src = Rows()
    path = Path(workdir) / "store.zarr"
    shutil.rmtree(path, ignore_errors=True)
    meta = make_meta(rows, Path(workdir))
    batches = [src.batch(a, min(rows, a + BATCH)) for a in range(0, rows, BATCH)] if pregenerated else None
    cpu0, t0 = time.process_time(), time.perf_counter()
    with Sampler() as s:
        w = open_writer(str(path), meta, overwrite=True)
        for i, a in enumerate(range(0, rows, BATCH)):
            w.submit(batches[i] if batches else src.batch(a, min(rows, a + BATCH)))
        w.close(finalize=True)
        flush_to_disk()
    out = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - cpu0, "threads": s.by_group(),
           "chunks": -(-rows // meta.chunk_rows), "module": __import__("logitstore").__file__}
    shutil.rmtree(path, ignore_errors=True)
    return out


def run_in_child(tree: Path, rows: int, workdir: str, pregenerated: bool) -> dict:
    here = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{tree}:{here}"}  # the tree's library, this checkout's benchmarks
    code = ("import json, sys; from benchmarks.writer_profile import one_run; "
            "print(json.dumps(one_run(int(sys.argv[1]), sys.argv[2], sys.argv[3] == '1')))")
    r = subprocess.run([sys.executable, "-c", code, str(rows), workdir, "1" if pregenerated else "0"],
                       capture_output=True, text=True, env=env, cwd=str(tree))
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/logitstore-writer-profile")
    ap.add_argument("--tree", type=Path, default=None, help="Also run the library of this checkout (before).")
    ap.add_argument("--pregenerated", action="store_true")
    ap.add_argument("--parts", action="store_true", help="Only time each part of one chunk's job, alone.")
    ap.add_argument("--floor", action="store_true", help="Only the chunk jobs, in 2 threads and in 2 processes.")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    if args.floor:
        floors: dict[str, list[dict]] = {"2 threads": [], "2 processes": []}
        for rep in range(args.repeats):
            for how in (list(floors) if rep % 2 == 0 else list(floors)[::-1]):
                r = run_floor(how, args.rows, os.path.join(args.workdir, f"floor-{rep}-{how[0]}"))
                floors[how].append(r)
                print(f"  {rep + 1}/{args.repeats} {how}: wall {r['wall']:.2f} s, CPU {r['cpu']:.2f} s", flush=True)
        print(f"\nthe chunk jobs alone, {args.rows:,} rows ({floors['2 threads'][0]['chunks']} chunks); medians of "
              f"{args.repeats}; load average {os.getloadavg()[0]:.1f} after")
        import shutil

        for rep in range(args.repeats):
            for how in floors:
                shutil.rmtree(os.path.join(args.workdir, f"floor-{rep}-{how[0]}"), ignore_errors=True)
        for how, rs in floors.items():
            n = rs[0]["chunks"]
            print(f"  {how:12} wall {1e3 * statistics.median(r['wall'] for r in rs) / n:6.2f} ms a chunk, "
                  f"CPU {1e3 * statistics.median(r['cpu'] for r in rs) / n:6.2f} ms a chunk")
        return
    if args.parts:
        print(f"CPU ms per 2048 x 1000 float16 chunk, each part alone (process_time, median of {args.repeats}); "
              f"load average {os.getloadavg()[0]:.1f}")
        for label, ms in parts(args.repeats, args.workdir):
            print(f"  {label:55} {ms:7.2f}")
        return
    here = Path(__file__).resolve().parents[1]
    sides = [("this checkout", here)] + ([("--tree " + str(args.tree), args.tree)] if args.tree else [])
    runs: dict[str, list[dict]] = {label: [] for label, _ in sides}
    load = [os.getloadavg()[0]]
    for rep in range(args.repeats):
        for label, tree in (sides if rep % 2 == 0 else sides[::-1]):  # alternate who goes first
            r = run_in_child(tree, args.rows, args.workdir, args.pregenerated)
            runs[label].append(r)
            print(f"  {rep + 1}/{args.repeats} {label}: wall {r['wall']:.2f} s, CPU {r['cpu']:.2f} s", flush=True)
    load.append(os.getloadavg()[0])
    print(f"\n{args.rows:,} rows, {runs[sides[0][0]][0]['chunks']} chunks; load average {load[0]:.1f} before, "
          f"{load[1]:.1f} after; medians of {args.repeats}; ms of CPU per chunk")
    groups = sorted({g for rs in runs.values() for r in rs for g in r["threads"]})
    head = f"{'':34}" + "".join(f"{label[:22]:>24}" for label, _ in sides)
    print(head)

    def med(label: str, f) -> float:
        return statistics.median(f(r) for r in runs[label])
    for g in groups:
        print(f"{g:34}" + "".join(f"{med(label, lambda r: 1e3 * r['threads'].get(g, 0.0) / r['chunks']):>24.2f}"
                                   for label, _ in sides))
    print(f"{'process CPU (ms/chunk)':34}" + "".join(f"{med(label, lambda r: 1e3 * r['cpu'] / r['chunks']):>24.2f}"
                                                       for label, _ in sides))
    print(f"{'wall (ms/chunk)':34}" + "".join(f"{med(label, lambda r: 1e3 * r['wall'] / r['chunks']):>24.2f}"
                                               for label, _ in sides))
    print(f"{'cores busy (CPU / wall)':34}" + "".join(f"{med(label, lambda r: r['cpu'] / r['wall']):>24.2f}"
                                                        for label, _ in sides))
    for label, _ in sides:
        print(f"{label}: wall s {[round(r['wall'], 2) for r in runs[label]]}, CPU s {[round(r['cpu'], 2) for r in runs[label]]}")


def run_floor(how: str, rows: int, workdir: str) -> dict:
    code = ("import json, sys; from benchmarks.writer_profile import floor_run; "
            "print(json.dumps(floor_run(sys.argv[1], int(sys.argv[2]), sys.argv[3])))")
    r = subprocess.run([sys.executable, "-c", code, how, str(rows), workdir], capture_output=True, text=True,
                       cwd=str(Path(__file__).resolve().parents[1]))
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def floor_run(how: str, rows: int, workdir: str) -> dict:
    """The chunk pool's jobs for `rows` rows (whole chunks), as `StoreWriter` starts them, and nothing else. The
    store stays (the caller deletes it after every run: see benchmarks/scale.py on deleting before a write)."""
    import shutil

    import torch  # noqa: F401  (the statistics' float16 conversion, as in a dump)

    from benchmarks.scale import BATCH, Rows, make_meta
    from logitstore.chunk_io import ChunkWriter
    from logitstore.records import STAT_BLOCK_ROWS, Statistics, chunk_records, record_names
    from logitstore.rows import Rows as StoreRows
    from logitstore.writer import create_arrays, every_chunk_written, write_rows

    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    src = Rows()
    meta = make_meta(rows, Path(workdir))
    r = meta.chunk_rows
    n = rows // r
    assert r % STAT_BLOCK_ROWS == 0  # the writer's per-chunk statistics (writer._write_rows)
    group = zarr.open_group(os.path.join(workdir, "floor.zarr"), mode="w")
    create_arrays(group, meta, n * r)
    names = record_names(meta)
    arrays = {name: every_chunk_written(group[name]) for name in names}
    every = StoreRows.concat([src.batch(a, a + BATCH) for a in range(0, n * r, BATCH)])

    def jobs(k0: int, k1: int, workers: int) -> None:
        part = every.take(slice(k0 * r, k1 * r))

        def per_chunk(i: int) -> Any:
            rows_i = part.take(slice(i * r, (i + 1) * r))
            Statistics(meta.num_classes).add(rows_i, meta)
            return chunk_records(rows_i, names, r)[0]
        writer = ChunkWriter(workers)
        pending = write_rows(arrays, k0 * r, part, writer, per_chunk, r)
        pending.results()
        writer.shutdown()

    cpu, t0 = time.process_time(), time.perf_counter()
    if how == "2 threads":
        jobs(0, n, 2)
        cpu = time.process_time() - cpu
    else:
        rfd, wfd = os.pipe()
        children = []
        for k0, k1 in ((0, n // 2), (n // 2, n)):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                c = time.process_time()
                jobs(k0, k1, 1)
                os.write(wfd, f"{time.process_time() - c:.6f}\n".encode())
                os._exit(0)
            children.append(pid)
        for pid in children:
            os.waitpid(pid, 0)
        cpu = sum(float(x) for x in os.read(rfd, 4096).split())
    wall = time.perf_counter() - t0
    return {"wall": wall, "cpu": cpu, "chunks": n}


def parts(repeats: int, workdir: str) -> list[tuple[str, float]]:
    """CPU ms (time.process_time: every thread, one part at a time) of each part of one 2048-row chunk's job, median of `repeats`."""
    import hashlib
    import shutil

    import numcodecs
    import torch  # noqa: F401

    from benchmarks.scale import BATCH, Rows, make_meta
    from logitstore import schema
    from logitstore.chunk_io import chunk_encoder, put, with_crc32c, _crc32c
    from logitstore.records import Statistics, chunk_records, corpus_entries, record_names
    from logitstore.rows import Rows as StoreRows
    from logitstore.writer import Progress, create_arrays, every_chunk_written, write_rows

    path = Path(workdir) / "parts.zarr"
    shutil.rmtree(path, ignore_errors=True)
    src = Rows()
    meta = make_meta(8 * 2048, Path(workdir))
    r = meta.chunk_rows
    group = zarr.open_group(str(path), mode="w")
    create_arrays(group, meta, 8 * r)
    arrays = {name: every_chunk_written(group[name]) for name in record_names(meta)}
    batches = [src.batch(a, a + BATCH) for a in range(0, r, BATCH)]
    rows = StoreRows.concat(batches)
    ids = np.array(list(rows.ids), dtype=object)
    small = {schema.DIGESTS: rows.digests, schema.IMAGE_HW: rows.image_hw, schema.VIEW_PARAMS: rows.view_params}
    enc = {name: chunk_encoder(arr) for name, arr in arrays.items()}
    zstd = numcodecs.Zstd(level=3, checksum=False)
    packed = zstd.encode(rows.logits)
    logits_chunk = enc[schema.LOGITS](rows.logits)
    stats = Statistics(meta.num_classes)
    h = hashlib.sha256()
    names = record_names(meta)
    steps = [
        ("benchmark's synthetic rows (8 batches of 256)", lambda: [src.batch(a, a + BATCH) for a in range(0, r, BATCH)]),
        ("buffering: concat of 8 batches", lambda: StoreRows.concat(batches)),
        ("logits: SHA-256 (record)", lambda: hashlib.sha256(memoryview(rows.logits).cast("B")).digest()),
        ("logits: Zstd-3", lambda: zstd.encode(rows.logits)),
        ("logits: CRC32C (crc32c package)", lambda: _crc32c(packed)),
        ("logits: CRC32C (google_crc32c, zarr's)", lambda: __import__("google_crc32c").value(packed)),
        ("logits: checksum appended (one copy)", lambda: with_crc32c(packed)),
        ("logits: file write (zarr's LocalStore _put)", lambda: put(arrays[schema.LOGITS], 0, logits_chunk)),
        ("statistics (Statistics.add)", lambda: stats.add(rows, meta)),
        ("records of the 4 small arrays (SHA-256, ids joined)",
         lambda: chunk_records(rows, [n for n in names if n != schema.LOGITS], r)),
        ("ids: VLen UTF-8 + Zstd + CRC32C", lambda: enc[schema.IDS](ids)),
        ("digests, image_hw, view_params: Zstd + CRC32C", lambda: [enc[n](v) for n, v in small.items()]),
        ("4 small arrays: file writes", lambda: [put(arrays[n], 1, enc[n](v)) for n, v in [(schema.IDS, ids), *small.items()]]),
        ("corpus entries + hash", lambda: h.update(corpus_entries(rows))),
        ("before: zarr writes of the 4 small arrays", lambda: [arrays[n].__setitem__(slice(2 * r, 3 * r), v)
                                                              for n, v in [(schema.IDS, ids), *small.items()]]),
        ("before: zarr write of the logits chunk", lambda: arrays[schema.LOGITS].__setitem__(slice(3 * r, 4 * r), rows.logits)),
        ("one progress commit (root zarr.json)", lambda: group.attrs.__setitem__(schema.ATTR_PROGRESS, Progress(
            r, r, [], 0, stats.to_dict()).to_dict())),
    ]
    out = []
    for label, f in steps:
        f()
        times = []
        for _ in range(repeats):
            t = time.process_time()  # all threads: zarr's writes run on its event loop and pool
            f()
            times.append(time.process_time() - t)
        out.append((label, 1e3 * statistics.median(times)))
    shutil.rmtree(path, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
