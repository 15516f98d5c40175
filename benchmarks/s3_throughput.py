"""`trainer fit` streaming from an S3-protocol server on loopback against the same store on local disk.

    python -m benchmarks.s3_throughput [--images 10000] [--epochs 3]

The server is moto's (`moto_server`, a separate process on 127.0.0.1); the store is copied there
with `logitstore copy`. Both runs use the same student, images (decode cache warm after epoch 1),
seed and settings; the best epoch after the first, over interleaved repeats, counts.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import logitstore
import trainer
from logitstore.tools.transfer import copy_store

from .fit_throughput import CLASSES, PRE, make_corpus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def lenet_teacher(path: Path) -> Path:
    """A LeNet-5 teacher checkpoint with seed-0 random weights: its logits are all the benchmarks need."""
    from trainer.students import lenet

    torch.manual_seed(0)
    torch.save({"arch": "trainer.students:lenet", "arch_kwargs": {"num_classes": 10, "in_channels": 1},
                "state_dict": lenet(num_classes=10, in_channels=1).state_dict(), "classes": CLASSES,
                "preprocess": PRE}, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of each; the best counts")
    ap.add_argument("--mnist", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets/mnist.npz")
    args = ap.parse_args()
    torch.set_num_threads(1)
    proc, endpoint = start_server()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp_s:
            tmp = Path(tmp_s)
            make_corpus(args.mnist, args.images, tmp / "images")
            teacher = lenet_teacher(tmp / "teacher.pt")
            local = tmp / "store.zarr"
            logitstore.dump(str(teacher), str(tmp / "images"), str(local), num_workers=1, batch_size=256)
            url = "s3://bench/store.zarr"
            t0 = time.perf_counter()
            copy_store(str(local), url)
            copy_s = time.perf_counter() - t0
            rates: dict[str, float] = {}
            for rep in range(args.repeats):
                for name, store in (("local disk", str(local)), ("S3 on loopback", url)):
                    res = trainer.fit([store], tmp / f"{name.replace(' ', '_')}{rep}", images=[tmp / "images"],
                                      student="lenet", epochs=args.epochs, batch_size=256, num_workers=0, seed=0)
                    best = max(r["samples_per_s"] for r in res.history[1:] or res.history)
                    rates[name] = max(rates.get(name, 0.0), best)
            n_chunks = logitstore.open_store(local).n_chunks
    finally:
        proc.terminate()
        proc.wait()
    t = Table(title=f"trainer fit, LeNet, {args.images:,} MNIST images ({n_chunks} chunks), batch 256, "
                    f"{os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}")
    for col in ("store", "samples/s (best epoch after the first)", "x local"):
        t.add_column(col, justify="right")
    for name, r in rates.items():
        t.add_row(name, f"{r:,.0f}", f"{r / rates['local disk']:.3f}")
    Console().print(t)
    Console().print(f"logitstore copy local -> S3: {copy_s:.2f} s")


if __name__ == "__main__":
    main()
