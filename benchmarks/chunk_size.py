"""Which codec and how many rows per chunk: bytes per row, write and read throughput.

    python -m benchmarks.chunk_size [--rows 200000]

Logits are synthetic but shaped like a trained teacher's (one confident class over a Gaussian
background, float16), so compression ratios are realistic rather than those of white noise.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from rich.console import Console
from rich.table import Table
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec


def teacher_like_logits(rows: int, classes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 2.0, size=(rows, 1, classes)).astype(np.float32)
    x[np.arange(rows), 0, rng.integers(0, classes, rows)] += rng.uniform(4, 12, rows)
    return x.astype(np.float16)


CODECS = {
    "zstd-3": lambda: [ZstdCodec(level=3), Crc32cCodec()],
    "blosc-zstd-3-shuffle": lambda: [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2),
                                     Crc32cCodec()],
    "blosc-lz4-5-shuffle": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2),
                                    Crc32cCodec()],
}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(data: np.ndarray, codec: str, chunk_rows: int, where: Path) -> dict[str, float]:
    path = where / f"{codec}-{chunk_rows}.zarr"
    arr = zarr.create_array(str(path), shape=data.shape, chunks=(chunk_rows, *data.shape[1:]), dtype=data.dtype,
                            compressors=CODECS[codec](), fill_value=0)
    t0 = time.perf_counter()
    for a in range(0, len(data), chunk_rows):  # whole chunks, as the writer does
        arr[a:a + chunk_rows] = data[a:a + chunk_rows]
    write = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = zarr.open_array(str(path), mode="r")
    for a in range(0, len(data), chunk_rows):
        r[a:a + chunk_rows]
    read = time.perf_counter() - t0
    size = du(path)
    shutil.rmtree(path)
    mb = data.nbytes / 1e6
    return {"bytes_per_row": size / len(data), "ratio": data.nbytes / size, "write_MBps": mb / write,
            "read_MBps": mb / read}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=200_000, help="rows for C=10 (C=1000 uses rows/50)")
    args = ap.parse_args()
    con = Console()
    with tempfile.TemporaryDirectory() as tmp:
        for classes, rows in ((10, args.rows), (1000, args.rows // 50)):
            data = teacher_like_logits(rows, classes)
            t = Table(title=f"C={classes}, {rows:,} rows, float16 ({data.nbytes / 1e6:.1f} MB raw)")
            for col in ("codec", "rows/chunk", "KiB/chunk raw", "B/row", "ratio", "write MB/s", "read MB/s"):
                t.add_column(col, justify="right")
            for codec in CODECS:
                for chunk_rows in (64, 256, 1024, 4096, 16384):
                    if chunk_rows * 4 > rows:
                        continue
                    m = measure(data, codec, chunk_rows, Path(tmp))
                    t.add_row(codec, f"{chunk_rows}", f"{chunk_rows * classes * 2 / 1024:.0f}",
                              f"{m['bytes_per_row']:.1f}", f"{m['ratio']:.2f}", f"{m['write_MBps']:.0f}",
                              f"{m['read_MBps']:.0f}")
            con.print(t)


if __name__ == "__main__":
    main()
