"""Bytes per sample against fidelity: what each logits encoding costs and what it loses.

    python -m benchmarks.storage_size               # the tables of bytes against KL (a minute)
    python -m benchmarks.storage_size --students    # and students distilled from each kind of store

For C = 10, 1000 and 21,841 classes, every encoding is written with the store's real codec
chain (zarr, Zstd-3, CRC32C, plus BitRound for --keep-bits) and read back; the loss is the mean
KL(softmax(full / T) || softmax(stored / T)) in nats at T = 1, 2, 4, 8, against float32 logits.
For --topk K the stored form is the K logits, their classes and the tail's log-sum-exp, and the
KL is to the reconstruction that spreads the (exact) tail mass evenly (`topk_reconstruction_kl`;
the trainer never uses that reconstruction, it distils on the K classes plus the tail bucket).
A sampled store has no reconstruction to compare (its loss is an unbiased estimate): it is
judged by its students. Logits are synthetic but shaped like a trained teacher's: a Gaussian
background, one confident class and a few related classes above it.

--students: a teacher trained on MNIST (the embedded subset) is dumped over 10,000 rendered
letters as full float16 logits, --topk K and --sample K stores; a LeNet-5 student distils from
each (T = 4, 6 epochs, the same seed) and is scored on MNIST test digits it never saw.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import zarr
from rich.console import Console
from rich.table import Table

from logitstore.sparse import encode_sample, encode_topk, topk_reconstruction_kl
from logitstore.writer import chunk_codecs, logits_filters

TEMPERATURES = (1, 2, 4, 8)
ENCODINGS = [("float32", None), ("float16", None), ("float16", 7), ("float16", 5), ("float16", 3),
             ("float32", 10)]
SPARSE_K = {10: (1, 3), 1000: (10, 50, 200), 21841: (20, 100, 500)}


def teacher_like(rows: int, classes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, size=(rows, classes)).astype(np.float32)
    top = rng.integers(0, classes, rows)
    z[np.arange(rows), top] += rng.uniform(6, 14, rows)
    for k in range(1, 4):  # related classes: the "dark knowledge" a student should learn
        z[np.arange(rows), (top + k * 7) % classes] += rng.uniform(2, 6, rows)
    return z


def stored(a: np.ndarray, keep_bits: int | None = None) -> tuple[np.ndarray, int]:
    """An array through the store's codec chain: (what reads back, bytes stored), ~1 MiB chunks."""
    store = zarr.storage.MemoryStore()
    row = max(1, int(np.prod(a.shape[1:])) * a.dtype.itemsize)
    rows = max(1, min(len(a), (1 << 20) // row))
    arr = zarr.create_array(store, shape=a.shape, chunks=(rows, *a.shape[1:]), dtype=a.dtype, fill_value=0,
                            filters=logits_filters(keep_bits), compressors=chunk_codecs())
    arr[:] = a
    size = sum(len(v.to_bytes()) for k, v in store._store_dict.items() if not k.endswith("zarr.json"))
    return arr[:], size


def encode(z: np.ndarray, dtype: str, keep_bits: int | None) -> tuple[np.ndarray, int]:
    back, size = stored(z.astype(dtype), keep_bits)
    return back.astype(np.float64), size


def encode_topk_stored(z: np.ndarray, k: int) -> tuple[list[float], int]:
    """(mean reconstruction KL at each T, bytes) of a float16 --topk K store of z."""
    t = encode_topk(torch.from_numpy(z[:, None, :]), k, TEMPERATURES)
    t.values = t.values.astype(np.float16)
    size = sum(stored(a)[1] for a in (t.values, t.indices, t.tail_lse))
    t.values = t.values.astype(np.float32)
    kls = [float(topk_reconstruction_kl(z[:, None, :].astype(np.float64), t, r, temp).mean())
           for r, temp in enumerate(TEMPERATURES)]
    return kls, size


def encode_sample_stored(z: np.ndarray, k: int) -> int:
    s = encode_sample(z[:, None, :], k, TEMPERATURES, 4.0, [[0, i] for i in range(len(z))])
    return sum(stored(a)[1] for a in (s.indices, s.counts, s.logits.astype(np.float16), s.proposal, s.lse))


def kl(full: np.ndarray, approx: np.ndarray, t: float) -> float:
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x / t
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(full.astype(np.float64)), log_softmax(approx)
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())


def tables(con: Console) -> None:
    for classes, rows in ((10, 20000), (1000, 2000), (21841, 200)):
        z = teacher_like(rows, classes)
        t = Table(title=f"C = {classes:,}: {rows:,} rows")
        t.add_column("encoding (kN: --keep-bits N)", min_width=14)
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
        for k in SPARSE_K[classes]:
            kls, size = encode_topk_stored(z, k)
            t.add_row(f"--topk {k}", f"{size / rows:,.0f}", f"{size / rows / base:.2f}", *[f"{x:.1e}" for x in kls])
        for k in SPARSE_K[classes]:
            size = encode_sample_stored(z, k)
            t.add_row(f"--sample {k}", f"{size / rows:,.0f}", f"{size / rows / base:.2f}",
                      *["unbiased"] * len(TEMPERATURES))
        con.print(t)


STUDENT_STORES = [("float16 full logits", {}), ("--topk 1", {"topk": 1}), ("--topk 2", {"topk": 2}),
                  ("--topk 3", {"topk": 3}), ("--sample 2", {"sample": 2}), ("--sample 4", {"sample": 4}),
                  ("--sample 8", {"sample": 8})]


def students(con: Console, work: Path, epochs: int = 6, temperature: float = 4.0, seed: int = 0) -> None:
    """Students distilled from full, top-K and sampled stores of one teacher on one OOD corpus."""
    import logitstore
    import trainer
    from examples.mnist_ood import corpora, mnist
    from examples.mnist_ood.nets import TRUSTED
    from examples.mnist_ood.run import PLANS, train_teacher
    from logitstore.tools.inspect_store import store_bytes

    data = mnist.load(None)
    test_dir = mnist.write_folder(data.test_images, work / "test", data.test_labels)
    teacher = work / "teacher.pt"
    train_teacher(data, PLANS["demo"], teacher)
    teacher_top1 = trainer.evaluate(teacher, test_dir, trust_modules=TRUSTED).top1
    corpora.write_letters(work / "letters", 10_000, seed=seed)
    t = Table(title=f"Students from each kind of store (teacher {teacher_top1:.2%} on {len(data.test_images):,} "
                    f"MNIST test digits; 10,000 letters; LeNet-5, T = {temperature:g}, {epochs} epochs)")
    for col in ("store", "target bytes/image", "student top-1", "x full-logits student's error"):
        t.add_column(col, justify="left" if col == "store" else "right")
    base_err = None
    for name, kw in STUDENT_STORES:
        out = work / f"{name.replace(' ', '_').replace('-', '')}.zarr"
        logitstore.dump(str(teacher), str(work / "letters"), str(out), overwrite=True, trust_modules=TRUSTED, **kw)
        st = logitstore.open_store(out)
        nbytes = sum(v for k, v in store_bytes(st).items() if k in st.meta.target_arrays())
        res = trainer.fit([out], work / "runs" / out.stem, student="lenet", epochs=epochs, temperature=temperature,
                          seed=seed, overwrite=True)
        top1 = trainer.evaluate(res.checkpoint, test_dir).top1
        base_err = base_err or (1 - top1)
        t.add_row(name, f"{nbytes / len(st):,.1f}", f"{top1:.2%}", f"{(1 - top1) / base_err:.2f}")
        con.print(f"  {name}: {top1:.2%}")
    con.print(t)


def main() -> None:
    con = Console(width=None if sys.stdout.isatty() else 130)
    tables(con)
    if "--students" in sys.argv[1:]:
        with tempfile.TemporaryDirectory(prefix="storage_students_") as tmp:
            students(con, Path(tmp))


if __name__ == "__main__":
    main()
