"""Add a second (third, ...) teacher to a complete store: same images, same stored views, its own logits.

Images are found by id under the corpus root and checked against the stored digest; ids that are
not there are matched by digest among all images under --images. Each stored view's crop and flip
is replayed through the new teacher's own preprocessing (its size, mean, std, mode).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .. import schema
from ..corpus import decode_image, list_corpus, sha256_bytes
from ..errors import CorpusError, IntegrityError, StoreStateError, TeacherError
from ..locations import StoreLock, open_group
from ..device import resolve_device, resolve_precision
from ..cli_common import progress_bar
from .job import check_logits, forward
from .load import prepare_teacher, read_classes, to_device
from ..schema import ExtraTeacher, Preprocess
from ..sources import SourceReader, images_root, is_url, open_reader
from ..store import LogitStore, open_store
from ..views import apply_view
from ..writer import chunk_codecs, logits_filters, round_lossy


@dataclass
class AddTeacherSummary:
    store: str
    name: str
    rows: int
    matched_by_digest: int
    seconds: float


class _Replay(Dataset):
    """Item = one store row: the stored views replayed through the new teacher's preprocessing."""

    def __init__(self, paths: list[Path] | list[str], digests: np.ndarray, params: np.ndarray, pre: Preprocess,
                 kind: str, reader: SourceReader | None = None):
        self.paths, self.digests, self.params, self.pre, self.kind = paths, digests, params, pre, kind
        self.reader = reader  # a corpus that is not loose local files: `paths` are the stored ids

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        data = self.paths[i].read_bytes() if self.reader is None else self.reader.read(str(self.paths[i]))
        if sha256_bytes(data) != self.digests[i].tobytes():
            raise IntegrityError(f"{self.paths[i]}: its bytes differ from the digest stored when it was dumped; "
                                 "pass --images with the original files")
        img = decode_image(data, self.pre.mode)
        return torch.stack([apply_view(img, p, self.pre, self.kind) for p in self.params[i]])


def _resolve_paths(store: LogitStore, images: str | None) -> tuple[list[Path], int]:
    root = Path(images or store.meta.corpus.root).expanduser()
    ids, digests = [], []
    for _, rows in store.iter_chunks():
        ids.extend(str(i) for i in rows.ids)
        digests.extend(d.tobytes() for d in rows.digests)
    paths = [root / i for i in ids]
    missing = [k for k, p in enumerate(paths) if not p.is_file()]
    if not missing:
        return paths, 0
    # Not where the ids say: look the images up by content among everything under --images.
    try:
        corpus = list_corpus(root)
    except CorpusError:
        raise CorpusError(f"{root}: {len(missing)} of the store's images are not there (first: {ids[missing[0]]}); "
                          "pass --images with a folder holding them") from None
    by_digest = {sha256_bytes(corpus.path(i).read_bytes()): corpus.path(i) for i in corpus.ids}
    for k in missing:
        found = by_digest.get(digests[k])
        if found is None:
            raise CorpusError(f"{ids[k]}: no image under {root} has its digest; pass --images with the "
                              "folder of the images that were dumped")
        paths[k] = found
    return paths, len(missing)


def _default_name(teacher: str) -> str:
    stem = Path(teacher).stem if ":" not in teacher else teacher.split(":", 1)[1]
    if teacher.startswith("hf:"):  # a directory: its own name
        stem = Path(stem).expanduser().resolve().name
    return re.sub(r"[^A-Za-z0-9_.-]", "-", stem)[:64] or "teacher2"


