"""Stream stores for training: block-shuffled reads, view replay, a decode cache, DDP shares.

Where a batch comes from (on each rank):

  main process  `StoreSet.requests(epoch, ...)` decides the order from (seed, epoch) alone: a
                permutation of every training block of every store (a block is a chunk, or a run
                of consecutive chunks when chunks are small, so each read stays large), this
                rank's contiguous share of it, then a shuffle within each group of
                `shuffle_blocks` consecutive blocks. Blocks are read whole, in that order, one
                group ahead of training (`read_ahead`), and cut into `Request`s: the logits, and
                where each image is and which stored view of it to replay.
  workers       `ImageSource` turns a Request into uint8 pixels: from the decode cache, or from
                the file (digest-checked, then cached), then the stored crop and flip.

The order is fixed before any worker sees a batch and a DataLoader hands batches back in the
order its batch_sampler made them, so the samples do not depend on num_workers; and workers
never open a store, so nothing of zarr's (its event-loop thread, open files) crosses a fork.
"""
from __future__ import annotations

import json
import math
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from logitstore.corpus import decode_image, describe_failure, sha256_bytes
from logitstore import schema
from logitstore.schema import Preprocess
from logitstore.store import LogitStore, open_store
from logitstore.views import EVAL, apply_view, normalize, resize

from .errors import ClassMismatchError, ConfigError, ImageError, StoreMismatchError
from .loss import NO_LABEL, ensemble_logits

# What a Request carries of the teacher: full logits [n, C], or a sparse store's target arrays
# (schema names -> [n, K], with tail_lse / lse [n] already taken at the training temperature).
Targets = Union[np.ndarray, dict[str, np.ndarray]]

# A block (the unit of the shuffle, of the DDP shares and of a read) is at least this many rows:
# one chunk of a 10-class store (8192 rows) or of a 1000-class one (2048 rows). Each read costs
# ~0.5 ms per array on top of decoding, whatever its size (more on an object store), so a read of
# 512 rows cost 8% of a LeNet epoch on MNIST in benchmarks/fit_throughput.py; 2048 rows keep it
# under 1 us a sample, and a buffer of 8 blocks of 1000-class float16 logits under 40 MiB.
MIN_BLOCK_ROWS = 2048

# Distinct SeedSequence tags so the chunk order, the in-group shuffle and the view choice never
# draw from the same stream even when their other words coincide.
_TAG_ORDER, _TAG_GROUP, _TAG_VIEW = 0x0D, 0x5B, 0x71


