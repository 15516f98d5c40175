"""The store set: one or more stores of the same teacher read as one dataset.

`open_stores` opens and checks them (the same classes, preprocessing, teacher, views and targets),
finds their images, and resolves an ensemble of their teachers; `StoreSet` cuts them into blocks,
holds each block's tail out of training, and reads an epoch's blocks in the order of order.py as
`Request`s (batches.py): the teacher's side of each row (full, ensemble or sparse targets at the
training temperature) and where its image is.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from logitstore.sources import images_root, is_url
from logitstore import schema
from logitstore.errors import IntegrityError
from logitstore.schema import compatibility_problem
from logitstore.store import LogitStore, open_store
from logitstore.views import EVAL

from .batches import Request, Targets, read_ahead
from .errors import ConfigError, ImageError, StoreMismatchError
from .inputs import NO_LABEL, folder_labels, read_labels_file
from .order import Segment, epoch_share, epoch_views, group_order, spread

# A block (the unit of the shuffle, of the DDP shares and of a read) is at least this many rows:
# one chunk of a 10-class store (8192 rows) or of a 1000-class one (2048 rows). Each read costs
# ~0.5 ms per array on top of decoding, whatever its size (more on an object store), so a read of
# 512 rows cost 8% of a LeNet epoch on MNIST in benchmarks/fit_throughput.py; 2048 rows keep it
# under 1 us a sample, and a buffer of 8 blocks of 1000-class float16 logits under 40 MiB.
MIN_BLOCK_ROWS = 2048
# ... unless its rows are large (hundreds of augmented views per image, format 1.5 only): then a block is whole chunks of
# about this many bytes of targets, so a shuffle group of 8 stays near 512 MiB however many views a row holds
# (unchanged for rows up to 32 KiB, e.g. 16 views of 1000-class float16 logits).
BLOCK_BYTES = 64 << 20

# A held-out pass scores the tails of at most max(this many, this share of) the blocks, evenly
# spaced: at 5 million 1000-class rows every tail would mean decoding all 2,442 chunks (10 GB) per
# pass to score 2% of the rows; 245 blocks decode a tenth of that and still score ~10,000 rows.
HELD_OUT_PASS_BLOCKS = 64
HELD_OUT_PASS_SHARE = 0.1

# Blocks of one shuffle group read at once (benchmarks/scale.py: see RESULTS.md, "Millions of rows").
READ_THREADS = 4

# Embedded pixels travel with the rows they belong to; a shuffle group holds at most this many bytes of them.
PIXEL_GROUP_BYTES = 1 << 30

# Rows per read when one small array is scanned from end to end (image sizes for the decode cache,
# ids to count labels): 64 chunks of 1000-class rows, 8 of 10-class ones; zarr decodes a read's
# chunks concurrently, and at 2-8 bytes a row of image_hw a read is still well under 1 MiB.
SCAN_ROWS = 1 << 15


def ensemble_logits(teacher_logits: np.ndarray, weights: np.ndarray, temperature: float) -> np.ndarray:
    """Logits whose softmax at `temperature` is the weighted mean of the teachers' softmaxes.

    [n, K, C] logits of K teachers -> [n, C] float32: T * log(sum_k w_k softmax(t_k / T)). With
    these, `distillation_loss` at the same T distils from the ensemble's averaged probabilities
    (Hinton et al.'s ensemble target) with no change to the loss; the argmax is the ensemble's.
    """
    z = teacher_logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))            # log softmax per teacher
    mixed = log_p + np.log(np.asarray(weights, np.float64))[None, :, None]
    top = mixed.max(axis=1, keepdims=True)
    return (temperature * (top[:, 0] + np.log(np.exp(mixed - top).sum(axis=1)))).astype(np.float32)


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
    """--teachers and --teacher-weights as an Ensemble (None: the primary teacher alone), refusing a store
    that lacks one of them or means another network by its name."""
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
            continue  # the primary teachers already agree (check_compatible)
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


def _target_row_bytes(meta: schema.StoreMeta) -> int:
    """Bytes of one row's targets, every view (what a block read decodes per row)."""
    return max(1, sum(meta.views.count * last * np.dtype(d).itemsize for last, d in meta.target_arrays().values()))


def check_compatible(stores: Sequence[LogitStore]) -> None:
    """Refuse stores whose rows cannot be read as one dataset, naming both and the first difference.

    How the logits are encoded (dtype, rounding, embedded pixels) may differ: a student reads them all alike."""
    first = stores[0]
    for other in stores[1:]:
        problem = compatibility_problem(first.meta, other.meta, same_encoding=False)
        if problem:
            raise StoreMismatchError(f"stores {first.location} and {other.location} cannot be read as one "
                                     f"dataset: {problem}")


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
        check_compatible(stores)
        if not 0 <= holdout < 1:
            raise ConfigError(f"--holdout {holdout}: must be a fraction in [0, 1)")
        # A root is a folder, or (a corpus on object storage) a URL kept as text.
        self.stores, self.roots = list(stores), [None if r is None else r if is_url(str(r)) else Path(r) for r in roots]
        self.image_storage_options: dict[str, Any] = {}  # fsspec options for corpora on object storage
        self.embedded = all(r is None for r in self.roots)
        self.ensemble = ensemble
        meta = self.stores[0].meta
        self.classes, self.pre = list(meta.classes), meta.preprocess
        self.view_kind, self.view_count = meta.views.kind, meta.views.count
        self.views = meta.views  # 1.5: the augmentation policy each view replays
        # Sparse stores: the column of tail_lse / lse at the training temperature, in every store
        # (their targets agree, so one index serves all).
        self.temperature_index = sparse_temperature_index(self.stores[0], temperature) if meta.sparse else None
        self.offsets = np.cumsum([0] + [len(s) for s in self.stores]).astype(np.int64)
        if int(self.offsets[-1]) == 0:
            raise StoreMismatchError(f"{self.stores[0].location}: the store holds no images")
        self.label_map = labels
        self.labels_from_folders = labels_from_folders and labels is None
        # The BLOCK_BYTES cap only for augmented (1.5) stores: a plain store's blocks, hence its held-out
        # tails and shuffle, stay what earlier releases computed.
        self.block_rows = [s.chunk_rows * max(1, -(-(min(min_block_rows, BLOCK_BYTES // _target_row_bytes(s.meta))
                                                     if s.meta.views.augmented else min_block_rows)
                                                   // s.chunk_rows)) for s in self.stores]
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
        read_array = getattr(store, "read_array", None)
        if read_array is None:
            rows = store.read(a, b, pixels=name == schema.PIXELS)
            sparse = store.meta.sparse and name in store.meta.target_arrays()
            return rows.targets[name] if sparse else getattr(rows, name)
        return read_array(name, a, b)

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
                       labels=self._labels(ids), pixels=pixels, extras=self._extras(s, a, b, views))

    def _extras(self, s: int, a: int, b: int, views: np.ndarray) -> dict[str, np.ndarray] | None:
        """1.5 augmented views: each row's arrays for its view and, where it is mixed, its partner's key,
        id, digest and pre-mix view arrays for the same view index (the partner is a row of the same mix
        group, views.mix.group listing positions, so a window a group wider than [a, b) holds every partner). None for a plain store, or
        where embedded pixels already are the mixed inputs."""
        spec = self.stores[s].meta.views
        if self.embedded or not spec.augmented:
            return None
        ar = np.arange(b - a)
        names = schema.view_extra_arrays(spec)
        out = {name: np.asarray(self._array(s, name, a, b)[ar, views]) for name in names}
        if spec.mix is None:
            return out
        partner = a + ar + out[schema.MIX_PARAMS][:, 0].astype(np.int64)
        n_rows = len(self.stores[s])
        if len(partner) and (partner.min() < 0 or partner.max() >= n_rows):
            raise IntegrityError(f"{self.stores[s].location}: array '{schema.MIX_PARAMS}' rows {a}-{b - 1} name a "
                                 f"mix partner outside the store's {n_rows} rows (docs/FORMAT.md, 1.5: augmented "
                                 "views); restore the store from its source")
        lo, hi = int(min(a, partner.min(initial=a))), int(max(b, partner.max(initial=b - 1) + 1))
        at = partner - lo
        out["partner_keys"] = self.offsets[s] + partner
        out["partner_ids"] = np.asarray(self._array(s, schema.IDS, lo, hi), object)[at]
        out["partner_digests"] = np.asarray(self._array(s, schema.DIGESTS, lo, hi))[at]
        out["partner_params"] = np.asarray(self._array(s, schema.VIEW_PARAMS, lo, hi)[at, views])
        for name in (schema.AUGMENT_OPS, schema.ERASE_BOXES):
            if name in names:
                out["partner_" + name] = np.asarray(self._array(s, name, lo, hi)[at, views])
        return out

    def _views(self, seg: Segment, seed: int, epoch: int) -> np.ndarray:
        """Which stored view each row of `seg` contributes this epoch (order.epoch_views)."""
        k = seg.start // self.block_rows[seg.store]
        block = Segment(seg.store, *self._block_bounds(seg.store, k))
        return epoch_views(seg, block, k, self.view_count, seed, epoch)

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
                    yield rows.take(group_order(len(rows), seed, epoch, rank, g))

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
        given = images_root(images[i]) if images else store.meta.corpus.root
        if is_url(given):  # checked by the first read, with the reason the object store gives
            roots.append(given)
            continue
        root = Path(given).expanduser()
        if not root.is_dir():
            where = "--images" if images else "the corpus root recorded in the store"
            raise ImageError(f"{store.location}: looked for its images in {root} ({where}) and found no such "
                             "folder; pass --images DIR to say where the corpus is now")
        roots.append(root)
    data = StoreSet(opened, roots, holdout, mapping, labels_from_folders, min_block_rows, ensemble, temperature)
    data.image_storage_options = dict(storage_options or {})  # for corpora on object storage
    return data
