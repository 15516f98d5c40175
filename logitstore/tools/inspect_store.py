"""What a store holds (`info`) and whether it can be trusted (`verify`). Both stream chunk by chunk."""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import schema
from ..sources import images_root, open_reader
from ..corpus import sha256_bytes
from ..errors import IntegrityError
from ..fingerprint import RowHasher
from ..locations import stored_bytes, stray_keys
from ..schema import StoreMeta
from ..sparse import topk_probabilities
from ..rows import Rows
from ..store import LogitStore


def predictions(rows: Rows, meta: StoreMeta) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top-1 probability, entropy in nats, top-1 class) of each row's first view.

    Full logits: at T = 1. Top-K: exact top-1 and probability at the lowest stored temperature;
    the entropy counts the tail as one class (a lower bound). Sampled: the drawn class with the
    largest logit (the top-1 whenever it was drawn) with its exact probability; entropy unknown (NaN).
    """
    t = meta.targets
    if t.kind == schema.TARGET_TOPK:
        log_p, log_tail = topk_probabilities(rows.targets[schema.TOPK_VALUES][:, 0],
                                             rows.targets[schema.TAIL_LSE][:, 0, 0], t.temperatures[0])
        p = np.exp(np.concatenate([log_p, log_tail[:, None]], axis=1))
        ent = -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=1)
        return p[:, 0], ent, rows.targets[schema.TOPK_INDICES][:, 0, 0].astype(np.int64)
    if t.kind == schema.TARGET_SAMPLE:
        z = np.where(rows.targets[schema.SAMPLE_COUNTS][:, 0] > 0,
                     rows.targets[schema.SAMPLE_LOGITS][:, 0].astype(np.float64), -np.inf)
        j = z.argmax(axis=1)
        conf = np.exp(z[np.arange(len(z)), j] / t.temperatures[0] - rows.targets[schema.LSE][:, 0, 0])
        top = rows.targets[schema.SAMPLE_INDICES][:, 0][np.arange(len(z)), j].astype(np.int64)
        return conf, np.full(len(z), np.nan), top
    z = rows.logits[:, 0, :].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    ent = -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=1)
    return p.max(axis=1), ent, p.argmax(axis=1)


def store_bytes(store: LogitStore) -> dict[str, int]:
    """Stored (compressed) bytes per row array, from the store itself: local, zip or object storage."""
    return {name: stored_bytes(store.group.store, name) for name in store.arrays}


def info(store: LogitStore, top: int = 10) -> dict[str, Any]:
    """Metadata, counts, sizes and a summary of the teacher's predictions (first view of every image)."""
    m = store.meta
    conf, ent, hist = [], [], Counter()
    for _, rows in store.iter_chunks():
        c, e, a = predictions(rows, m)
        conf.append(c)
        ent.append(e)
        hist.update(a.tolist())
    conf_all = np.concatenate(conf) if conf else np.zeros(0)
    ent_all = np.concatenate(ent) if ent else np.zeros(0)
    sizes = store_bytes(store)
    raw_logits = len(store) * m.views.count * m.num_classes * np.dtype(m.dtype).itemsize
    stored_logits = sum(sizes.get(name, 0) for name in m.target_arrays())  # sparse: against full logits
    n = max(1, len(store))

    def pct(a: np.ndarray, q: float) -> float:
        return float(np.percentile(a, q)) if a.size else float("nan")

    return {
        "location": store.location, "format_version": m.format_version, "complete": m.complete,
        "images": len(store), "listed": m.corpus.n_listed, "failed": len(store.failures()),
        "views": m.views.to_dict(), "num_classes": m.num_classes, "classes": list(m.classes),
        "dtype": m.dtype, "precision": m.precision, "seed": m.seed, "chunk_rows": m.chunk_rows,
        "teacher": m.teacher.to_dict(), "preprocess": m.preprocess.to_dict(), "corpus": m.corpus.to_dict(),
        "created": m.created, "versions": m.versions, "fingerprints": dict(m.fingerprints),
        "teachers": [{"name": "primary", "arch": m.teacher.arch, "fingerprint": m.fingerprints.get("teacher")}]
        + [{"name": t.name, "arch": t.teacher.arch, "logits_sha256": t.fingerprint} for t in m.extra_teachers],
        "embedded_pixels": m.embedded_pixels, "targets": m.targets.to_dict(),
        "bytes_on_disk": sum(sizes.values()), "bytes_per_image": sum(sizes.values()) / n if sizes else None,
        "logits_raw_bytes": raw_logits,
        "logits_compression_ratio": raw_logits / stored_logits if stored_logits else None,
        "confidence": {"mean": float(conf_all.mean()) if conf_all.size else float("nan"),
                       "p10": pct(conf_all, 10), "median": pct(conf_all, 50), "p90": pct(conf_all, 90)},
        "entropy_nats": {"mean": float(ent_all.mean()) if ent_all.size else float("nan"),
                         "median": pct(ent_all, 50), "max_possible": float(np.log(m.num_classes))},
        "top_classes": [{"class": m.classes[k], "count": v, "fraction": v / n} for k, v in hist.most_common(top)],
        "class_histogram": {m.classes[k]: int(hist.get(k, 0)) for k in range(m.num_classes)},
        "failures": [{"id": i, "reason": r} for i, r in store.failures()[:20]],
    }


