"""Whole chunks of a row array written as zarr would write them, without zarr's per-chunk Python.

zarr 3.1 runs every chunk of a write through its codec pipeline on one event-loop thread: task creation,
a thread hand-off per codec, the CRC32C and its copy under the GIL. On 2 cores that Python, not Zstd,
bounded the writer (benchmarks/RESULTS.md, "Where the 1.4 writer's CPU goes"). For the arrays that hold
almost all the bytes (the teacher's logits) the writer encodes whole chunks itself with the very codecs
the array's metadata names (bytes little-endian, then numcodecs' Zstd at the array's level without its
checksum, then CRC32C appended little-endian, exactly as zarr.codecs does) in a small thread pool, and
puts them in the store in one call per write. The bytes are zarr's (tests/test_golden.py, and
tests/test_chunk_io.py compares chunk files with zarr's own); any array with another codec chain,
filters, or a partial chunk goes through zarr as before.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync


def zstd_level(arr: zarr.Array) -> int | None:
    """The Zstd level of `arr`'s chunks if its codecs are exactly [bytes (little), zstd (no checksum), crc32c]
    on a regular grid, without sharding or filters: the chain this module reproduces. None otherwise."""
    meta = arr.metadata
    codecs = getattr(meta, "codecs", None)
    if codecs is None or len(codecs) != 3:
        return None
    b, z, c = codecs
    if not (isinstance(b, BytesCodec) and isinstance(z, ZstdCodec) and isinstance(c, Crc32cCodec)):
        return None
    if z.checksum or (b.endian is not None and b.endian.value != "little"):
        return None
    if not hasattr(meta.chunk_grid, "chunk_shape") or tuple(meta.chunk_grid.chunk_shape)[1:] != tuple(arr.shape[1:]):
        return None  # chunks split only along rows
    return int(z.level)


def encode_chunk(values: np.ndarray, level: int) -> bytes:
    """One chunk's stored bytes: its values little-endian in C order, Zstd at `level`, CRC32C (LE) appended."""
    import google_crc32c
    import numcodecs

    raw = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    data = numcodecs.Zstd(level=level, checksum=False).encode(raw)
    return bytes(data) + np.uint32(google_crc32c.value(bytes(data))).tobytes()


class ChunkWriter:
    """Writes the whole chunks of a write (rows [a, b) with a on a chunk boundary) of the arrays it can,
    encoding them `workers` at a time; `write` returns how many leading rows it wrote."""

    def __init__(self, workers: int = 2):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="logitstore-encode")

    def write(self, arr: zarr.Array, a: int, values: np.ndarray) -> int:
        r = arr.chunks[0]
        level = zstd_level(arr)
        n = len(values) // r * r
        if level is None or a % r or n == 0 or values.shape[1:] != arr.shape[1:] or a + n > arr.shape[0]:
            return 0
        if values.dtype != arr.dtype:
            return 0
        k0 = a // r
        encoded = list(self._pool.map(lambda i: encode_chunk(values[i * r:(i + 1) * r], level), range(n // r)))
        path = arr.store_path.path
        keys = [(f"{path}/" if path else "") + arr.metadata.encode_chunk_key((k0 + i,) + (0,) * (arr.ndim - 1))
                for i in range(len(encoded))]
        proto = default_buffer_prototype()
        store = arr.store_path.store

        async def put() -> None:
            await asyncio.gather(*(store.set(k, proto.buffer.from_bytes(e)) for k, e in zip(keys, encoded)))
        sync(put())
        return n

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)
