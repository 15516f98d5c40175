"""A batch before and after its pixels: the rows the main process cuts from a store (`Request`), the
workers that add their pixels (`ImageSource`, over a shared decode cache), and the one DataLoader of a run.

  main process  `StoreSet.requests` (storeset.py) reads blocks in the epoch's order (order.py), one
                group ahead of training (`read_ahead`), and cuts them into `Request`s: the logits, and
                where each image is and which stored view of it to replay.
  workers       `ImageSource` turns a Request into uint8 pixels: from the decode cache, or from
                the file (digest-checked, then cached), then the stored crop and flip.

The order is fixed before any worker sees a batch and a DataLoader hands batches back in the
order its batch_sampler made them, so the samples do not depend on num_workers; and workers
never open a store, so nothing of zarr's (its event-loop thread, open files) crosses a fork.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, NamedTuple, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from logitstore.prefetch import read_ahead, stop_workers  # noqa: F401  (trainer.batches.read_ahead, as before)
from logitstore.corpus import decode_image, describe_failure, sha256_bytes
from logitstore.sources import DEFAULT_CACHE_BYTES as DEFAULT_UNIT_CACHE_BYTES, SourceReader, is_url, open_reader
from logitstore.rows import concat_rows, take_field, take_rows
from logitstore import schema
from logitstore.augment import mix_view, premix_views
from logitstore.schema import ViewSpec
from logitstore.views import EVAL, resize

from .errors import ImageError
from .inputs import InputSpec

if TYPE_CHECKING:  # annotations only: the store set hands its Requests down to this module, never back
    from .storeset import StoreSet

# What a Request carries of the teacher: full logits [n, C], or a sparse store's target arrays
# (schema names -> [n, K], with tail_lse / lse [n] already taken at the training temperature).
Targets = Union[np.ndarray, dict[str, np.ndarray]]


@dataclass
class Request:
    """Rows of one batch (or a buffer of rows): everything but the pixels."""

    keys: np.ndarray      # [n] int64: global row number (store offset + row), the decode-cache slot
    stores: np.ndarray    # [n] int32: which store (and so which image root)
    ids: np.ndarray       # [n] object str: image path relative to its root
    digests: np.ndarray   # [n, 32] uint8: sha256 of the file bytes the teacher saw (0 if embedded)
    params: np.ndarray    # [n, 5] int32: the stored view replayed (top, left, height, width, flip); 0 for eval
    logits: Targets       # [n, C] the teacher's logits for that view, as stored (float16 | float32);
                          # a sparse store's target arrays instead (see Targets)
    labels: np.ndarray    # [n] int64: class index, or NO_LABEL
    pixels: np.ndarray | None = None  # [n, ch, H, W] uint8: that view, embedded in the store
    # 1.5 augmented views (not with embedded pixels): that view's stored arrays by schema name
    # (augment_ops [n, K, 2], erase_boxes [n, 5], mix_params [n, 5], mix_lambda [n]) and, for mixing, the
    # partner's key, id, digest and own view arrays under "partner_" + name (storeset.py `_extras`).
    extras: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, index: np.ndarray | slice) -> "Request":
        return take_rows(self, index)

    @staticmethod
    def concat(parts: Sequence["Request"]) -> "Request":
        return concat_rows(parts)


class Failed(NamedTuple):
    """An error raised where it cannot propagate (a DataLoader worker, the read-ahead thread), handed to
    the consumer as a result and raised there. A worker's is a fresh exception (message only): it pickles
    without its traceback, whose frames kept the worker from exiting promptly."""

    error: BaseException


# torch has few kernels for unsigned integers (not even a comparison on uint16), so stored class
# indices and counts become the signed type that holds them before they reach the loss.
_SIGNED = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64}


def targets_tensor(targets: Targets) -> torch.Tensor | dict[str, torch.Tensor]:
    """A Request's teacher side as tensors (what `trainer.loss.objective` takes)."""
    if isinstance(targets, dict):
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=_SIGNED.get(v.dtype, v.dtype)))
                for k, v in targets.items()}
    return torch.from_numpy(np.ascontiguousarray(targets))