@dataclass
class VerifyReport:
    location: str
    rows: int = 0
    chunks: int = 0
    images_checked: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # harmless findings (an interrupted write's temporary files)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(store: LogitStore, images: str | None = None, max_problems: int = 50,
           allow_incomplete: bool = False, storage_options: dict[str, Any] | None = None) -> VerifyReport:
    """Read every chunk (checksums), check logits are finite, ids unique, and digests against `images`
    (the corpus wherever it lives: logitstore/sources.py; `storage_options` for a URL)."""
    rep = VerifyReport(store.location, rows=len(store))
    stray = stray_keys(store.group.store)
    if stray:
        rep.notes.append(f"{len(stray)} temporary file(s) of an interrupted write (e.g. {stray[0]}) are not part "
                         "of the store; readers and copies ignore them, the next write into it removes them")
    root = images_root(images) if images else None
    reader = open_reader(root, store.meta.corpus.source, storage_options) if root is not None else None
    seen: set[str] = set()
    hasher = RowHasher()
    for k in range(store.n_chunks):
        rep.chunks += 1
        try:
            rows = store.read_chunk(k)
        except IntegrityError as exc:
            rep.problems.append(str(exc))
            continue
        hasher.update(rows)
        for name, arr in (rows.targets or {schema.LOGITS: rows.logits}).items():
            if arr.dtype.kind != "f":
                continue
            bad = ~np.isfinite(arr.astype(np.float32)).reshape(len(rows), -1).all(axis=1)
            for i in np.nonzero(bad)[0][:5]:
                rep.problems.append(f"{rows.ids[i]}: {name} are NaN or inf")
        for i in rows.ids:
            if i in seen:
                rep.problems.append(f"{i}: id appears twice")
            seen.add(i)
        if root is not None:
            for image_id, digest, data in zip(rows.ids, rows.digests, reader.read_many([str(i) for i in rows.ids])):
                path = f"{root.rstrip('/')}/{image_id}"
                if isinstance(data, BaseException):
                    rep.problems.append(f"{path}: cannot be read ({getattr(data, 'strerror', None) or data})")
                    continue
                ok = sha256_bytes(data) == digest.tobytes()
                rep.images_checked += 1
                if not ok:
                    rep.problems.append(f"{path}: its bytes differ from the digest stored when it was dumped")
        if len(rep.problems) >= max_problems:
            rep.problems.append(f"stopped after {max_problems} problems")
            break
    if store.meta.complete and not rep.problems:
        got = hasher.result()
        for key, value in got.items():
            if store.meta.fingerprints.get(key) != value:
                rep.problems.append(f"{store.location}: {key} fingerprint {value} differs from the stored "
                                    f"{store.meta.fingerprints.get(key)} (the store was altered after it was written)")
    for extra in store.meta.extra_teachers:
        h = hashlib.sha256()
        try:
            for k in range(store.n_chunks):
                lg = store.teacher_logits(extra.name, *store.chunk_bounds(k))
                h.update(np.ascontiguousarray(lg, dtype=lg.dtype.newbyteorder("<")).tobytes())
        except IntegrityError as exc:
            rep.problems.append(str(exc))
            continue
        if "sha256:" + h.hexdigest() != extra.fingerprint:
            rep.problems.append(f"{store.location}: teacher {extra.name!r} logits differ from their fingerprint")
    if store.meta.complete:
        for name in schema.FAILURE_ARRAYS:
            try:
                store.group[name][:]
            except Exception as exc:
                rep.problems.append(f"{store.location}: array '{name}' cannot be read ({exc})")
    elif not allow_incomplete:
        rep.problems.append(f"{store.location}: the store is incomplete (rows checked: {len(store)})")
    return rep
