"""The dump's work: settle the flags into a DumpJob (teacher on its device, corpus, metadata), then
run it over listing positions: corpus -> DataLoader workers (read, digest, decode, views) -> teacher
-> rows handed to a writer. The single-process loop (local.py) and the distributed one
(distributed.py) both drive a DumpJob."""
from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .. import __version__, limits, schema
from ..corpus import Corpus, decode_image, describe_failure, id_problem, printable_id, read_and_decode, sha256_bytes
from ..device import resolve_device, resolve_precision
from ..failures import FailureWatch
from ..errors import DumpInterrupted, LogitRangeError, LogitStoreError, OptionError, TeacherError
from ..schema import AUGMENTED_RESIZED_CROP, AugmentPolicy, CorpusInfo, ErasingPolicy, MixPolicy, Preprocess, StoreMeta, TargetSpec, ViewSpec
from ..augment import AUGMENT_NAMES, premix_views, sample_extras
from ..sparse import REFERENCE_TEMPERATURES, encode_sample, encode_topk
from ..rows import Rows
from ..prefetch import read_ahead_in_runs, stop_workers
from ..sources import Item, Member, Source, open_source
from ..views import apply_view, normalize, sample_view_params
from ..writer import StoreWriter
from .load import class_names, failure_text, prepare_teacher, to_device
from .mixing import span, with_partners

# --sample draws from the teacher's softmax at this temperature unless told otherwise: the trainer's
# default, where importance weights are then exactly 1 (lowest variance). Colder proposals make the
# weights of tail classes grow exponentially at hotter training temperatures (logitstore/sparse.py).
DEFAULT_SAMPLE_TEMPERATURE = 4.0
_TAG_SAMPLE = 0x5A


@dataclass
class DumpConfig:
    """Every choice of a dump, as plain values: built once (by the CLI or `logitstore.dump`), passed as is.

    See `logitstore dump --help` for what each means.
    """

    teacher: str
    images: str
    out: str
    weights: str | None = None
    pretrained: bool = False
    arch_kwargs: dict[str, Any] | None = None
    trust_modules: Sequence[str] = ()
    views: int = 1
    seed: int = 0
    dtype: str = "float16"
    device: str | None = None
    precision: str = "auto"
    batch_size: int = 64
    num_workers: int | None = None
    size: tuple[int, int] | None = None
    resize: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    mode: str | None = None
    classes: str | Sequence[str] | None = None
    chunk_rows: int | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    embed_images: bool = False
    # 1.5 augmented views (logitstore/augment.py): any of these makes the views random, even one.
    augment: str = "none"             # none | rand-augment | trivial-augment
    augment_ops: int = 2
    augment_magnitude: int = 9
    erase: float = 0.0                # random erasing probability
    mixup: float = 0.0                # mixup's Beta alpha (0: off)
    cutmix: float = 0.0               # cutmix's Beta alpha (0: off)
    mix_prob: float = 1.0
    mix_group: int = 64               # partners come from listing positions [k * G, (k + 1) * G)
    keep_bits: int | None = None
    topk: int | None = None
    sample: int | None = None
    temperatures: Sequence[float] | None = None
    sample_temperature: float | None = None
    overwrite: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    segment_rows: int | None = None
    image_column: str | None = None   # Parquet/Arrow corpora: the column holding the images
    id_column: str | None = None      # ... and an optional column of ids
    max_failure_share: float = 0.5    # stop when more than this share of images failed (after FAILURE_CHECK_AFTER)
    progress: bool = False
    on_batch: Callable[[int], None] | None = None

    def check(self) -> None:
        """The checks that need no file: ranges of the numbers, and which flags go together."""
        if self.dtype not in schema.LOGIT_DTYPES:
            raise OptionError(f"--dtype {self.dtype!r} is not one of {', '.join(schema.LOGIT_DTYPES)}")
        for name, limit in DUMP_LIMITS.items():
            value = getattr(self, name)
            if value is not None and not limit.allows(value):
                raise OptionError(f"--{name.replace('_', '-')} {value!r}: must be {limit.describe()}")
        if not (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1) or not (0 < self.crop_ratio[0] <= self.crop_ratio[1]):
            raise OptionError("--crop-scale needs 0 < lo <= hi <= 1 and --crop-ratio 0 < lo <= hi")
        schema.check_keep_bits(self.keep_bits, self.dtype)
        if self.augment not in ("none", *AUGMENT_NAMES):
            raise OptionError(f"--augment {self.augment!r}: one of none, {', '.join(AUGMENT_NAMES)}")

    def view_spec(self) -> ViewSpec:
        """--views and the augmentation flags as the stored view policy (1.5 fields only where used)."""
        augment = None if self.augment == "none" else AugmentPolicy(
            AUGMENT_NAMES[self.augment], self.augment_ops if self.augment == "rand-augment" else 1,
            self.augment_magnitude if self.augment == "rand-augment" else 0)
        erasing = ErasingPolicy(float(self.erase)) if self.erase else None
        mix = MixPolicy(float(self.mixup), float(self.cutmix), float(self.mix_prob),
                                                      group=int(self.mix_group)) if (self.mixup or self.cutmix) else None
        if self.views == 1 and augment is None and erasing is None and mix is None:
            return ViewSpec(1, "eval")
        kind = "random_resized_crop" if augment is None and erasing is None and mix is None else AUGMENTED_RESIZED_CROP
        return ViewSpec(self.views, kind, tuple(self.crop_scale), tuple(self.crop_ratio),
                        float(self.flip_prob), augment, erasing, mix)

    def target_spec(self) -> TargetSpec:
        return target_spec(self.topk, self.sample, self.temperatures, self.sample_temperature)


