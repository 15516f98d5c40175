"""Whole chunks of row arrays written as zarr would write them, without zarr's per-chunk Python.

zarr 3.1 runs every chunk of a write through its codec pipeline on one event-loop thread: task creation,
a thread hand-off per codec, the CRC32C and its copy under the GIL. On 2 cores that Python, not Zstd,
bounded the writer (benchmarks/RESULTS.md, "Where the 1.4 writer's CPU goes"). For every row array whose
codecs are [bytes little-endian | vlen-utf8, Zstd without checksum, CRC32C] on chunks split only along rows
(all a dump writes unless --keep-bits adds a filter) the writer encodes whole chunks itself with those very
codecs (numcodecs' Zstd and VLenUTF8, CRC32C appended little-endian, exactly as zarr.codecs does) and puts
each in the store from a small thread pool: one job per chunk of rows does all of that chunk's arrays, then
whatever else the caller asks of the chunk (its records and statistics), so two chunks proceed on two
cores and the hand-offs are one per chunk. The bytes are zarr's (tests/test_golden.py, and
tests/test_chunk_io.py compares chunk files with zarr's own); any array with another codec chain, and a
partial chunk, goes through zarr as before.

String arrays are also read here (`read_strings`): a vlen-utf8 chunk starts with its item count, and numcodecs
allocates that many objects before it finds the bytes too short, so a chunk of another array moved in (its
CRC32C holds) made zarr allocate up to 2^32 objects (tens of GB, minutes) before failing. The count is checked
against the chunk's rows first.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, VLenUTF8Codec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

try:  # releases the GIL and runs ~4x faster than google_crc32c (zarr's own), same CRC32C values
    from crc32c import crc32c as _crc32c
except ImportError:  # pragma: no cover - an install without it (pyproject.toml lists it)
    from google_crc32c import value as _crc32c

Encoder = Callable[[np.ndarray], np.ndarray]


def zstd_level(arr: zarr.Array) -> int | None:
    """The Zstd level of `arr`'s chunks if its codecs are exactly [bytes (little) | vlen-utf8, zstd (no checksum),
    crc32c] on a regular grid, without sharding or filters: the chains this module reproduces. None otherwise."""
    meta = arr.metadata
    codecs = getattr(meta, "codecs", None)
    if codecs is None or len(codecs) != 3:
        return None
    b, z, c = codecs
    if not (isinstance(b, (BytesCodec, VLenUTF8Codec)) and isinstance(z, ZstdCodec) and isinstance(c, Crc32cCodec)):
        return None
    if z.checksum or (isinstance(b, BytesCodec) and b.endian is not None and b.endian.value != "little"):
        return None
    if not hasattr(meta.chunk_grid, "chunk_shape") or tuple(meta.chunk_grid.chunk_shape)[1:] != tuple(arr.shape[1:]):
        return None  # chunks split only along rows
    return int(z.level)


def chunk_encoder(arr: zarr.Array) -> Encoder | None:
    """values -> the stored bytes of one whole chunk of `arr` (uint8), or None where zarr must encode."""
    import numcodecs

    level = zstd_level(arr)
    if level is None:
        return None
    zstd = numcodecs.Zstd(level=level, checksum=False)
    if isinstance(arr.metadata.codecs[0], VLenUTF8Codec):
        from numcodecs import VLenUTF8

        vlen = VLenUTF8()

        def encode_strings(values: np.ndarray) -> np.ndarray:
            # zarr hands the codec its string dtype; VLenUTF8 encodes each str's UTF-8 alike from an object array
            try:
                packed = vlen.encode(values)
            except TypeError:  # an id that is not a str: as zarr's string dtype holds it
                packed = vlen.encode(np.array([str(v) for v in values], dtype=object))
            return with_crc32c(zstd.encode(packed))
        return encode_strings
    dtype = arr.dtype

    def encode(values: np.ndarray) -> np.ndarray:
        if values.dtype != dtype:
            raise TypeError(f"{values.dtype} values for a {dtype} array")  # the caller checks: never reached
        return with_crc32c(zstd.encode(np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))))
    return encode


def with_crc32c(data: bytes) -> np.ndarray:
    """`data` with its CRC32C appended little-endian (zarr's crc32c codec), in one buffer built by NumPy."""
    out = np.empty(len(data) + 4, np.uint8)
    out[:-4] = np.frombuffer(data, np.uint8)
    out[-4:] = np.frombuffer(np.uint32(_crc32c(data)).astype("<u4").tobytes(), np.uint8)
    return out


def encode_chunk(values: np.ndarray, level: int) -> bytes:
    """One chunk's stored bytes: its values little-endian in C order, Zstd at `level`, CRC32C (LE) appended."""
    import numcodecs

    raw = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    return with_crc32c(numcodecs.Zstd(level=level, checksum=False).encode(raw)).tobytes()


def read_strings(arr: zarr.Array, a: int, b: int, requests: int = 16) -> np.ndarray:
    """Rows [a, b) of a 1-D string array, as zarr reads them (its dtype; a missing chunk is its fill value),
    with every chunk's vlen-utf8 item count checked against the chunk's rows before it is decoded. ValueError
    names a chunk that fails its CRC32C or holds another count. An array with a codec chain this module does
    not know is read through zarr. Chunks are fetched `requests` at once (an object store)."""
    from numcodecs import VLenUTF8, Zstd

    from .locations import crc32c_ok

    if arr.ndim != 1 or zstd_level(arr) is None or not isinstance(arr.metadata.codecs[0], VLenUTF8Codec):
        return arr[a:b]
    b = min(b, arr.shape[0])
    if b <= a:
        return np.array([], dtype=arr.dtype)
    rows = arr.chunks[0]
    ks = range(a // rows, (b - 1) // rows + 1)
    blobs = sync(_get_all(arr.store_path.store, [chunk_key(arr, k) for k in ks], requests))
    zstd, vlen, parts = Zstd(), VLenUTF8(), []
    for k, blob in zip(ks, blobs):
        if blob is None:
            parts.append(np.full(rows, arr.fill_value, dtype=object))
            continue
        data = blob.to_bytes()
        if not crc32c_ok(data):
            raise ValueError(f"chunk {k} ('{chunk_key(arr, k)}') fails its CRC32C checksum")
        packed = zstd.decode(data[:-4])
        held = int.from_bytes(bytes(packed[:4]), "little") if len(packed) >= 4 else -1
        if held != rows:
            raise ValueError(f"chunk {k} ('{chunk_key(arr, k)}') holds {held} strings, not its {rows} rows")
        parts.append(vlen.decode(packed))
    values = np.concatenate(parts)[a - ks[0] * rows:b - ks[0] * rows]
    return values.astype(arr.dtype)


async def _get_all(store: Any, keys: list[str], requests: int) -> list[Any]:
    gate = asyncio.Semaphore(requests)

    async def one(key: str) -> Any:
        async with gate:
            return await store.get(key, prototype=default_buffer_prototype())
    return await asyncio.gather(*map(one, keys))


def chunk_key(arr: zarr.Array, k: int) -> str:
    path = arr.store_path.path
    return (f"{path}/" if path else "") + arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))