def targets_to(targets: torch.Tensor | dict[str, torch.Tensor], device: torch.device
               ) -> torch.Tensor | dict[str, torch.Tensor]:
    """A batch's teacher side on the training device."""
    if isinstance(targets, dict):
        return {k: v.to(device, non_blocking=True) for k, v in targets.items()}
    return targets.to(device, non_blocking=True)


# A decode-cache slot's state (one byte a row, shared by every worker).
EMPTY, CACHED, SKIPPED = 0, 1, 2


def _shared_bytes(n: int) -> torch.Tensor:
    # A shared-memory storage is visible to every DataLoader worker (fork or spawn: torch passes
    # its handle), and its pages are only allocated when first written, so reserving the whole
    # layout up front costs nothing until images are decoded into it.
    if n == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n))


def default_cache_bytes(local_world: int = 1) -> int:
    """Half of the memory available now (and of /dev/shm, which backs the cache), split over local ranks."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = avail // 2
    if os.path.isdir("/dev/shm"):
        st = os.statvfs("/dev/shm")
        limit = min(limit, int(st.f_bavail * st.f_frsize * 0.9))
    return max(0, limit // max(1, local_world))


class DecodeCache:
    """uint8 pixels of the decoded originals, in one shared buffer laid out from the stored sizes.

    Decoded once per run (by whichever worker meets an image first), read by every worker in
    every later epoch. If the corpus does not fit the budget, the first images (in key order)
    that do are cached and the rest are decoded each time.

    `shapes` ([k, 3] C, H, W) covers only those first k rows, so the layout costs 20 bytes per
    cached image, bounded by the budget. The state (EMPTY | CACHED | SKIPPED) is one byte for
    every row: a skipped image must stay skipped wherever it is, and fit.py unites the ranks'
    skips row by row.
    """

    def __init__(self, shapes: np.ndarray, n_rows: int, needed: int):
        sizes = shapes.astype(np.int64).prod(axis=1)
        ends = np.cumsum(sizes)
        self.shapes, self.starts = shapes, ends - sizes
        self.n_rows, self.n_cacheable, self.needed = n_rows, len(shapes), needed
        self.nbytes = int(ends[-1]) if len(ends) else 0
        self.pixels = _shared_bytes(self.nbytes)
        self.state = _shared_bytes(n_rows).zero_()

    def __getstate__(self) -> dict[str, Any]:
        # The shared tensors travel by handle; a NumPy view would be pickled as a copy.
        return {k: v for k, v in self.__dict__.items() if k != "_flags"}

    @property
    def flags(self) -> np.ndarray:
        # NumPy indexing of one element is ~10x cheaper than a tensor's, and this runs per image.
        if "_flags" not in self.__dict__:
            self._flags = self.state.numpy()
        return self._flags

    def get(self, key: int) -> torch.Tensor | None:
        if key >= self.n_cacheable or self.flags[key] != CACHED:
            return None
        a = int(self.starts[key])
        c, h, w = self.shapes[key].tolist()
        return self.pixels[a:a + c * h * w].view(c, h, w)

    def put(self, key: int, img: torch.Tensor) -> None:
        if key < self.n_cacheable and list(img.shape) == self.shapes[key].tolist():
            a = int(self.starts[key])
            self.pixels[a:a + img.numel()].copy_(img.reshape(-1))
            self.flags[key] = CACHED  # set after the pixels: a reader never sees half an image

    def skip(self, key: int) -> None:
        self.flags[key] = SKIPPED

    def is_skipped(self, key: int) -> bool:
        return bool(self.flags[key] == SKIPPED)

    @property
    def n_skipped(self) -> int:
        return int((self.flags == SKIPPED).sum())

    @property
    def n_cached(self) -> int:
        return int((self.flags == CACHED).sum())


def _remove_folder(folder: str, owner: int) -> None:
    if os.getpid() == owner:  # not from a worker that inherited the finalizer
        shutil.rmtree(folder, ignore_errors=True)


class ImageSource(Dataset):
    """Worker side: a Request in, its pixels (and its logits, labels, keys) out.

    Holds no store, only image roots and the shared cache, so it pickles cheaply to spawned workers.
    """

    def __init__(self, roots: Sequence[Path | str | None], locations: Sequence[str], spec: InputSpec, kind: str,
                 cache: DecodeCache, skip_mismatched: bool = False,
                 sources: Sequence[dict[str, Any] | None] | None = None,
                 storage_options: dict[str, Any] | None = None, unit_cache_bytes: int = DEFAULT_UNIT_CACHE_BYTES,
                 views: ViewSpec | None = None):
        self.views = views  # the stores' view policy: what a 1.5 augmented view replays
        self.roots = [None if r is None else r if is_url(str(r)) else Path(r) for r in roots]
        self.locations = list(locations)
        self.spec, self.kind, self.cache, self.skip_mismatched = spec, kind, cache, skip_mismatched
        self._uniform: bool | None = None
        # Corpora that are not loose local files (shards, tables, object storage; logitstore/sources.py):
        # each process opens its own readers, and remote units go to one bounded folder they all share.
        self.sources = list(sources) if sources is not None else [None] * len(self.roots)
        self.storage_options = dict(storage_options or {})
        self.unit_cache_bytes = unit_cache_bytes
        remote = any(r is not None and is_url(str(r)) for r in self.roots)
        self.unit_dir = tempfile.mkdtemp(prefix="trainer-units-") if remote else None
        if self.unit_dir is not None:
            weakref.finalize(self, _remove_folder, self.unit_dir, os.getpid())
        self._readers: dict[int, SourceReader] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_readers": {}}

    def _reader(self, store: int) -> SourceReader | None:
        """None for loose local files (read directly, as always)."""
        root = self.roots[store]
        if self.sources[store] is None and not is_url(str(root)):
            return None
        if store not in self._readers:
            self._readers[store] = open_reader(str(root), self.sources[store], self.storage_options,
                                               self.unit_cache_bytes, self.unit_dir)
        return self._readers[store]

    def _prefetch(self, req: Request) -> dict[int, bytes | BaseException]:
        """The bytes of a batch's uncached images on object storage, fetched concurrently (row -> bytes)."""
        out: dict[int, bytes | BaseException] = {}
        for store in np.unique(req.stores):
            root = self.roots[int(store)]
            if root is None or not is_url(str(root)):
                continue
            rows = [i for i in np.flatnonzero(req.stores == store)
                    if self.cache.get(int(req.keys[i])) is None and not self.cache.is_skipped(int(req.keys[i]))]
            got = self._reader(int(store)).read_many([str(req.ids[i]) for i in rows])
            out.update(zip((int(i) for i in rows), got))
        return out

    def __len__(self) -> int:
        return self.cache.n_rows

    def __getitem__(self, index: int) -> Any:
        raise TypeError("ImageSource is read a batch at a time (it takes Requests)")

    def _original(self, key: int, store: int, image_id: str, digest: np.ndarray,
                  fetched: bytes | BaseException | None = None) -> torch.Tensor:
        img = self.cache.get(key)
        if img is not None:
            return img
        reader = self._reader(store)
        path = self.roots[store] / image_id if reader is None else f"{self.roots[store]}/{image_id}"
        try:
            if isinstance(fetched, BaseException):
                raise fetched
            data = fetched if fetched is not None else path.read_bytes() if reader is None else reader.read(image_id)
        except Exception as exc:
            if not isinstance(exc, OSError) and reader is None:
                raise
            raise ImageError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc}); it is listed in "
                             f"{self.locations[store]}. Restore it, or pass --skip-mismatched to leave it out") from None
        # The digest is checked on the bytes actually decoded, so an image edited after the dump
        # can never be trained against another image's logits.
        if sha256_bytes(data) != digest.tobytes():
            raise ImageError(f"{path}: the file differs from the one the teacher saw (its sha256 does not match "
                             f"the digest in {self.locations[store]}); restore it, re-run the dump, or pass "
                             "--skip-mismatched to leave such images out")
        try:
            img = decode_image(data, self.spec.pre.mode)
        except Exception as exc:  # the same bytes decoded for the teacher; failing now means a broken PIL
            raise ImageError(f"{path}: cannot decode it ({describe_failure(exc)})") from None
        self.cache.put(key, img)
        return img

    def _identity_gather(self, keys: np.ndarray) -> torch.Tensor | None:
        """Fast path for small same-sized images (MNIST, CIFAR) under the eval view at the teacher's own
        size: the view is the identity, so a batch is one gather from the cache instead of a Python loop
        over images (which costs as much as a small student's step)."""
        if self._uniform is None:
            pre, c = self.spec.pre, self.spec.pre.channels
            shapes = self.cache.shapes
            self._uniform = bool(
                self.kind == EVAL and pre.resize is None and tuple(self.spec.size) == tuple(pre.size)
                and len(shapes) == self.cache.n_rows and len(shapes)
                and (shapes == np.array([c, *pre.size], np.int32)).all())
        if not self._uniform or not (self.cache.flags[keys] == CACHED).all():
            return None
        c, (h, w) = self.spec.pre.channels, self.spec.pre.size
        # index_select, not x[keys]: the same gather, ~10x cheaper per batch than advanced indexing.
        return self.cache.pixels.view(-1, c, h, w).index_select(0, torch.from_numpy(keys))

    def __getitems__(self, req: Request) -> dict[str, Any] | Failed:
        if req.pixels is not None:  # embedded in the store: the view as the teacher saw it
            pixels = torch.from_numpy(req.pixels)
            if tuple(self.spec.size) != tuple(self.spec.pre.size):
                pixels = resize(pixels, list(self.spec.size), self.spec.pre)
            return {"pixels": pixels, "logits": targets_tensor(req.logits),
                    "labels": torch.from_numpy(req.labels), "keys": torch.from_numpy(req.keys)}
        if req.extras is not None:
            return self._augmented(req)
        fast = self._identity_gather(req.keys)
        if fast is not None:
            return {"pixels": fast, "logits": targets_tensor(req.logits),
                    "labels": torch.from_numpy(req.labels), "keys": torch.from_numpy(req.keys)}
        keep, originals = [], []
        fetched = self._prefetch(req)
        for i in range(len(req)):
            key = int(req.keys[i])
            if self.cache.is_skipped(key):
                continue
            try:
                img = self._original(key, int(req.stores[i]), str(req.ids[i]), req.digests[i], fetched.get(i))
            except ImageError as exc:
                if not self.skip_mismatched:
                    # Returned, not raised: the DataLoader would wrap it in a worker traceback.
                    return Failed(ImageError(str(exc)))
                self.cache.skip(key)
                continue
            originals.append(img)
            keep.append(i)
        c, (h, w) = self.spec.pre.channels, self.spec.size
        sel = np.asarray(keep, np.int64)
        pixels = (self.spec.views(originals, req.params[sel], self.kind) if originals
                  else torch.zeros(0, c, h, w, dtype=torch.uint8))
        return {"pixels": pixels, "logits": targets_tensor(take_field(req.logits, sel)),
                "labels": torch.from_numpy(req.labels[sel]), "keys": torch.from_numpy(req.keys[sel])}


    def _augmented(self, req: Request) -> dict[str, Any] | Failed:
        """A 1.5 store's views: each original's stored crop, flip, ops and erasing, mixed with its partner's
        pre-mix view of the same index, with the dump's own functions (logitstore/augment.py); then the
        student's size. A row whose image or partner's image cannot be had is left out (--skip-mismatched)."""
        ex, spec = req.extras, self.views
        mixed = ex[schema.MIX_PARAMS][:, 0] != 0 if schema.MIX_PARAMS in ex else np.zeros(len(req), bool)
        fetched = self._prefetch(req)
        keep, originals, partners = [], [], []
        for i in range(len(req)):
            key = int(req.keys[i])
            pkey = int(ex["partner_keys"][i]) if mixed[i] else key
            if self.cache.is_skipped(key) or self.cache.is_skipped(pkey):
                continue
            failing = key
            try:
                img = self._original(key, int(req.stores[i]), str(req.ids[i]), req.digests[i], fetched.get(i))
                failing = pkey
                partner = (self._original(pkey, int(req.stores[i]), str(ex["partner_ids"][i]),
                                          ex["partner_digests"][i]) if mixed[i] else None)
            except ImageError as exc:
                if not self.skip_mismatched:
                    return Failed(ImageError(str(exc)))
                self.cache.skip(failing)
                continue
            keep.append(i)
            originals.append(img)
            partners.append(partner)
        sel = np.asarray(keep, np.int64)
        pre, (h, w) = self.spec.pre, self.spec.size
        if not keep:
            return {"pixels": torch.zeros(0, pre.channels, h, w, dtype=torch.uint8),
                    "logits": targets_tensor(take_field(req.logits, sel)),
                    "labels": torch.from_numpy(req.labels[sel]), "keys": torch.from_numpy(req.keys[sel])}
        get = lambda name, prefix="": None if prefix + name not in ex else ex[prefix + name][sel]  # noqa: E731
        pixels = premix_views(originals, req.params[sel], get(schema.AUGMENT_OPS), get(schema.ERASE_BOXES), pre, spec)
        pm = [j for j, p in enumerate(partners) if p is not None]
        if pm:
            psel = sel[pm]
            pviews = premix_views([partners[j] for j in pm], ex["partner_params"][psel],
                                  None if "partner_" + schema.AUGMENT_OPS not in ex else ex["partner_" + schema.AUGMENT_OPS][psel],
                                  None if "partner_" + schema.ERASE_BOXES not in ex else ex["partner_" + schema.ERASE_BOXES][psel],
                                  pre, spec)
            mix, lam = ex[schema.MIX_PARAMS][psel], ex[schema.MIX_LAMBDA][psel]
            for k, j in enumerate(pm):
                pixels[j] = mix_view(pixels[j], pviews[k], float(lam[k]), mix[k, 1:])
        if tuple(self.spec.size) != tuple(pre.size):  # the student's size: the teacher's input, resized
            pixels = resize(pixels, list(self.spec.size), pre)
        return {"pixels": pixels, "logits": targets_tensor(take_field(req.logits, sel)),
                "labels": torch.from_numpy(req.labels[sel]), "keys": torch.from_numpy(req.keys[sel])}