# Ranges of the dump's numbers, shared with the CLI's flag types (docs/FORMAT.md, R3, for the stored ones).
DUMP_LIMITS = {
    "views": limits.count(1, schema.MAX_VIEWS), "seed": limits.count(0, 2 ** 63 - 1),
    "batch_size": limits.count(1, 65536), "num_workers": limits.count(0, 256),
    "resize": limits.count(1, schema.MAX_RESIZE), "flip_prob": limits.real(0, 1),
    "chunk_rows": limits.count(1, schema.MAX_CHUNK_ROWS), "keep_bits": limits.count(1, 22),
    "topk": limits.count(1, schema.MAX_CLASSES), "sample": limits.count(1, 65535),
    "sample_temperature": limits.real(0, lo_open=True), "segment_rows": limits.count(1),
    "max_failure_share": limits.real(0, 1),
    "augment_ops": limits.count(1, 16), "augment_magnitude": limits.count(0, schema.AUGMENT_BINS - 1),
    "erase": limits.real(0, 1), "mixup": limits.real(0), "cutmix": limits.real(0),
    "mix_prob": limits.real(0, 1, lo_open=True), "mix_group": limits.count(2, schema.MAX_MIX_GROUP),
}


@dataclass
class DumpSummary:
    out: str
    n_listed: int
    n_images: int
    n_failed: int
    views: int
    num_classes: int
    dtype: str
    precision: str
    device: str
    chunk_rows: int
    resumed_rows: int
    seconds: float
    bytes_on_disk: int
    failures: list[tuple[str, str]]
    nothing_to_do: bool = False  # the store was already complete with this recipe

    @property
    def images_per_s(self) -> float:
        done = self.n_listed - self.resumed_rows
        return done / self.seconds if self.seconds > 0 else 0.0


