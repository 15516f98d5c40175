"""The same MNIST images as a folder of PNGs, as local WebDataset shards, as shards on an S3 server on
loopback and as Parquet files: `logitstore dump` images/s and `trainer fit` samples/s, as ratios to
the folder, measured side by side in one run.

    python -m benchmarks.corpus_sources [--images 20000] [--repeats 2] [--cold]
    python -m benchmarks.corpus_sources --rss 100000,1000000   # peak RSS of dumps over tiny images in shards
    python -m benchmarks.corpus_sources --pairs 6   # interleaved dumps, each in a fresh process: shards listed
                                                    # first against listed while the teacher runs
    python -m benchmarks.corpus_sources --rss-loose 100000,1000000  # ... over a prefix of loose tiny images

"S3 shards, fetched twice" dumps the same remote shards with `sources.LISTED_KEEP_BYTES = 0`: every
shard is then fetched to be listed and again to be dumped, as before a listed shard was kept.

The fit runs without a decode cache (--cache-images 0), so every epoch reads each image again from
its source: the folder's files, the shards' members (remote shards through the local unit cache),
the tables' row groups. With --cold, the local sources' pages are dropped from the page cache
(posix_fadvise) before each dump and fit, as for a corpus larger than memory; the fit's epochs after
the first read them warm again. The S3 server is moto's `moto_server` in its own process. Interleaved
repeats; the best counts.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

import logitstore
import logitstore.sources as sources_module
import trainer

from .dump_throughput import PRE, teacher_net
from .s3_throughput import start_server
from .scale import drop_cached

SHARD_IMAGES = 1000  # img2dataset's default is 10,000; smaller shards give the S3 run several units


def pngs(mnist: Path, n: int) -> list[bytes]:
    with np.load(mnist) as d:
        imgs = d["train_images"]
    out = []
    for i in range(n):
        b = io.BytesIO()
        Image.fromarray(imgs[i % len(imgs)]).save(b, format="PNG")
        out.append(b.getvalue())
    return out


def write_layouts(images: list[bytes], root: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    folder, shards, tables = root / "folder", root / "shards", root / "tables"
    for p in (folder, shards, tables):
        p.mkdir(parents=True)
    for i, data in enumerate(images):
        sub = folder / f"{i // 1000:04d}"
        sub.mkdir(exist_ok=True)
        (sub / f"{i:09d}.png").write_bytes(data)
    for s in range(0, len(images), SHARD_IMAGES):
        with wds.TarWriter(str(shards / f"{s // SHARD_IMAGES:05d}.tar")) as w:
            for i in range(s, min(len(images), s + SHARD_IMAGES)):
                w.write({"__key__": f"{i:09d}", "png": images[i], "txt": f"caption {i}", "json": b"{}"})
    per_file = 10 * SHARD_IMAGES
    for f, s in enumerate(range(0, len(images), per_file)):
        part = images[s:s + per_file]
        pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in part]}),
                       tables / f"train-{f:05d}.parquet", row_group_size=1000)
    return {"folder": folder, "shards": shards, "tables": tables}


def corpus_and_teacher(args: argparse.Namespace, tmp: Path, client: object) -> tuple[dict[str, Path], Path]:
    """The images in every layout under `tmp`, the shards also in the S3 bucket "bench", and the teacher."""
    layouts = write_layouts(pngs(args.mnist, args.images), tmp)
    for tar in sorted(layouts["shards"].glob("*.tar")):
        client.upload_file(str(tar), "bench", f"shards/{tar.name}")  # type: ignore[attr-defined]
    return layouts, save_teacher(tmp / "teacher.pt")


def save_teacher(ckpt: Path) -> Path:
    """benchmarks.dump_throughput's teacher (seed 0) as a checkpoint at `ckpt`."""
    torch.manual_seed(0)
    torch.save({"arch": "benchmarks.dump_throughput:teacher_net", "arch_kwargs": {},
                "state_dict": teacher_net().state_dict(), "classes": [str(i) for i in range(10)],
                "preprocess": PRE}, ckpt)
    return ckpt