# --------------------------------------------------------------------------------------------
# How stored pixels become the student's input
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """The teacher's recorded preprocessing, with the student's own final size and channel count."""

    pre: Preprocess
    size: tuple[int, int]
    channels: int

    def view(self, img: torch.Tensor, params: np.ndarray | None, kind: str) -> torch.Tensor:
        """uint8 original -> uint8 view: the teacher's exact crop and flip; only the final resize differs."""
        out = None if tuple(self.size) == tuple(self.pre.size) else self.size
        return apply_view(img, params, self.pre, kind, out)

    def to_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] (already on the device) -> normalised float32 student input."""
        x = normalize(pixels, self.pre)
        if self.channels != self.pre.channels:  # grey -> RGB: what PIL's convert("RGB") would give
            x = x.expand(-1, self.channels, -1, -1).contiguous()
        return x

    def student_preprocess(self) -> dict[str, Any]:
        """The preprocessing to record in a student checkpoint, so it can be a teacher in turn."""
        d = self.pre.to_dict()
        if tuple(self.size) != tuple(self.pre.size):
            d["size"] = list(self.size)
            if self.pre.resize is not None:  # keep the teacher's crop fraction at the new size
                d["resize"] = int(round(self.pre.resize * self.size[0] / self.pre.size[0]))
        if self.channels != self.pre.channels:
            d["mode"] = "RGB"
        return d


def make_input_spec(pre: Preprocess, input_size: tuple[int, int] | None, in_channels: int) -> InputSpec:
    if in_channels not in (pre.channels, 3) or (in_channels != pre.channels and pre.mode != "L"):
        raise ConfigError(f"--in-channels {in_channels}: the store's images are {pre.mode} ({pre.channels} "
                          "channel(s)); a student can take them as they are, or greyscale as 3-channel RGB")
    size = tuple(input_size) if input_size else tuple(pre.size)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"--input-size {input_size}: expected two positive integers H,W")
    return InputSpec(pre, (int(size[0]), int(size[1])), in_channels)


# --------------------------------------------------------------------------------------------
# Requests: what a batch holds before its pixels are loaded
# --------------------------------------------------------------------------------------------
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

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, index: np.ndarray | slice) -> "Request":
        return Request(self.keys[index], self.stores[index], self.ids[index], self.digests[index],
                       self.params[index], take_targets(self.logits, index), self.labels[index],
                       None if self.pixels is None else self.pixels[index])

    @staticmethod
    def concat(parts: Sequence["Request"]) -> "Request":
        if len(parts) == 1:
            return parts[0]
        pixels = None if parts[0].pixels is None else np.concatenate([p.pixels for p in parts])
        keys, stores, ids, digests, params = (np.concatenate([getattr(p, f) for p in parts]) for f in
                                              ("keys", "stores", "ids", "digests", "params"))
        targets = parts[0].logits
        logits = ({k: np.concatenate([p.logits[k] for p in parts]) for k in targets} if isinstance(targets, dict)
                  else np.concatenate([p.logits for p in parts]))
        return Request(keys, stores, ids, digests, params, logits, np.concatenate([p.labels for p in parts]), pixels)


def take_targets(targets: Targets, index: np.ndarray | slice) -> Targets:
    return {k: v[index] for k, v in targets.items()} if isinstance(targets, dict) else targets[index]


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
    if isinstance(targets, dict):
        return {k: v.to(device, non_blocking=True) for k, v in targets.items()}
    return targets.to(device, non_blocking=True)


class Segment(NamedTuple):
    """Rows [start, stop) of one store, inside one block (so a read is whole chunks, consecutive)."""

    store: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def epoch_share(blocks: Sequence[Segment], seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[Segment]:
    """This rank's segments for an epoch: the blocks in a (seed, epoch) permutation, cut into `world`
    contiguous, equal shares of rows (the last total % world rows of the permutation sit out)."""
    order = np.random.default_rng([seed, epoch, _TAG_ORDER]).permutation(len(blocks))
    total = sum(b.rows for b in blocks)
    per_rank = total // world
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    share, pos = [], 0
    for i in order:
        b = blocks[i]
        a, z = max(lo, pos), min(hi, pos + b.rows)
        if a < z:
            share.append(Segment(b.store, b.start + a - pos, b.start + z - pos))
        pos += b.rows
        if pos >= hi:
            break
    return share


def batches_per_epoch(rows: int, batch_size: int) -> int:
    """Full batches plus the last partial one, unless that would be a single row (BatchNorm refuses it)."""
    return rows // batch_size + (1 if rows % batch_size > 1 else 0)


# --------------------------------------------------------------------------------------------
# Labels (optional: a store has none; --alpha uses them where they exist)
# --------------------------------------------------------------------------------------------
def read_labels_file(path: str | os.PathLike, classes: Sequence[str]) -> dict[str, int]:
    """A JSON object {id: class} or a CSV file of `id,class` lines; class is a name or an index."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--labels {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--labels {path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 "
                          "JSON or CSV") from None
    if p.suffix.lower() == ".json":
        try:
            pairs = list(json.loads(text).items())
        except (json.JSONDecodeError, AttributeError):
            raise ConfigError(f"--labels {path}: expected a JSON object {{image id: class}}") from None
    else:
        pairs = [tuple(x.strip() for x in ln.rsplit(",", 1)) for ln in text.splitlines() if ln.strip()]
        if pairs and pairs[0] == ("id", "class"):
            pairs = pairs[1:]
        if any(len(pr) != 2 for pr in pairs):
            raise ConfigError(f"--labels {path}: every line must be 'image id,class'")
    index = {c: i for i, c in enumerate(classes)}
    out, unknown = {}, []
    for image_id, cls in pairs:
        cls = str(cls)
        if cls in index:
            out[str(image_id)] = index[cls]
        elif cls.isdigit() and int(cls) < len(classes):
            out[str(image_id)] = int(cls)
        else:
            unknown.append(cls)
    if unknown:
        raise ClassMismatchError(f"--labels {path} names {len(unknown)} label(s) that are not classes of the "
                                 f"store, e.g. {sorted(set(unknown))[:5]}; the store's classes are "
                                 f"{list(classes)[:10]}{' ...' if len(classes) > 10 else ''}")
    return out


def folder_labels(ids: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Label = the image's parent folder name where that names a class (ImageNet-style layouts)."""
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(i.rsplit("/", 2)[-2] if "/" in i else "", NO_LABEL) for i in ids], np.int64)