class _CorpusViews(Dataset):
    """Item = one listing position: digest, pixels of every view (uint8), or the reason it failed."""

    def __init__(self, corpus: Corpus | Source, pre: Preprocess, views: ViewSpec, seed: int):
        self.corpus, self.pre, self.views, self.seed = corpus, pre, views, seed

    def __len__(self) -> int:
        return self.corpus.n_listed

    def __getitem__(self, pos: int | Item) -> dict[str, Any]:
        if isinstance(pos, Item):  # a streamed source: the bytes come with the position
            pos, image_id, data, error = pos
        else:
            (image_id, data), error = (self.corpus.ids[pos], None), None
        error = error or id_problem(image_id)
        if error is not None:
            return {"source": pos, "id": printable_id(image_id), "error": error}
        try:
            if data is None:
                digest, img = read_and_decode(self.corpus.path(image_id), self.pre.mode)
            else:
                data = data.read() if isinstance(data, Member) else data
                digest, img = sha256_bytes(data), decode_image(data, self.pre.mode)
            h, w = int(img.shape[1]), int(img.shape[2])
            params = sample_view_params(h, w, self.views, self.seed, image_id)
            extras, partner_u = None, None
            if self.views.augmented:  # 1.5: the same functions the trainer replays them with
                extras, partner_u = sample_extras(self.views, self.seed, image_id, self.pre.size)
                pixels = premix_views([img] * len(params), params, extras.get(schema.AUGMENT_OPS),
                                      extras.get(schema.ERASE_BOXES), self.pre, self.views)
            else:
                pixels = torch.stack([apply_view(img, p, self.pre, self.views.kind) for p in params])
        except Exception as exc:  # any unreadable file is recorded, never fatal
            return {"source": pos, "id": image_id, "error": describe_failure(exc)}
        return {"source": pos, "id": image_id, "error": None, "digest": np.frombuffer(digest, np.uint8),
                "hw": (h, w), "params": params, "pixels": pixels, "extras": extras, "partner_u": partner_u}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [it for it in items if it["error"] is None]
    return {
        "ok": ok and {
            "source": np.array([it["source"] for it in ok], dtype=np.int64),
            "ids": [it["id"] for it in ok],
            "digests": np.stack([it["digest"] for it in ok]),
            "hw": np.array([it["hw"] for it in ok], dtype=np.int32),
            "params": np.stack([it["params"] for it in ok]).astype(np.int32),
            "pixels": torch.stack([it["pixels"] for it in ok]),
            "extras": None if ok[0]["extras"] is None else
            {k: np.stack([it["extras"][k] for it in ok]) for k in ok[0]["extras"]},
            "partner_u": None if ok[0]["partner_u"] is None else np.stack([it["partner_u"] for it in ok]),
        },
        "failures": [(it["source"], it["id"], it["error"]) for it in items if it["error"] is not None],
    }


class _Streamed:
    """A DataLoader batch_sampler over a streamed source: its batches carry their bytes to the workers."""

    def __init__(self, job: "DumpJob", start: int, stop: int | None):
        self.job, self.start, self.stop = job, start, stop
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[list[Item]]:
        # The source's error (a broken shard, a failed listing) ends the batches here and is raised by
        # `DumpJob.run` once the DataLoader is done: raised through the DataLoader (its prefetch may run
        # in its constructor), it left the loader's workers to the garbage collector, in whatever thread.
        try:
            yield from self.job.streamed_batches(self.start, self.stop)
        except Exception as exc:
            self.error = exc


def _versions() -> dict[str, str]:
    import numcodecs
    import PIL
    import torchvision
    import zarr

    return {"logitstore": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "zarr": zarr.__version__, "numcodecs": numcodecs.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__, "python": platform.python_version()}


def check_logits(logits: torch.Tensor, dtype: str, ids: list[str], keep_bits: int | None = None) -> None:
    finite = torch.isfinite(logits).flatten(1).all(1)
    if not bool(finite.all()):
        bad = ids[int((~finite).nonzero()[0])]
        raise LogitRangeError(f"the teacher returned NaN or inf logits for {bad}; check the teacher and "
                              "its preprocessing (--mean/--std/--mode), or try --precision fp32")
    if dtype == "float16":
        limit = schema.float16_limit(keep_bits)
        peak = logits.abs().flatten(1).amax(1)
        if bool((peak > limit).any()):
            i = int((peak > limit).nonzero()[0])
            raise LogitRangeError(f"a logit of {float(peak[i]):.6g} for {ids[i]} is outside float16's range "
                                  f"(+-{limit:g}{' with --keep-bits' if keep_bits else ''}); "
                                  "re-run with --dtype float32")