def speeds(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    proc, endpoint = start_server()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    dump_rate: dict[str, float] = {}
    fit_rate: dict[str, float] = {}
    try:
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp_s:
            tmp = Path(tmp_s)
            layouts, ckpt = corpus_and_teacher(args, tmp, client)
            sources = {"folder": (str(layouts["folder"]), {}),
                       "local shards": (str(layouts["shards"]), {}),
                       "S3 shards (loopback)": ("s3://bench/shards/", {}),
                       "S3 shards, fetched twice": ("s3://bench/shards/", {}),
                       "Parquet": (str(layouts["tables"]), {"image_column": "image"})}
            stores: dict[str, str] = {}
            for rep in range(args.repeats):
                names = list(sources)
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    images, kw = sources[name]
                    out = tmp / f"{name.replace(' ', '_')}-{rep}.zarr"
                    keep = sources_module.LISTED_KEEP_BYTES
                    if name == "S3 shards, fetched twice":
                        sources_module.LISTED_KEEP_BYTES = 0
                    if args.cold and not images.startswith("s3://"):
                        drop_cached(Path(images))  # the next reads come from the disk, as for a corpus
                                                   # larger than memory (moto keeps its objects in memory)
                    t0 = time.perf_counter()
                    try:
                        s = logitstore.dump(str(ckpt), images, str(out), batch_size=256, num_workers=args.workers,
                                            device="cpu", trust_modules=["benchmarks.dump_throughput"], **kw)
                    finally:
                        sources_module.LISTED_KEEP_BYTES = keep
                    dump_rate[name] = max(dump_rate.get(name, 0.0), s.n_images / (time.perf_counter() - t0))
                    stores[name] = str(out)
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    if name == "S3 shards, fetched twice":
                        fit_rate[name] = float("nan")  # the trainer reads the same store as the row above
                        continue
                    if args.cold and not sources[name][0].startswith("s3://"):
                        drop_cached(Path(sources[name][0]))
                    res = trainer.fit([stores[name]], tmp / f"fit-{name.replace(' ', '_')}-{rep}", student="lenet",
                                      epochs=args.epochs, batch_size=256, num_workers=args.workers, seed=0,
                                      cache_images=0)
                    best = max(r["samples_per_s"] for r in res.history)
                    fit_rate[name] = max(fit_rate.get(name, 0.0), best)
    finally:
        proc.terminate()
        proc.wait()
    t = Table(title=f"{args.images:,} MNIST PNGs; dump: batch 256, {args.workers} worker(s); fit: LeNet, batch 256, "
                    f"no decode cache; {'cold' if args.cold else 'warm'} page cache; {os.cpu_count()} cores, "
                    f"Python {platform.python_version()}, torch {torch.__version__}")
    for col in ("source", "dump images/s", "x folder", "fit samples/s", "x folder"):
        t.add_column(col, justify="right")
    for name in sources:
        t.add_row(name, f"{dump_rate[name]:,.0f}", f"{dump_rate[name] / dump_rate['folder']:.3f}",
                  f"{fit_rate[name]:,.0f}", f"{fit_rate[name] / fit_rate['folder']:.3f}")
    Console().print(t)


def rss_child(n: int, tmp: str) -> None:
    """One dump over `n` tiny images in shards (a 4x4 PNG a sample), run in its own process."""
    import webdataset as wds

    root = Path(tmp)
    shards = root / f"shards-{n}"
    shards.mkdir()
    b = io.BytesIO()
    Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4)).save(b, format="PNG")
    tiny = b.getvalue()
    for s in range(0, n, 10000):
        with wds.TarWriter(str(shards / f"{s // 10000:05d}.tar")) as w:
            for i in range(s, min(n, s + 10000)):
                w.write({"__key__": f"{i:09d}", "png": tiny})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    ckpt = root / "tiny.pt"
    torch.save({"arch": "benchmarks.corpus_sources:tiny_teacher", "arch_kwargs": {},
                "state_dict": tiny_teacher().state_dict(), "classes": [str(i) for i in range(10)],
                "preprocess": {"size": [4, 4], "mean": [0.5], "std": [0.25], "mode": "L"}}, ckpt)
    t0 = time.perf_counter()
    s = logitstore.dump(str(ckpt), str(shards), str(root / f"out-{n}.zarr"), batch_size=1024, num_workers=0,
                        device="cpu", trust_modules=["benchmarks.corpus_sources"])
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{n} {s.n_images} {before} {peak} {dt:.1f}")