# --------------------------------------------------------------------------------------------
# The stores, read as one dataset
# --------------------------------------------------------------------------------------------
def _check_compatible(stores: Sequence[LogitStore]) -> None:
    first = stores[0]
    for other in stores[1:]:
        a, b = first.meta, other.meta
        checks = [("classes", list(a.classes), list(b.classes)),
                  ("preprocessing", a.preprocess.to_dict(), b.preprocess.to_dict()),
                  ("views", a.views.to_dict(), b.views.to_dict()),
                  ("teacher targets", a.targets.to_dict(), b.targets.to_dict()),
                  ("teacher", f"{a.teacher.arch} sha256={a.teacher.sha256[:12]}",
                   f"{b.teacher.arch} sha256={b.teacher.sha256[:12]}")]
        for what, x, y in checks:
            if x != y:
                if isinstance(x, dict):
                    keys = [k for k in x if x.get(k) != y.get(k)]
                    x, y = {k: x[k] for k in keys}, {k: y.get(k) for k in keys}
                elif isinstance(x, list) and len(x) == len(y):
                    i = next(i for i in range(len(x)) if x[i] != y[i])
                    x, y = f"class {i} = {x[i]!r}", f"class {i} = {y[i]!r}"
                elif isinstance(x, list):
                    x, y = f"{len(x)} classes", f"{len(y)} classes"
                raise StoreMismatchError(f"stores {first.location} and {other.location} cannot be read as one "
                                         f"dataset: their {what} differ ({x} vs {y})")


@dataclass(frozen=True)
class Ensemble:
    """Distil from several teachers of a store: their softmaxes at `temperature`, weighted."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    temperature: float

    def combine(self, store: LogitStore, a: int, b: int) -> np.ndarray:
        """[b - a, V, C] float32 logits whose softmax at T is the weighted mean of the teachers'."""
        stack = np.stack([store.teacher_logits(n, a, b) for n in self.names], axis=2)  # [n, V, K, C]
        n, v, k, c = stack.shape
        return ensemble_logits(stack.reshape(n * v, k, c), np.array(self.weights), self.temperature).reshape(n, v, c)


def make_ensemble(stores: Sequence[LogitStore], teachers: Sequence[str] | None,
                  weights: Sequence[float] | None, temperature: float) -> Ensemble | None:
    if not teachers:
        if weights:
            raise ConfigError("--teacher-weights needs --teachers")
        return None
    names = tuple(teachers)
    sparse = next((s for s in stores if s.meta.sparse), None)
    if sparse is not None:
        raise ConfigError(f"--teachers: {sparse.location} keeps {sparse.meta.targets.kind} targets of one teacher; "
                          "ensembles mix full logits (dump without --topk/--sample, then --add-teacher)")
    for store in stores:
        missing = [n for n in names if n not in store.teacher_names]
        if missing:
            raise StoreMismatchError(f"{store.location} has no teacher {missing[0]!r}; its teachers are "
                                     f"{', '.join(store.teacher_names)} (add one with `logitstore dump --add-teacher`)")
    # A name is only a label: the stores must mean the same network by it (same weights file).
    for name in names:
        if name == schema.PRIMARY_TEACHER:
            continue  # the primary teachers already agree (_check_compatible)
        seen = {}
        for store in stores:
            info = next(t.teacher for t in store.meta.extra_teachers if t.name == name)
            seen.setdefault((info.arch, info.sha256), store.location)
        if len(seen) > 1:
            (a, la), (b, lb) = list(seen.items())[:2]
            raise StoreMismatchError(f"teacher {name!r} is not the same network in {la} ({a[0]} sha256={a[1][:12]}) "
                                     f"and {lb} ({b[0]} sha256={b[1][:12]}); add the same teacher to every store")
    w = list(weights) if weights else [1.0] * len(names)
    if len(w) != len(names) or any(x <= 0 for x in w):
        raise ConfigError(f"--teacher-weights {w}: one positive weight per teacher of --teachers {list(names)}")
    total = sum(w)
    return Ensemble(names, tuple(x / total for x in w), temperature)


def sparse_temperature_index(store: LogitStore, temperature: float) -> int:
    """Which stored temperature a sparse store's tail_lse / lse column serves: the training T itself.

    A top-K store's tail mass and a sampled store's normaliser are exact only at the temperatures
    they were dumped for (docs/FORMAT.md, "Sparse targets"), so any other T is refused.
    """
    t = store.meta.targets
    for r, stored in enumerate(t.temperatures):
        if math.isclose(stored, temperature, rel_tol=1e-9):
            return r
    what = f"top-{t.k} targets" if t.kind == schema.TARGET_TOPK else f"{t.k} sampled classes"
    raise ConfigError(f"--temperature {temperature:g}: {store.location} keeps {what} for T = "
                      f"{', '.join(f'{x:g}' for x in t.temperatures)} only; distil at one of those, or dump again "
                      "with --temperatures that include it (or full logits, which serve any T)")