def _as_is(batch: Any) -> Any:
    return batch


class _CurrentPass:
    """The DataLoader's batch_sampler: yields the Requests of whichever pass is running."""

    def __init__(self) -> None:
        self.requests: Iterable[Request] = ()

    def __iter__(self) -> Iterator[Request]:
        return iter(self.requests)


class Batches:
    """One DataLoader for every pass of a run (training epochs and held-out passes), so its worker
    processes persist and each pass reuses what they decoded into the shared cache.

    A pass runs in this process, without the DataLoader, when there are no workers, and also once the
    first pass is done if `in_process_when_warm`: the run found (fit.py `choose_workers`) that after the
    decode cache is filled a batch's work is too small a share of a student step to pay for handing it
    over from another process. Either way a pass yields the same batches in the same order.
    """

    def __init__(self, source: ImageSource, num_workers: int = 0, pin_memory: bool = False,
                 in_process_when_warm: bool = False):
        self.source, self.num_workers, self.pin_memory = source, num_workers, pin_memory
        self.in_process_when_warm = in_process_when_warm
        self.passes_done = 0
        self._pass = _CurrentPass()
        self._loader: DataLoader | None = None

    @property
    def loader(self) -> DataLoader:
        # Made on first use, so a run can settle its worker count after measuring (fit.py).
        if self._loader is None:
            self._loader = DataLoader(self.source, batch_sampler=self._pass, num_workers=self.num_workers,
                                      collate_fn=_as_is, pin_memory=self.pin_memory,
                                      persistent_workers=self.num_workers > 0,
                                      prefetch_factor=4 if self.num_workers > 0 else None)
        return self._loader

    def close(self) -> None:
        """Stop the loader's persistent workers now, from this thread (`prefetch.stop_workers`)."""
        stop_workers(getattr(self._loader, "_iterator", None))

    def in_process(self) -> bool:
        """Whether the next pass runs in this process."""
        return self.num_workers == 0 or (self.in_process_when_warm and self.passes_done > 0)

    def __call__(self, requests: Iterable[Request]) -> Iterator[dict[str, Any]]:
        """The batches of one pass over `requests`: {"pixels", "logits", "labels", "keys"} tensors."""
        if self.in_process():
            yield from self._here(requests)
            self.passes_done += 1
            return
        self._pass.requests = requests
        failed = None
        for batch in self.loader:
            if isinstance(batch, Failed):
                failed = batch
                break  # raised outside the loop, once the loader's iterator is no longer running
            yield batch
        if failed is not None:
            raise failed.error
        self.passes_done += 1

    def _here(self, requests: Iterable[Request]) -> Iterator[dict[str, Any]]:
        for req in requests:
            batch = self.source.__getitems__(req)
            if isinstance(batch, Failed):
                raise batch.error
            # Page-locked, as the DataLoader's pin_memory would: the loop's copies to the GPU are then
            # asynchronous (non_blocking), and torch's host allocator keeps each buffer until its copy is done.
            yield _pinned(batch) if self.pin_memory else batch