def pairs(args: argparse.Namespace) -> None:
    """--pairs N: N rounds of fresh-process dumps of the same images (folder; local shards and loopback S3
    shards, each listed first and listed while the teacher runs), interleaved, with each round's ratios
    to its folder dump and the medians. "Listed first" is what a resumed dump does (and every dump did
    before listing moved beside the teacher)."""
    import statistics

    proc, endpoint = start_server()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    runs = [("folder", "folder", "while"), ("local shards, listed first", "shards", "first"),
            ("local shards, listed while dumping", "shards", "while"),
            ("S3 shards, listed first", "s3", "first"), ("S3 shards, listed while dumping", "s3", "while")]
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                              aws_secret_access_key="bench")
        client.create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp_s:
            tmp = Path(tmp_s)
            layouts, ckpt = corpus_and_teacher(args, tmp, client)
            where = {"folder": str(layouts["folder"]), "shards": str(layouts["shards"]), "s3": "s3://bench/shards/"}
            for rep in range(args.pairs):
                for name, src, mode in runs[rep % len(runs):] + runs[:rep % len(runs)]:
                    r = subprocess.run([sys.executable, "-m", "benchmarks.corpus_sources", "--dump-child", where[src],
                                        str(ckpt), str(tmp / "out.zarr"), mode, str(args.workers)],
                                       capture_output=True, text=True, env=env)
                    if r.returncode:
                        raise RuntimeError(r.stderr[-2000:])
                    times[name].append(float(r.stdout.split()[-1]))
                print(f"  round {rep + 1}/{args.pairs}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                      flush=True)
    finally:
        proc.terminate()
        proc.wait()
    t = Table(title=f"{args.images:,} MNIST PNGs, dump seconds in fresh processes (batch 256, {args.workers} worker(s)), "
                    f"{args.pairs} interleaved rounds; {os.cpu_count()} cores")
    t.add_column("source")
    for k in range(args.pairs):
        t.add_column(f"{k + 1}", justify="right")
    t.add_column("median s", justify="right")
    t.add_column("median x folder (per round)", justify="right")
    folder = times["folder"]
    for name, _, _ in runs:
        ratios = [f / x for f, x in zip(folder, times[name])]
        t.add_row(name, *(f"{x:.2f}" for x in times[name]), f"{statistics.median(times[name]):.2f}",
                  f"{statistics.median(ratios):.3f}")
    Console(width=200).print(t)


def dump_child(images: str, ckpt: str, out: str, mode: str, workers: int) -> None:
    """One dump in its own process; `mode` "first": the corpus is listed before the teacher starts."""
    import shutil

    import logitstore.teacher.local as local

    if mode == "first":
        local._fresh = lambda *a, **k: False  # as a resumed dump: list first, then create the store
    shutil.rmtree(out, ignore_errors=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    logitstore.dump(ckpt, images, out, batch_size=256, num_workers=workers, device="cpu",
                    trust_modules=["benchmarks.dump_throughput"], progress=False)
    print(f"{time.perf_counter() - t0:.3f}")


def tiny_teacher() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10))


def rss(sizes: list[int]) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            out = subprocess.run([sys.executable, "-m", "benchmarks.corpus_sources", "--rss-child", str(n), tmp],
                                 capture_output=True, text=True, check=True).stdout.split()
            rows.append((n, int(out[1]), int(out[2]), int(out[3]), float(out[4])))
    t = Table(title="peak RSS of a dump over tiny images (4x4 PNG) in shards of 10,000; 0 workers, batch 1024")
    for col in ("listed", "stored", "peak RSS MiB", f"x {sizes[0]:,}", "seconds"):
        t.add_column(col, justify="right")
    for n, stored, _, peak, dt in rows:
        t.add_row(f"{n:,}", f"{stored:,}", f"{peak / 1024:,.0f}", f"{peak / rows[0][3]:.3f}", f"{dt:,.0f}")
    Console().print(t)


