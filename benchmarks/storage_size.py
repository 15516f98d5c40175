"""Bytes per sample against fidelity: what each logits encoding costs and what it loses.

    python -m benchmarks.storage_size

For C = 10, 1000 and 21,841 classes, every encoding is written with the store's real codec
chain (zarr, Zstd-3, CRC32C, plus BitRound for --keep-bits) and read back; the loss is the mean
KL(softmax(full / T) || softmax(stored / T)) in nats at T = 1, 2, 4, 8, against float32 logits.
Logits are synthetic but shaped like a trained teacher's: a Gaussian background, one confident
class and a few related classes above it.
"""
from __future__ import annotations

import numpy as np
import zarr
from rich.console import Console
from rich.table import Table

from logitstore.writer import chunk_codecs, logits_filters

TEMPERATURES = (1, 2, 4, 8)
ENCODINGS = [("float32", None), ("float16", None), ("float16", 7), ("float16", 5), ("float16", 3),
             ("float32", 10)]


def teacher_like(rows: int, classes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, size=(rows, classes)).astype(np.float32)
    top = rng.integers(0, classes, rows)
    z[np.arange(rows), top] += rng.uniform(6, 14, rows)
    for k in range(1, 4):  # related classes: the "dark knowledge" a student should learn
        z[np.arange(rows), (top + k * 7) % classes] += rng.uniform(2, 6, rows)
    return z


def encode(z: np.ndarray, dtype: str, keep_bits: int | None) -> tuple[np.ndarray, int]:
    store = zarr.storage.MemoryStore()
    rows = max(1, min(len(z), (1 << 20) // (z.shape[1] * np.dtype(dtype).itemsize)))
    arr = zarr.create_array(store, shape=z.shape, chunks=(rows, z.shape[1]), dtype=dtype, fill_value=0,
                            filters=logits_filters(keep_bits), compressors=chunk_codecs())
    arr[:] = z.astype(dtype)
    size = sum(len(v.to_bytes()) for k, v in store._store_dict.items() if not k.endswith("zarr.json"))
    return arr[:].astype(np.float64), size


def kl(full: np.ndarray, approx: np.ndarray, t: float) -> float:
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x / t
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(full.astype(np.float64)), log_softmax(approx)
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())


def main() -> None:
    con = Console()
    for classes, rows in ((10, 20000), (1000, 2000), (21841, 200)):
        z = teacher_like(rows, classes)
        t = Table(title=f"C = {classes:,}: {rows:,} rows")
        t.add_column("encoding (kN: --keep-bits N)")
        t.add_column("bytes/sample", justify="right")
        t.add_column("x float32", justify="right")
        for temp in TEMPERATURES:
            t.add_column(f"KL T={temp}", justify="right")
        base = None
        for dtype, bits in ENCODINGS:
            back, size = encode(z, dtype, bits)
            per = size / rows
            base = base or per
            t.add_row(f"{dtype}" + (f" k{bits}" if bits else ""), f"{per:,.0f}", f"{per / base:.2f}",
                      *[f"{kl(z, back, temp):.1e}" for temp in TEMPERATURES])
        con.print(t)


if __name__ == "__main__":
    main()