def _pinned(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: _pinned(v) for k, v in batch.items()}
    return batch


def time_source(source: ImageSource, requests: Iterable[Request], k: int = 2) -> tuple[float, float]:
    """Seconds per batch that `source` takes in this process on the first `k` of `requests`: cold (their
    images decoded, and so cached for the run) and then warm (the same batches again, from the cache).

    What fit.py weighs against a student step to choose its workers. A batch that fails (a missing image)
    is not timed here: the pass itself reports it."""
    reqs = []
    for req in requests:
        reqs.append(req)
        if len(reqs) == k:
            break
    if not reqs:
        return 0.0, 0.0
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        for req in reqs:
            source.__getitems__(req)
        times.append((time.perf_counter() - t0) / len(reqs))
    return times[0], times[1]


def make_batches(data: "StoreSet", spec: InputSpec, cache_bytes: int, num_workers: int = 0,
                 skip_mismatched: bool = False, pin_memory: bool = False,
                 in_process_when_warm: bool = False) -> Batches:
    """The pipeline of one run: a decode cache laid out for `data`, and the DataLoader that fills it.

    Stores that embed their pixels decode nothing, so their cache is empty (and nothing is read for it).
    """
    if data.embedded:
        shapes, needed = np.zeros((0, 3), np.int32), 0
    else:
        shapes, needed = data.image_shapes(cache_bytes)
    cache = DecodeCache(shapes, len(data), needed)
    source = ImageSource(data.roots, [str(s.location) for s in data.stores], spec, data.view_kind, cache,
                         skip_mismatched, [s.meta.corpus.source for s in data.stores],
                         data.image_storage_options, views=data.views)
    return Batches(source, num_workers, pin_memory, in_process_when_warm)