def rss_loose_child(n: int, tmp: str, mode: str) -> None:
    """Over `n` loose tiny images (1,000 a folder) given as a `local://` prefix, in its own process:
    "dump", a whole dump through the streamed prefix listing; "find", only the listing as it was
    (`sorted(fs.find(...))` and the ids kept)."""
    import fsspec

    root = Path(tmp)
    folder = root / f"loose-{n}"
    if not folder.exists():
        b = io.BytesIO()
        Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4)).save(b, format="PNG")
        tiny = b.getvalue()
        for i in range(n):
            if i % 1000 == 0:
                (folder / f"{i // 1000:05d}").mkdir(parents=True)
            (folder / f"{i // 1000:05d}" / f"{i:09d}.png").write_bytes(tiny)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if mode == "find":
        fs = fsspec.filesystem("file")
        base = str(folder)
        ids = [p[len(base) + 1:] for p in sorted(fs.find(base)) if p.endswith(".png")]
        stored = len(ids)
    else:
        torch.manual_seed(0)
        ckpt = root / "tiny.pt"
        torch.save({"arch": "benchmarks.corpus_sources:tiny_teacher", "arch_kwargs": {},
                    "state_dict": tiny_teacher().state_dict(), "classes": [str(i) for i in range(10)],
                    "preprocess": {"size": [4, 4], "mean": [0.5], "std": [0.25], "mode": "L"}}, ckpt)
        s = logitstore.dump(str(ckpt), f"local://{folder}/", str(root / f"out-{n}.zarr"), batch_size=1024,
                            num_workers=0, device="cpu", trust_modules=["benchmarks.corpus_sources"])
        stored = s.n_images
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{n} {stored} {before} {peak} {dt:.1f}")


def rss_loose(sizes: list[int]) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            for mode in ("find", "dump"):
                out = subprocess.run([sys.executable, "-m", "benchmarks.corpus_sources", "--rss-loose-child",
                                      str(n), tmp, mode], capture_output=True, text=True, check=True).stdout.split()
                rows.append((mode, n, int(out[1]), int(out[3]), float(out[4])))
    t = Table(title="peak RSS over a prefix of loose tiny images (4x4 PNG, 1,000 a folder, `local://`); "
                    "dump: 0 workers, batch 1024; find: the listing as it was, alone")
    for col in ("what", "listed", "stored", "peak RSS MiB", f"x {sizes[0]:,}", "seconds"):
        t.add_column(col, justify="right")
    for mode, n, stored, peak, dt in rows:
        first = next(r[3] for r in rows if r[0] == mode)
        t.add_row("whole dump (streamed listing)" if mode == "dump" else "sorted(find) only", f"{n:,}",
                  f"{stored:,}", f"{peak / 1024:,.0f}", f"{peak / first:.3f}", f"{dt:,.0f}")
    Console().print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cold", action="store_true",
                    help="drop the local sources' pages from the page cache before each dump and fit")
    ap.add_argument("--mnist", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets/mnist.npz")
    ap.add_argument("--rss", default=None, help="comma-separated corpus sizes: measure peak RSS instead")
    ap.add_argument("--rss-child", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rss-loose", default=None, help="comma-separated sizes: peak RSS over a prefix of loose images")
    ap.add_argument("--rss-loose-child", nargs=3, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=int, default=0, help="interleaved rounds of fresh-process dumps: listing first "
                    "against listing while the teacher runs")
    ap.add_argument("--dump-child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dump_child:
        images, ckpt, out, mode, workers = args.dump_child
        dump_child(images, ckpt, out, mode, int(workers))
    elif args.pairs:
        pairs(args)
    elif args.rss_loose_child:
        rss_loose_child(int(args.rss_loose_child[0]), args.rss_loose_child[1], args.rss_loose_child[2])
    elif args.rss_loose:
        rss_loose([int(x) for x in args.rss_loose.split(",")])
    elif args.rss_child:
        rss_child(int(args.rss_child[0]), args.rss_child[1])
    elif args.rss:
        rss([int(x) for x in args.rss.split(",")])
    else:
        speeds(args)


if __name__ == "__main__":
    main()