def put(arr: zarr.Array, k: int, data: np.ndarray) -> None:
    """Chunk k of `arr` into its store, from the calling thread. A local store takes zarr's own file write
    (`_put`: the directory, a temporary file renamed into place), which needs no hop to zarr's event loop;
    any other store its `set`, through that loop."""
    store, key = arr.store_path.store, chunk_key(arr, k)
    buf = default_buffer_prototype().buffer.from_array_like(data)
    local = _local_put(store)
    if local is not None:
        try:
            local(store.root / key, buf)
            return
        except TypeError:  # another zarr's private signature: the store's own set below
            pass
    sync(store.set(key, buf))


def _local_put(store: Any) -> Callable[..., Any] | None:
    from zarr.storage import LocalStore

    if type(store) is not LocalStore or store.read_only:
        return None
    try:
        from zarr.storage._local import _put  # zarr 3.1: what LocalStore.set runs in its thread
    except ImportError:  # pragma: no cover - another zarr layout: take the store's own set
        return None
    return _put


@dataclass
class Pending:
    """A write under way: `done[name]` leading rows of each array are (being) written by the pool; `results()`
    waits for every chunk's job and gives what the per-chunk callback returned, in chunk order."""

    done: dict[str, int]
    jobs: list[Future]

    def results(self) -> list[Any]:
        return [j.result() for j in self.jobs]


class ChunkWriter:
    """Writes the whole chunks of the arrays it can, one pool job per chunk of rows (`workers` at once)."""

    def __init__(self, workers: int = 2):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="logitstore-chunk")
        self._encoders: dict[int, tuple[zarr.Array, Encoder | None]] = {}

    def encoder(self, arr: zarr.Array) -> Encoder | None:
        got = self._encoders.get(id(arr))
        if got is None or got[0] is not arr:
            got = self._encoders[id(arr)] = (arr, chunk_encoder(arr))
        return got[1]

    def whole_chunks(self, arr: zarr.Array, a: int, values: np.ndarray | Sequence[Any]) -> int:
        """How many leading rows of `values` (rows [a, ...) of `arr`) this writer can write: whole chunks."""
        r = arr.chunks[0]
        n = len(values) // r * r
        if self.encoder(arr) is None or a % r or n == 0 or a + n > arr.shape[0]:
            return 0
        if isinstance(values, np.ndarray) and values.dtype != object and (
                values.dtype != arr.dtype or values.shape[1:] != arr.shape[1:]):
            return 0
        return n

    def start(self, arrays: dict[str, zarr.Array], a: int, values: dict[str, Any], rows: int, chunk_rows: int,
              per_chunk: Callable[[int], Any] | None = None) -> Pending:
        """Rows [a, a + rows) of `arrays` (a on a chunk boundary), from `values` by array name: one job per
        `chunk_rows` rows writes that chunk of every array it can, then returns `per_chunk(i)` (i: the chunk
        within this write). Arrays whose chunks hold another number of rows are left to the caller."""
        done = {name: self.whole_chunks(arrays[name], a, v) if arrays[name].chunks[0] == chunk_rows else 0
                for name, v in values.items()}
        mine = [(arrays[name], values[name], n) for name, n in done.items() if n]
        k0 = a // chunk_rows

        def job(i: int) -> Any:
            lo, hi = i * chunk_rows, (i + 1) * chunk_rows
            for arr, v, n in mine:
                if hi <= n:
                    put(arr, k0 + i, self.encoder(arr)(v[lo:hi]))
            return per_chunk(i) if per_chunk is not None else None
        return Pending(done, [self._pool.submit(job, i) for i in range(-(-rows // chunk_rows))])

    def shutdown(self) -> None:
        # Wait: a job still running after an error or Ctrl-C must not put chunks once the store's lock
        # is released (a retry or --overwrite in this process would get stale bytes).
        self._pool.shutdown(wait=True, cancel_futures=True)
