"""`logitstore copy` to and from object storage against s3fs's own bulk put/get of the same files.

    python -m benchmarks.copy_throughput [--images 2000] [--chunk-rows 16] [--latency-ms 10]

The S3 server is moto's (`moto_server`, its own process on 127.0.0.1). Each direction is timed for
s3fs's recursive `put`/`get` (no checksums, no completion marker), `copy --jobs 1` (one key at a
time, the old behaviour) and `copy` at several `--jobs`; once straight to the server and once
through a loopback proxy that holds each request `--latency-ms` before passing it on (a real object
store's first-byte latency, which loopback lacks). Runs are interleaved; the best of the repeats counts.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

import logitstore
from logitstore.tools.transfer import copy_store

from .fit_throughput import make_corpus
from .s3_throughput import lenet_teacher, start_server


class LatencyProxy:
    """A TCP proxy on 127.0.0.1 that delays the first bytes of each request by `delay` seconds.

    A connection carries one request at a time (HTTP keep-alive), so "client bytes after a
    response" marks a new request: the delay is paid once per request, not per packet.
    """

    def __init__(self, upstream_port: int, delay: float):
        self.upstream, self.delay = upstream_port, delay
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(("127.0.0.1", self.upstream))
            fresh = threading.Event()
            fresh.set()
            threading.Thread(target=self._pump, args=(client, server, fresh, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, fresh, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, fresh: threading.Event, request: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if request and fresh.is_set():
                    fresh.clear()
                    time.sleep(self.delay)
                elif not request:
                    fresh.set()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def make_store(tmp: Path, mnist: Path, images: int, chunk_rows: int) -> Path:
    make_corpus(mnist, images, tmp / "images")
    teacher = lenet_teacher(tmp / "teacher.pt")
    store = tmp / "store.zarr"
    logitstore.dump(str(teacher), str(tmp / "images"), str(store), num_workers=0, chunk_rows=chunk_rows, views=4,
                    progress=False)
    return store


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--chunk-rows", type=int, default=16)
    ap.add_argument("--latency-ms", type=float, default=10.0)
    ap.add_argument("--jobs", type=str, default="1,4,16,64", help="comma-separated --jobs values to time")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mnist", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets/mnist.npz")
    args = ap.parse_args()
    torch.set_num_threads(1)
    proc, endpoint = start_server()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    proxy = LatencyProxy(int(endpoint.rsplit(":", 1)[1]), args.latency_ms / 1000)
    jobs = [int(j) for j in args.jobs.split(",")]
    try:
        import boto3
        import s3fs

        boto3.client("s3").create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp_s:
            tmp = Path(tmp_s)
            store = make_store(tmp, args.mnist, args.images, args.chunk_rows)
            files = [p for p in store.rglob("*") if p.is_file()]
            n_keys, n_bytes = len(files), sum(p.stat().st_size for p in files)
            copy_store(str(store), "s3://bench/source.zarr")  # the S3 -> local runs read this one
            results: dict[tuple[str, str, str], list[float]] = {}
            run = 0
            for _ in range(args.repeats):
                for net, url in (("loopback", endpoint), (f"+{args.latency_ms:g} ms/request", proxy.url)):
                    opts = {"client_kwargs": {"endpoint_url": url}}
                    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)

                    def add(direction: str, how: str, seconds: float) -> None:
                        results.setdefault((net, direction, how), []).append(seconds)

                    for how in ["s3fs put/get", *[f"copy --jobs {j}" for j in jobs]]:
                        run += 1
                        up, down = f"bench/run{run}.zarr", tmp / f"down{run}.zarr"
                        if how.startswith("s3fs"):
                            add("local -> S3", how, timed(lambda: fs.put(str(store), up, recursive=True)))
                            add("S3 -> local", how, timed(lambda: fs.get("bench/source.zarr", str(down),
                                                                         recursive=True)))
                        else:
                            j = int(how.rsplit(" ", 1)[1])
                            add("local -> S3", how, timed(lambda: copy_store(str(store), f"s3://{up}",
                                                                             dst_options=opts, jobs=j)))
                            add("S3 -> local", how, timed(lambda: copy_store("s3://bench/source.zarr", str(down),
                                                                             src_options=opts, jobs=j)))
                        shutil.rmtree(down, ignore_errors=True)
    finally:
        proxy.close()
        proc.kill()
    t = Table(title=f"copy of a store of {n_keys} keys, {n_bytes / 2**20:.1f} MiB ({args.images} images, "
                    f"{args.chunk_rows} rows per chunk, 4 views); best of {args.repeats}")
    for col in ("network", "direction", "how", "seconds", "keys/s", "MiB/s", "x s3fs", "x --jobs 1"):
        t.add_column(col, justify="left" if col in ("network", "direction", "how") else "right")
    for (net, direction, how), times in results.items():
        best = min(times)
        ref = min(results[(net, direction, "s3fs put/get")])
        one = min(results[(net, direction, "copy --jobs 1")]) if (net, direction, "copy --jobs 1") in results else None
        t.add_row(net, direction, how, f"{best:.2f}", f"{n_keys / best:,.0f}", f"{n_bytes / 2**20 / best:.2f}",
                  f"{ref / best:.2f}", f"{one / best:.2f}" if one else "-")
    Console(width=160).print(t)
    print(f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


if __name__ == "__main__":
    main()