@dataclass
class DumpJob:
    """Everything settled before the first image is read: the teacher on its device, the corpus, the metadata."""

    model: Any
    corpus: Corpus | Source
    meta: StoreMeta
    device: torch.device
    num_workers: int
    max_failure_share: float = 0.5
    owns_group: bool = False  # listing the corpus started torch.distributed's process group

    @property
    def batch_size(self) -> int:
        return self.meta.batch_size

    def batches(self, start: int, stop: int) -> list[list[int]]:
        """Listing positions [start, stop) as the fixed batches of an uninterrupted run: a resumed run
        restarts at the boundary of the batch that holds its first missing image, so every image is
        seen in the same batch as in an uninterrupted run and the logits match bit for bit."""
        b = self.batch_size
        first, stop = span(start, stop, b, self.mix_group, self.corpus.n_listed)  # 1.5: whole mix groups
        return [list(range(p, min(p + b, stop))) for p in range(first, stop, b)]

    @property
    def mix_group(self) -> int | None:
        mix = self.meta.views.mix
        return None if mix is None else mix.group

    def streamed_batches(self, start: int, stop: int | None) -> Iterator[list[Item]]:
        """The batches of an uninterrupted run that hold positions [start, stop), each position with its
        bytes, streamed from the source in listing order (shards, tables, URLs). Whole batches, also past
        `stop` (a segment that ends inside a batch: `run` keeps only its own positions). `stop` None: the
        whole listing, which may still be under way (`listing_pending`)."""
        b = self.batch_size
        if stop is None:
            first, end = 0, None
        else:
            first, stop = span(start, stop, b, self.mix_group, self.corpus.n_listed)  # 1.5: whole mix groups
            end = min(self.corpus.n_listed, -(-stop // b) * b)
        batch: list[Item] = []
        for item in read_ahead_in_runs(self.corpus.items(first, end), 64, depth=4):  # 256 items ahead
            if end is not None and item.pos >= end:
                break
            batch.append(item)
            if len(batch) == b:
                yield batch
                batch = []
        if batch:
            yield batch

    @property
    def listing_pending(self) -> bool:
        """The corpus is still being listed in the background (a fresh dump's units: `prepare_dump`)."""
        return bool(getattr(self.corpus, "listing_pending", False))

    def settle_listing(self) -> None:
        """Wait for the corpus's listing to end, and put its identity into the metadata."""
        if not self.listing_pending:
            return
        self.corpus.settle_listing()
        self.meta = replace(self.meta, corpus=replace(self.meta.corpus, listing_sha256=self.corpus.listing_sha256(),
                                                      n_listed=self.corpus.n_listed))

    def unit_bounds(self, world: int) -> list[int] | None:
        """Segment bounds at the corpus's units (shards, files) for a distributed dump over `world`
        processes: no process reads a unit another one dumps (but a batch across a bound). None for a
        corpus read by position, which is cut in fixed runs of rows."""
        if getattr(self.corpus, "positional", True):
            return None
        from .distributed import unit_groups

        counts = self.corpus.counts
        bounds, pos = [0], 0
        for units in unit_groups(len(counts), world):
            pos += sum(counts[u] for u in units)
            if pos > bounds[-1]:
                bounds.append(pos)
        return bounds

    def run(self, writer: StoreWriter | Any, start: int, stop: int | None, progress: Any = None, task: Any = None,
            on_batch: Callable[[int], None] | None = None, whole: bool = False) -> None:
        """Teacher over listing positions [start, stop), rows submitted to `writer` (not closed here).
        `whole`: these are all the listing's remaining positions (no store where every image failed).
        `stop` None: every position from 0, the listing perhaps still under way (a streamed source)."""
        meta, pre, dev = self.meta, self.meta.preprocess, self.device
        streamed_stop, stop = stop, (1 << 62) if stop is None else stop
        watch = FailureWatch(meta.corpus.listing if meta.corpus.listing != "directory" else meta.corpus.root,
                             self.max_failure_share, getattr(writer, "left_behind", None))
        rows_before = writer.progress.rows
        if getattr(self.corpus, "positional", True):
            batches: Any = self.batches(start, stop)
            if not batches:
                return
        else:
            if start >= stop:
                return
            batches = _Streamed(self, start, streamed_stop)
        workers = self.num_workers
        loader = DataLoader(_CorpusViews(self.corpus, pre, meta.views, meta.seed), batch_sampler=batches,
                            num_workers=workers, collate_fn=_collate, pin_memory=dev.type == "cuda",
                            prefetch_factor=4 if workers else None, persistent_workers=False)
        autocast = (torch.autocast(dev.type, dtype=torch.bfloat16 if meta.precision == "bf16" else torch.float16)
                    if meta.precision in ("bf16", "fp16") else None)
        np_dtype = np.float16 if meta.dtype == "float16" else np.float32
        v = meta.views.count
        release = getattr(self.corpus, "release", None)
        batch_iter = iter(loader)
        try:
            for batch in (batch_iter if self.mix_group is None else with_partners(batch_iter, self.mix_group)):
                failures = [f for f in batch["failures"] if start <= f[0] < stop]
                ok = batch["ok"]
                rows = _failures_only(failures, v, meta.views)
                # A resumed run re-reads a batch it may have kept; a segment may share a batch with the next.
                if ok and ((ok["source"] >= start) & (ok["source"] < stop)).any():
                    logits = forward(self.model, ok["pixels"], pre, dev, autocast)
                    keep = (ok["source"] >= start) & (ok["source"] < stop)
                    ids = [i for i, k in zip(ok["ids"], keep) if k]
                    lg = logits[torch.from_numpy(keep)]
                    check_logits(lg.reshape(len(ids), -1), meta.dtype, ids, meta.keep_bits)
                    targets = encode_targets(meta, lg, ids)
                    rows = Rows(np.array(ids, dtype=object), None if targets else lg.numpy().astype(np_dtype),
                                ok["digests"][keep], ok["hw"][keep], ok["params"][keep],
                                ok["pixels"][torch.from_numpy(keep)].numpy() if meta.embedded_pixels else None,
                                targets, source=ok["source"][keep], failures=failures,
                                view_extras=None if ok["extras"] is None else {k: x[keep] for k, x in ok["extras"].items()})
                if len(rows) or failures:
                    writer.submit(rows)
                n = len(ok["ids"]) if ok else 0
                kept = int(((ok["source"] >= start) & (ok["source"] < stop)).sum()) if ok else 0
                watch.add(kept, failures)
                if progress is not None:  # 1.5: whole mix groups are read, only [start, stop) is this run's
                    progress.advance(task, kept + len(failures))
                if on_batch is not None:
                    on_batch(n)
                if release is not None:  # the batches come in listing order: what lies before them is read
                    release(max([int(ok["source"].max()) if ok else -1, *(f[0] for f in batch["failures"])]) + 1)
        finally:
            stop_workers(batch_iter)  # also when the loop ends early (an error, a stop)
        if getattr(batches, "error", None) is not None:
            raise batches.error
        if whole:
            watch.finish(rows_before)


def target_spec(topk: int | None = None, sample: int | None = None,
                temperatures: Sequence[float] | None = None, sample_temperature: float | None = None) -> TargetSpec:
    """--topk / --sample and their temperatures -> what each row keeps of the teacher's output."""
    if topk is not None and sample is not None:
        raise OptionError("--topk and --sample are alternatives; give one (or neither for full logits)")
    if topk is None and sample is None:
        if temperatures is not None or sample_temperature is not None:
            raise OptionError("--temperatures and --sample-temperature apply to --topk or --sample stores")
        return TargetSpec()
    temps = tuple(sorted({float(t) for t in (temperatures or REFERENCE_TEMPERATURES)}))
    if topk is not None:
        if sample_temperature is not None:
            raise OptionError("--sample-temperature applies to --sample stores only")
        return TargetSpec(schema.TARGET_TOPK, int(topk), temps)
    proposal = float(DEFAULT_SAMPLE_TEMPERATURE if sample_temperature is None else sample_temperature)
    if proposal not in temps:
        raise OptionError(f"--sample-temperature {proposal:g} must be one of --temperatures "
                              f"{','.join(f'{t:g}' for t in temps)}")
    return TargetSpec(schema.TARGET_SAMPLE, int(sample), temps, proposal)


def encode_targets(meta: StoreMeta, logits: torch.Tensor, ids: Sequence[str]) -> dict[str, np.ndarray] | None:
    """float32 logits [n, V, C] -> the store's sparse target arrays (None for a full-logits store)."""
    t = meta.targets
    np_dtype = np.float16 if meta.dtype == "float16" else np.float32
    if t.kind == schema.TARGET_TOPK:
        e = encode_topk(logits, t.k, t.temperatures)
        return {schema.TOPK_VALUES: e.values.astype(np_dtype), schema.TOPK_INDICES: e.indices,
                schema.TAIL_LSE: e.tail_lse}
    if t.kind == schema.TARGET_SAMPLE:
        # Draws are seeded per image id, like the views: the same in any batch, process or resumed run.
        seeds = [[meta.seed, _TAG_SAMPLE, int.from_bytes(hashlib.sha256(i.encode("utf-8")).digest()[:8], "little")]
                 for i in ids]
        e = encode_sample(logits.numpy(), t.k, t.temperatures, t.proposal_temperature, seeds)
        return {schema.SAMPLE_INDICES: e.indices, schema.SAMPLE_COUNTS: e.counts,
                schema.SAMPLE_LOGITS: e.logits.astype(np_dtype), schema.SAMPLE_PROPOSAL: e.proposal,
                schema.LSE: e.lse}
    return None


def prepare_dump(cfg: DumpConfig, local_rank: int | None = None, list_later: bool = False) -> DumpJob:
    """Validate the flags, list the corpus, load the teacher onto its device and settle the metadata.
    `list_later`: shards and tables are listed in the background instead (`DumpJob.listing_pending`), so
    the teacher can start on the first ones; the metadata's listing identity is settled by `settle_listing`."""
    cfg.check()
    targets = cfg.target_spec()
    dev = resolve_device(cfg.device)
    if dev.type == "cuda" and dev.index is None and local_rank is not None:  # one GPU per torchrun process
        dev = torch.device("cuda", local_rank)
    precision = resolve_precision(cfg.precision, dev)
    owns_group = False
    if local_rank is None:
        corpus = open_source(cfg.images, image_column=cfg.image_column, id_column=cfg.id_column,
                             storage_options=cfg.storage_options, listed=not list_later)
        if isinstance(corpus, Source) and not corpus.counts:
            corpus.list_in_background()
    else:  # under torchrun: rank 0 alone lists a prefix for its identity and shares it
        from .distributed import open_shared

        corpus, owns_group = open_shared(cfg.images, image_column=cfg.image_column, id_column=cfg.id_column,
                                         storage_options=cfg.storage_options)
        if isinstance(corpus, Source) and not corpus.counts:  # each process lists its own units
            from .distributed import list_units

            owns_group = list_units(corpus) or owns_group
    try:
        return _prepared(cfg, corpus, dev, precision, targets, owns_group)
    except BaseException:
        if isinstance(corpus, Source):
            corpus.stop_listing()
        raise


def _prepared(cfg: DumpConfig, corpus: Corpus | Source, dev: torch.device, precision: str, targets: TargetSpec,
              owns_group: bool) -> DumpJob:
    t, pre, width = prepare_teacher(cfg.teacher, cfg.weights, cfg.arch_kwargs,
                                    {"size": cfg.size, "resize": cfg.resize, "mean": cfg.mean, "std": cfg.std,
                                     "mode": cfg.mode}, cfg.trust_modules, cfg.pretrained)
    names = class_names(t, cfg.classes, width)
    if cfg.views * width > schema.MAX_ROW_LOGITS:
        raise OptionError(f"--views {cfg.views} x {width} classes exceeds {schema.MAX_ROW_LOGITS} logits per image "
                          "(docs/FORMAT.md, R3); store fewer views, or --topk")
    spec = cfg.view_spec()
    try:
        targets.check(width)
    except LogitStoreError as exc:
        raise OptionError(f"--topk/--sample: {exc}") from None
    meta = StoreMeta(
        format_version=schema.version_for(targets, spec), complete=False, classes=tuple(names), preprocess=pre, views=spec,
        teacher=t.info, corpus=CorpusInfo(str(corpus.root), corpus.listing, corpus.listing_sha256(),
                                          corpus.n_listed, source=corpus.record()),
        dtype=cfg.dtype, precision=precision, seed=cfg.seed, chunk_rows=1, batch_size=cfg.batch_size,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), versions=_versions(),
        embedded_pixels=cfg.embed_images, keep_bits=cfg.keep_bits, targets=targets)
    row_bytes = sum(spec.count * last * np.dtype(d).itemsize for last, d in meta.target_arrays().values())
    row_bytes += sum(spec.count * int(np.prod(tail)) * np.dtype(d).itemsize  # 1.5 view arrays
                     for tail, d in schema.view_extra_arrays(spec).values())
    meta = replace(meta, chunk_rows=cfg.chunk_rows or schema.chunk_rows_for(row_bytes, spec.augmented))
    workers = min(8, os.cpu_count() or 1) if cfg.num_workers is None else cfg.num_workers
    return DumpJob(to_device(t.model, dev), corpus, meta, dev, workers, cfg.max_failure_share, owns_group)


def make_summary(job: DumpJob, out: str, meta: StoreMeta, resumed_rows: int, seconds: float, nbytes: int,
                 failures: list[tuple[str, str]], nothing_to_do: bool = False) -> DumpSummary:
    return DumpSummary(out=out, n_listed=job.corpus.n_listed, n_images=meta.corpus.n_images,
                       n_failed=meta.corpus.n_failed, views=meta.views.count, num_classes=meta.num_classes,
                       dtype=meta.dtype, precision=meta.precision, device=str(job.device),
                       chunk_rows=meta.chunk_rows, resumed_rows=resumed_rows, seconds=seconds,
                       bytes_on_disk=nbytes, failures=failures, nothing_to_do=nothing_to_do)


def _failures_only(failures: list[tuple[int, str, str]], v: int, views: ViewSpec | None = None) -> Rows:
    """Rows of a batch in which every image failed: none, and the reasons."""
    extras = {name: np.zeros((0, v, *tail), dtype)
              for name, (tail, dtype) in schema.view_extra_arrays(views).items()} if views is not None else {}
    return Rows(np.zeros(0, dtype=object), None, np.zeros((0, 32), np.uint8), np.zeros((0, 2), np.int32),
                np.zeros((0, v, 5), np.int32), source=np.zeros(0, np.int64), failures=failures,
                view_extras=extras or None)


def forward(model: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, pre: Preprocess,
             dev: torch.device, autocast: Any) -> torch.Tensor:
    """uint8 [B, V, C, H, W] -> float32 logits [B, V, classes] on the CPU."""
    b, v = pixels.shape[:2]
    # uint8 crosses to the device (4x fewer bytes than float); normalisation happens there.
    x = normalize(pixels.flatten(0, 1).to(dev, non_blocking=True), pre)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            if autocast is not None:
                with autocast:
                    out = model(x)
            else:
                out = model(x)
    except torch.cuda.OutOfMemoryError:
        raise TeacherError(f"the teacher ran out of {dev.type} memory on a batch of {len(x)} views; pass a smaller "
                           "--batch-size, then run the same command again (a dump resumes)") from None
    except Exception as exc:  # the teacher's own code: one line, the rows written so far are kept
        raise TeacherError(f"the teacher failed on a batch of {len(x)} views ({failure_text(exc)}); fix the teacher "
                           "or the flags, then run the same command again (a dump resumes)") from None
    if not isinstance(out, torch.Tensor) or out.shape[0] != len(x):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TeacherError(f"the teacher returned {got} for a batch of {len(x)} views, not one row of logits each")
    return out.float().cpu().view(b, v, -1)


def run_into(job: DumpJob, writer: StoreWriter, start: int, stop: int, bar: Any, task: Any,
             on_batch: Callable[[int], None] | None, saved: str, whole: bool = False) -> StoreMeta:
    """Run `job` over listing positions [start, stop) into `writer`, then close it: finalized when every
    batch went in; otherwise committed as far as it got (`saved` says where, for Ctrl-C's message)."""
    try:
        job.run(writer, start, stop, bar, task, on_batch, whole)
    except KeyboardInterrupt:
        writer.close(finalize=False)
        raise DumpInterrupted(f"interrupted: {saved.format(rows=writer.progress.rows)}; run the same command "
                              "again to resume") from None
    except BaseException:
        writer.close(finalize=False)
        raise
    return writer.close(finalize=True)