def add_teacher(store_path: str, teacher: str, *, name: str | None = None, images: str | None = None,
                weights: str | None = None, pretrained: bool = False, arch_kwargs: dict[str, Any] | None = None,
                device: str | None = None, precision: str = "auto", batch_size: int = 64,
                num_workers: int | None = None,
                size: tuple[int, int] | None = None, resize: int | None = None,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None, mode: str | None = None,
                classes: str | Sequence[str] | None = None, overwrite: bool = False,
                storage_options: dict[str, Any] | None = None, progress: bool = False,
                trust_modules: Sequence[str] = ()) -> AddTeacherSummary:
    store = open_store(store_path, storage_options=storage_options)
    meta = store.meta
    if meta.sparse:
        raise StoreStateError(f"{store_path} keeps {meta.targets.kind} targets; --add-teacher adds full logits "
                              "to full-logits stores only (dump the other teacher to its own store instead)")
    if meta.views.augmented:
        raise StoreStateError(f"{store_path} stores augmented views (format 1.5: augment, erasing or mix); "
                              "--add-teacher replays crops and flips only: dump the other teacher with the same "
                              "--seed and augmentation flags to its own store instead")
    name = name or _default_name(teacher)
    if not schema.TEACHER_NAME.match(name) or name == schema.PRIMARY_TEACHER:
        raise TeacherError(f"teacher name {name!r} must match {schema.TEACHER_NAME.pattern} and not be "
                           f"{schema.PRIMARY_TEACHER!r}; pass --teacher-name")
    if name in meta.teacher_names and not overwrite:
        raise StoreStateError(f"{store_path} already has a teacher {name!r}; pass --overwrite to replace it "
                              "or --teacher-name to add it under another name")
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    t, pre, width = prepare_teacher(teacher, weights, arch_kwargs,
                                    {"size": size, "resize": resize, "mean": mean, "std": std, "mode": mode},
                                    trust_modules, pretrained)
    model = to_device(t.model, dev)
    names = read_classes(classes) or t.classes or [str(i) for i in range(width)]
    if tuple(names) != meta.classes:
        what = ("the class order differs" if sorted(names) == sorted(meta.classes)
                else f"it has {width} outputs named {names[:5]}..., the store has {meta.num_classes} "
                     f"classes {list(meta.classes[:5])}...")
        raise TeacherError(f"{t.info.file} cannot join {store_path}: {what}; an ensemble needs the same class list")

    n = len(store)
    ids, digests, params = (store.read_array(a, 0, n) for a in (schema.IDS, schema.DIGESTS, schema.VIEW_PARAMS))
    root = images_root(images) if images else meta.corpus.root
    unit_dir = None
    if meta.corpus.source is not None or is_url(root):  # shards, tables, object storage: read by id
        paths, moved = [str(i) for i in ids], 0
        # One cache of fetched units for this process and its loader workers, removed at the end.
        unit_dir = tempfile.mkdtemp(prefix="logitstore-units-")
        ds = _Replay(paths, digests, params, pre, meta.views.kind,
                     open_reader(root, meta.corpus.source, storage_options, cache_dir=unit_dir))
    else:
        paths, moved = _resolve_paths(store, images)
        ds = _Replay(paths, digests, params, pre, meta.views.kind)
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, shuffle=False,
                        prefetch_factor=4 if workers else None)
    lock = StoreLock(store_path, exclusive=True)  # no other writer, and no fit reading it, meanwhile
    try:
        group = open_group(store_path, mode="a", storage_options=storage_options)
        if name in meta.teacher_names:  # overwrite: unlist first, so a half-written array is never listed
            meta = replace(meta, extra_teachers=tuple(e for e in meta.extra_teachers if e.name != name),
                           statistics=_without_agreement(meta.statistics, name))
            group.attrs[schema.ATTR_ROOT] = meta.sealed().to_dict()
        arr = group.create_array(f"{schema.TEACHERS}/{name}/{schema.LOGITS}", shape=store.logits.shape,
                                 chunks=store.logits.chunks, dtype=meta.dtype, fill_value=0,
                                 filters=logits_filters(meta.keep_bits), compressors=chunk_codecs(), overwrite=True)
        records = None
        if meta.has_records:  # 1.4: its chunks' records, as the dump writer keeps the row arrays'
            k = -(-len(store) // meta.chunk_rows)
            records = group.create_array(f"{schema.TEACHERS}/{name}/{schema.CHUNK_SHA256}", shape=(k, 1, 32),
                                         chunks=(schema.RECORDS_PER_CHUNK, 1, 32), dtype="uint8", fill_value=0,
                                         compressors=chunk_codecs(), overwrite=True)
        agree = 0
        autocast = (torch.autocast(dev.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                    if precision in ("bf16", "fp16") else None)
        np_dtype = np.dtype(meta.dtype)
        digest = hashlib.sha256()
        buffer: list[np.ndarray] = []
        written = seen = 0
        t0 = time.perf_counter()
        with progress_bar(progress) as bar:
            task = bar.add_task(f"teacher {name}", total=len(store))
            for pixels in loader:
                logits = forward(model, pixels, pre, dev, autocast)
                check_logits(logits.reshape(len(logits), -1), meta.dtype, list(ids[seen:seen + len(logits)]),
                              meta.keep_bits)
                seen += len(logits)
                stored = logits.numpy().astype(np_dtype)
                # Hashed and compared as stored: --keep-bits rounds on the way in.
                buffer.append(stored if meta.keep_bits is None else round_lossy(stored, meta.keep_bits))
                # Whole chunks only, as the dump writer does.
                while buffer and (seen - written >= meta.chunk_rows or seen == len(store)):
                    block = np.concatenate(buffer)
                    n = min(meta.chunk_rows, len(block))
                    arr[written:written + n] = block[:n]
                    chunk = np.ascontiguousarray(block[:n], dtype=np_dtype.newbyteorder("<")).tobytes()
                    digest.update(chunk)
                    if records is not None:
                        records[written // meta.chunk_rows] = np.frombuffer(hashlib.sha256(chunk).digest(),
                                                                            np.uint8)[None]
                        primary = store.teacher_logits(schema.PRIMARY_TEACHER, written, written + n)[:, 0]
                        agree += int((primary.astype(np.float32).argmax(axis=1)
                                      == block[:n, 0].astype(np.float32).argmax(axis=1)).sum())
                    written += n
                    buffer = [block[n:]] if n < len(block) else []
                bar.advance(task, len(logits))
        extra = ExtraTeacher(name, t.info, pre, precision, "sha256:" + digest.hexdigest())
        meta = replace(meta, extra_teachers=(*meta.extra_teachers, extra))
        if meta.statistics is not None:
            stats = _without_agreement(meta.statistics, name)
            meta = replace(meta, statistics={**stats, "teacher_agreement": [*stats["teacher_agreement"],
                                                                             {"name": name, "agree": agree}]})
        group.attrs[schema.ATTR_ROOT] = meta.sealed().to_dict()  # listing the teacher is the last write
    finally:
        lock.release()
        if ds.reader is not None:
            ds.reader.close()
        if unit_dir is not None:
            shutil.rmtree(unit_dir, ignore_errors=True)
    return AddTeacherSummary(store_path, name, written, moved, time.perf_counter() - t0)


def _without_agreement(statistics: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    """The 1.4 statistics without teacher `name`'s agreement (it is being replaced)."""
    if statistics is None:
        return None
    return {**statistics, "teacher_agreement": [a for a in statistics.get("teacher_agreement", [])
                                                if a["name"] != name]}