# A held-out pass scores the tails of at most max(this many, this share of) the blocks, evenly
# spaced: at 5 million 1000-class rows every tail would mean decoding all 2,442 chunks (10 GB) per
# pass to score 2% of the rows; 245 blocks decode a tenth of that and still score ~10,000 rows.
HELD_OUT_PASS_BLOCKS = 64
HELD_OUT_PASS_SHARE = 0.1


def spread(items: Sequence[Any], k: int) -> list[Any]:
    """At most k of `items`, evenly spaced, in order (all of them if there are no more than k)."""
    n = len(items)
    if n <= k:
        return list(items)
    return [items[(i * n) // k] for i in range(k)]


# Blocks of one shuffle group read at once (benchmarks/scale.py: see RESULTS.md, "Millions of rows").
READ_THREADS = 4

# Embedded pixels travel with the rows they belong to; a shuffle group holds at most this many bytes of them.
PIXEL_GROUP_BYTES = 1 << 30

# Rows per read when one small array is scanned from end to end (image sizes for the decode cache,
# ids to count labels): 64 chunks of 1000-class rows, 8 of 10-class ones; zarr decodes a read's
# chunks concurrently, and at 2-8 bytes a row of image_hw a read is still well under 1 MiB.
SCAN_ROWS = 1 << 15


class HeldOut:
    """The held-out rows scored on each pass (block tails, see StoreSet), kept as segments and read
    again on each pass.

    Not kept in RAM: 2% of 5 million 1000-class float16 rows is 200 MB of logits; re-reading costs
    one chunk per scored tail per pass (benchmarks/scale.py).
    """

    def __init__(self, segments: Sequence[Segment], offsets: np.ndarray):
        self.segments, self._offsets = list(segments), offsets

    def __len__(self) -> int:
        return sum(seg.rows for seg in self.segments)

    @property
    def keys(self) -> np.ndarray:
        return np.concatenate([self._offsets[seg.store] + np.arange(seg.start, seg.stop, dtype=np.int64)
                               for seg in self.segments])


class _Passes:
    """A re-iterable: each iteration is a new pass over what `make()` yields (the DataLoader iterates
    its batch_sampler once per pass)."""

    def __init__(self, make: Any):
        self._make = make

    def __iter__(self) -> Iterator[Request]:
        return iter(self._make())


class StoreSet:
    """One or more stores of the same teacher read as one dataset, with a held-out slice.

    A root of None means the store's embedded pixels are used instead of its corpus.

    Nothing here grows with the number of rows: opening reads no array (blocks and held-out rows
    follow from the row counts), labels are looked up from each read's ids, and the held-out rows
    are read on each pass. benchmarks/scale.py measures it at millions of rows.
    """

    def __init__(self, stores: Sequence[LogitStore], roots: Sequence[Path | None], holdout: float = 0.02,
                 labels: dict[str, int] | None = None, labels_from_folders: bool = False,
                 min_block_rows: int = MIN_BLOCK_ROWS, ensemble: Ensemble | None = None,
                 temperature: float = 4.0):
        _check_compatible(stores)
        if not 0 <= holdout < 1:
            raise ConfigError(f"--holdout {holdout}: must be a fraction in [0, 1)")
        self.stores, self.roots = list(stores), [None if r is None else Path(r) for r in roots]
        self.embedded = all(r is None for r in self.roots)
        self.ensemble = ensemble
        meta = self.stores[0].meta
        self.classes, self.pre = list(meta.classes), meta.preprocess
        self.view_kind, self.view_count = meta.views.kind, meta.views.count
        # Sparse stores: the column of tail_lse / lse at the training temperature, in every store
        # (their targets agree, so one index serves all).
        self.temperature_index = sparse_temperature_index(self.stores[0], temperature) if meta.sparse else None
        self.offsets = np.cumsum([0] + [len(s) for s in self.stores]).astype(np.int64)
        if int(self.offsets[-1]) == 0:
            raise StoreMismatchError(f"{self.stores[0].location}: the store holds no images")
        self.label_map = labels
        self.labels_from_folders = labels_from_folders and labels is None
        self.block_rows = [s.chunk_rows * max(1, -(-min_block_rows // s.chunk_rows)) for s in self.stores]
        # Each block's tail is held out of training: tails spread the held-out slice over the whole
        # listing, so a class-sorted corpus still trains on every class (a whole held-out block
        # could swallow whole classes). A tail costs decoding its whole chunk on every held-out
        # pass, so a large store is scored on the tails of evenly spaced blocks only (HeldOut).
        self.train_blocks: list[Segment] = []
        held: list[Segment] = []
        for s in range(len(self.stores)):
            for k in range(self._n_blocks(s)):
                a, b = self._block_bounds(s, k)
                tail = math.ceil(holdout * (b - a)) if holdout > 0 else 0
                if b - tail > a:
                    self.train_blocks.append(Segment(s, a, b - tail))
                if tail:
                    held.append(Segment(s, b - tail, b))
        self.n_held_out = sum(seg.rows for seg in held)
        self.holdout = HeldOut(spread(held, max(HELD_OUT_PASS_BLOCKS, math.ceil(len(held) * HELD_OUT_PASS_SHARE))),
                               self.offsets) if held else None
        self.n_train = sum(b.rows for b in self.train_blocks)
        if self.n_train == 0:
            raise ConfigError(f"--holdout {holdout} leaves no images to train on")
        self._n_labeled: int | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _n_blocks(self, s: int) -> int:
        return -(-len(self.stores[s]) // self.block_rows[s])

    def _block_bounds(self, s: int, k: int) -> tuple[int, int]:
        a = k * self.block_rows[s]
        return a, min(len(self.stores[s]), a + self.block_rows[s])

    @property
    def n_labeled(self) -> int:
        """Rows with a hard label. Reads every id once, on the first call (only --alpha asks)."""
        if self._n_labeled is None:
            if self.label_map is None and not self.labels_from_folders:
                self._n_labeled = 0
            else:
                self._n_labeled = sum(int((self._labels(ids) != NO_LABEL).sum()) for ids in self._scan(schema.IDS))
        return self._n_labeled

    def _labels(self, ids: np.ndarray) -> np.ndarray:
        """[n] int64 class index of each id (NO_LABEL where it has none), from the labels file or the
        parent folder: looked up per read, so no per-row label array is held."""
        if self.label_map is not None:
            m = self.label_map
            return np.fromiter((m.get(str(i), NO_LABEL) for i in ids), np.int64, len(ids))
        if self.labels_from_folders:
            return folder_labels(ids, self.classes)
        return np.full(len(ids), NO_LABEL, np.int64)

    def rows_per_rank(self, world: int) -> int:
        return self.n_train // world

    def fingerprints(self) -> list[dict[str, Any]]:
        """What a resumed run must find again: each store's identity (teacher, corpus, contents), in order."""
        return [{"location": str(s.location), "rows": len(s),
                 **(dict(getattr(s.meta, "fingerprints", None) or {}) or s.meta.run_fingerprint())}
                for s in self.stores]

    def _array(self, s: int, name: str, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of one array of store s. A LogitStore reads that array alone, and a failed
        checksum raises IntegrityError naming the array and chunk; any other reader (an in-memory
        stand-in) is read whole-row."""
        store = self.stores[s]
        read_array = getattr(store, "_read_array", None)
        if read_array is None:
            rows = store.read(a, b, pixels=name == schema.PIXELS)
            sparse = store.meta.sparse and name in store.meta.target_arrays()
            return rows.targets[name] if sparse else getattr(rows, name)
        return read_array(name, store.arrays[name], a, b)

    def _targets(self, s: int, a: int, b: int, views: np.ndarray) -> Targets:
        """The teacher's side of rows [a, b), one stored view each: full (or ensemble) logits [n, C], or
        a sparse store's arrays [n, K] with tail_lse / lse [n] at the training temperature."""
        ar = np.arange(b - a)
        store = self.stores[s]
        if self.temperature_index is None:
            logits = (self.ensemble.combine(store, a, b) if self.ensemble is not None
                      else self._array(s, schema.LOGITS, a, b))
            return np.asarray(logits[ar, views])
        out = {}
        for name in store.meta.target_arrays():
            arr = np.asarray(self._array(s, name, a, b)[ar, views])
            out[name] = arr[:, self.temperature_index] if name in (schema.TAIL_LSE, schema.LSE) else arr
        return out

    def _scan(self, name: str) -> Iterator[np.ndarray]:
        """One array of every store, in key order, in reads of about SCAN_ROWS rows (whole chunks)."""
        for s, store in enumerate(self.stores):
            step = store.chunk_rows * max(1, SCAN_ROWS // store.chunk_rows)
            for a in range(0, len(store), step):
                yield self._array(s, name, a, min(len(store), a + step))

    def image_shapes(self, budget_bytes: int) -> tuple[np.ndarray, int]:
        """The decode cache's layout: C, H, W of the first rows (key order) whose decoded originals fit
        `budget_bytes` ([k, 3] int32), and the bytes every row's original needs.

        Reads `image_hw` alone, from end to end (this also finds a corrupt image_hw chunk before
        training starts), and keeps sizes only for the rows that fit: the cache's bookkeeping grows
        with its budget, not with the corpus.
        """
        c = self.pre.channels
        fit, total, full = [], 0, budget_bytes <= 0
        for hw in self._scan(schema.IMAGE_HW):
            ends = total + c * np.cumsum(hw.astype(np.int64).prod(axis=1))
            if not full:
                k = int(np.searchsorted(ends, budget_bytes, side="right"))
                fit.append(hw[:k])
                full = k < len(hw)
            total = int(ends[-1]) if len(ends) else total
        hw = np.concatenate(fit) if fit else np.zeros((0, 2), np.int32)
        return np.column_stack([np.full(len(hw), c, np.int32), hw]).astype(np.int32), total

    def _read(self, seg: Segment, views: np.ndarray) -> Request:
        """Rows of `seg` with one stored view each, reading only what a Request needs.

        Each array read costs ~0.5 ms a chunk besides its bytes (benchmarks/scale.py), as much as
        the logits for the small arrays together, so none is read in vain: not image_hw; not
        view_params for the eval view, which takes no parameters (zeros stand in); not the digests
        when the pixels are embedded (no file to check); embedded pixels only where they replace
        the corpus; the ensemble's combined logits in place of the primary teacher's.
        """
        s, a, b = seg
        n, ar = b - a, np.arange(b - a)
        ids = np.asarray(self._array(s, schema.IDS, a, b), object)
        params = (np.zeros((n, 5), np.int32) if self.view_kind == EVAL
                  else np.asarray(self._array(s, schema.VIEW_PARAMS, a, b)[ar, views]))
        digests = np.zeros((n, 32), np.uint8) if self.embedded else np.asarray(self._array(s, schema.DIGESTS, a, b))
        pixels = self._array(s, schema.PIXELS, a, b)[ar, views] if self.embedded else None
        return Request(keys=self.offsets[s] + np.arange(a, b, dtype=np.int64), stores=np.full(n, s, np.int32),
                       ids=ids, digests=digests, params=params, logits=self._targets(s, a, b, views),
                       labels=self._labels(ids), pixels=pixels)

    def _views(self, seg: Segment, seed: int, epoch: int) -> np.ndarray:
        """Which stored view each row contributes this epoch: a per-image offset (from the seed), then
        one step per epoch, so every view is used once in V epochs, whatever the shares or workers."""
        if self.view_count == 1:
            return np.zeros(seg.rows, np.int64)
        k = seg.start // self.block_rows[seg.store]
        a, b = self._block_bounds(seg.store, k)
        offset = np.random.default_rng([seed, seg.store, k, _TAG_VIEW]).integers(self.view_count, size=b - a)
        return (offset[seg.start - a:seg.stop - a] + epoch) % self.view_count

    def read(self, seg: Segment, seed: int, epoch: int) -> Request:
        return self._read(seg, self._views(seg, seed, epoch))

    def requests(self, epoch: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle_blocks: int = 8) -> Iterator[Request]:
        """This rank's batches for one epoch, in the order that depends on (seed, epoch) only.

        Memory: one group of `shuffle_blocks` blocks (plus a partial batch) at a time.
        """
        share = epoch_share(self.train_blocks, seed, epoch, rank, world)
        if self.embedded:  # pixels ride along with the rows: keep a group's pixels within budget
            pre = self.pre
            row_bytes = pre.channels * pre.size[0] * pre.size[1]
            shuffle_blocks = max(1, min(shuffle_blocks, PIXEL_GROUP_BYTES // (max(self.block_rows) * row_bytes)))

        def groups() -> Iterator[Request]:
            # A group's blocks are read concurrently: zarr decodes the chunks of one read in its thread
            # pool, and a block is often one chunk, so one read at a time would decode on one core.
            with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="trainer-read") as pool:
                for g in range(0, len(share), shuffle_blocks):
                    rows = Request.concat(list(pool.map(lambda seg: self.read(seg, seed, epoch),
                                                        share[g:g + shuffle_blocks])))
                    perm = np.random.default_rng([seed, epoch, rank, g, _TAG_GROUP]).permutation(len(rows))
                    yield rows.take(perm)

        return rebatch(groups(), batch_size, min_last=2)  # a single-row batch would break BatchNorm

    def holdout_requests(self, batch_size: int) -> Iterable[Request]:
        """The held-out rows (view 0) in batches, read anew (one pass ahead) each time it is iterated."""
        return _Passes(lambda: read_ahead(self._holdout_batches(batch_size)))

    def _holdout_batches(self, batch_size: int) -> Iterator[Request]:
        segments = self.holdout.segments if self.holdout is not None else ()
        return rebatch((self._read(seg, np.zeros(seg.rows, np.int64)) for seg in segments), batch_size)


def rebatch(buffers: Iterable[Request], batch_size: int, min_last: int = 1) -> Iterator[Request]:
    """Consecutive buffers of rows cut into batches of `batch_size`, the remainder of one carried into
    the next; the last partial batch is kept if it has at least `min_last` rows."""
    carry: Request | None = None
    for rows in buffers:
        if carry is not None and len(carry):
            rows = Request.concat([carry, rows])
        full = len(rows) // batch_size
        for i in range(full):
            yield rows.take(slice(i * batch_size, (i + 1) * batch_size))
        carry = rows.take(slice(full * batch_size, None))
    if carry is not None and len(carry) >= min_last:
        yield carry


def open_stores(stores: Sequence[str | os.PathLike | LogitStore], images: Sequence[str | os.PathLike] | None = None,
                holdout: float = 0.02, labels: str | os.PathLike | None = None,
                labels_from_folders: bool = False, min_block_rows: int = MIN_BLOCK_ROWS,
                teachers: Sequence[str] | None = None, teacher_weights: Sequence[float] | None = None,
                temperature: float = 4.0, storage_options: dict[str, Any] | None = None) -> StoreSet:
    """Open (and validate) the stores and find their images. A store may be given already open.

    Stores are paths, zip files or fsspec URLs (s3://...; `storage_options` for the filesystem).
    Without --images, stores that all embed their pixels are read without any corpus.
    """
    if not stores:
        raise ConfigError("give at least one --store")
    opened = [s if not isinstance(s, (str, os.PathLike)) else open_store(s, storage_options=storage_options)
              for s in stores]
    images = list(images or [])
    if images and len(images) != len(opened):
        raise ConfigError(f"{len(images)} --images folder(s) for {len(opened)} --store(s); give none (use the "
                          "corpus roots recorded in the stores) or one per store, in the same order")
    ensemble = make_ensemble(opened, teachers, teacher_weights, temperature)
    classes = list(opened[0].meta.classes)
    mapping = read_labels_file(labels, classes) if labels is not None else None
    if not images and all(s.meta.embedded_pixels for s in opened):
        return StoreSet(opened, [None] * len(opened), holdout, mapping, labels_from_folders, min_block_rows,
                        ensemble, temperature)
    roots = []
    for i, store in enumerate(opened):
        if not images and not store.meta.corpus.root:
            raise ImageError(f"{store.location} records no single corpus root (a merge of corpora kept in "
                             "different places); pass --images DIR with the folder its ids are relative to")
        root = Path(images[i]).expanduser() if images else Path(store.meta.corpus.root)
        if not root.is_dir():
            where = "--images" if images else "the corpus root recorded in the store"
            raise ImageError(f"{store.location}: looked for its images in {root} ({where}) and found no such "
                             "folder; pass --images DIR to say where the corpus is now")
        roots.append(root)
    return StoreSet(opened, roots, holdout, mapping, labels_from_folders, min_block_rows, ensemble, temperature)


# --------------------------------------------------------------------------------------------
# The decode cache and the worker side
# --------------------------------------------------------------------------------------------
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


class ImageSource(Dataset):
    """Worker side: a Request in, its pixels (and its logits, labels, keys) out.

    Holds no store, only image roots and the shared cache, so it pickles cheaply to spawned workers.
    """

    def __init__(self, roots: Sequence[Path | None], locations: Sequence[str], spec: InputSpec, kind: str,
                 cache: DecodeCache, skip_mismatched: bool = False):
        self.roots, self.locations = [None if r is None else Path(r) for r in roots], list(locations)
        self.spec, self.kind, self.cache, self.skip_mismatched = spec, kind, cache, skip_mismatched
        self._uniform: bool | None = None

    def __len__(self) -> int:
        return self.cache.n_rows

    def __getitem__(self, index: int) -> Any:
        raise TypeError("ImageSource is read a batch at a time (it takes Requests)")

    def _original(self, key: int, store: int, image_id: str, digest: np.ndarray) -> torch.Tensor:
        img = self.cache.get(key)
        if img is not None:
            return img
        path = self.roots[store] / image_id
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"{path}: cannot read it ({exc.strerror or exc}); it is listed in "
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
        return self.cache.pixels.view(-1, c, h, w)[torch.from_numpy(keys)]

    def __getitems__(self, req: Request) -> dict[str, Any]:
        if req.pixels is not None:  # embedded in the store: the view as the teacher saw it
            pixels = torch.from_numpy(req.pixels)
            if tuple(self.spec.size) != tuple(self.spec.pre.size):
                pixels = resize(pixels, list(self.spec.size))
            return {"pixels": pixels, "logits": targets_tensor(req.logits),
                    "labels": torch.from_numpy(req.labels), "keys": torch.from_numpy(req.keys)}
        fast = self._identity_gather(req.keys)
        if fast is not None:
            return {"pixels": fast, "logits": targets_tensor(req.logits),
                    "labels": torch.from_numpy(req.labels), "keys": torch.from_numpy(req.keys)}
        keep, views = [], []
        for i in range(len(req)):
            key = int(req.keys[i])
            if self.cache.is_skipped(key):
                continue
            try:
                img = self._original(key, int(req.stores[i]), str(req.ids[i]), req.digests[i])
            except ImageError as exc:
                if not self.skip_mismatched:
                    # Returned, not raised: the DataLoader would wrap it in a worker traceback. The
                    # message only: a returned exception object kept the worker from exiting promptly.
                    return {"error": str(exc)}
                self.cache.skip(key)
                continue
            views.append(self.spec.view(img, req.params[i], self.kind))
            keep.append(i)
        c, (h, w) = self.spec.pre.channels, self.spec.size
        pixels = torch.stack(views) if views else torch.zeros(0, c, h, w, dtype=torch.uint8)
        sel = np.asarray(keep, np.int64)
        return {"pixels": pixels, "logits": targets_tensor(take_targets(req.logits, sel)),
                "labels": torch.from_numpy(req.labels[sel]), "keys": torch.from_numpy(req.keys[sel])}


class _Failed(NamedTuple):
    exc: BaseException


_DONE = object()


def read_ahead(items: Iterable[Any], depth: int = 4) -> Iterator[Any]:
    """Iterate `items` in a background thread, up to `depth` items ahead.

    Used on `StoreSet.requests`: a group of chunks is then read (zarr decompresses and checksums
    with the GIL released) while the student trains on the previous batches, instead of the
    training loop stalling at every group boundary. The order is unchanged.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # re-raised in the consumer, where it has a meaning
            put(_Failed(exc))

    thread = threading.Thread(target=run, name="trainer-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()  # a consumer that stops early (an error, a break) releases the thread


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
    processes persist and each pass reuses what they decoded into the shared cache."""

    def __init__(self, source: ImageSource, num_workers: int = 0, pin_memory: bool = False):
        self.source = source
        self._pass = _CurrentPass()
        self.loader = DataLoader(source, batch_sampler=self._pass, num_workers=num_workers, collate_fn=_as_is,
                                 pin_memory=pin_memory, persistent_workers=num_workers > 0,
                                 prefetch_factor=4 if num_workers > 0 else None)

    def __call__(self, requests: Iterable[Request]) -> Iterator[dict[str, Any]]:
        self._pass.requests = requests
        error = None
        for batch in self.loader:
            if "error" in batch:
                error = batch["error"]
                break
            yield batch
        if error is not None:
            raise ImageError(error)


def make_batches(data: StoreSet, spec: InputSpec, cache_bytes: int, num_workers: int = 0,
                 skip_mismatched: bool = False, pin_memory: bool = False) -> Batches:
    """The pipeline of one run: a decode cache laid out for `data`, and the DataLoader that fills it.

    Stores that embed their pixels decode nothing, so their cache is empty (and nothing is read for it).
    """
    if data.embedded:
        shapes, needed = np.zeros((0, 3), np.int32), 0
    else:
        shapes, needed = data.image_shapes(cache_bytes)
    cache = DecodeCache(shapes, len(data), needed)
    source = ImageSource(data.roots, [str(s.location) for s in data.stores], spec, data.view_kind, cache,
                         skip_mismatched)
    return Batches(source, num_workers, pin_memory)
