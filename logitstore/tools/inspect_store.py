"""What a store holds (`info`) and whether it can be trusted (`verify`). Both stream chunk by chunk."""
from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from .. import schema
from ..sources import images_root, open_reader
from ..corpus import sha256_bytes
from ..errors import IntegrityError, OptionError
from ..fingerprint import RowHasher
from ..records import predictions  # noqa: F401  (re-exported: where it was)
from ..records import array_bytes, bin_of, coarse, contents_fingerprint, failures_by_reason, percentile, record_names
from ..locations import ROOT_KEY, get_bytes, stored_bytes, stray_keys
from ..schema import StoreMeta
from ..store import LogitStore


def store_bytes(store: LogitStore) -> dict[str, int]:
    """Stored (compressed) bytes per row array, from the store itself: local, zip or object storage."""
    return {name: stored_bytes(store.group.store, name) for name in store.arrays}


def other_bytes(store: LogitStore) -> int:
    """What the row arrays' sizes leave out, in a few keys however many rows: the root metadata, the chunk
    records, the failure arrays and added teachers' arrays (`dump` counts every file; so does this now)."""
    st = store.group.store
    total = len(get_bytes(st, ROOT_KEY) or b"")  # a key, not a prefix: getsize_prefix finds nothing under it
    for prefix in (schema.CHUNK_SHA256, *schema.FAILURE_ARRAYS, schema.TEACHERS):
        try:
            total += stored_bytes(st, prefix)
        except (OSError, ValueError, KeyError):  # not in this store
            continue
    return total


def info(store: LogitStore, top: int = 10) -> dict[str, Any]:
    """Metadata, counts, sizes and a summary of the teacher's predictions (first view of every image).

    A 1.4 store answers from the statistics its writer kept (no row is read; percentiles from a
    1000-bin histogram, so within 1/1000 of the range); older ones are read through once."""
    m = store.meta
    # A copy in flight carries its source's complete statistics over rows it does not have yet.
    kept = m.statistics if m.complete else None
    if kept is None and m.has_records and not m.complete:  # an unfinished 1.4 dump: its running counts
        p = store.group.attrs.get(schema.ATTR_PROGRESS) or {}
        if p.get(schema.STATISTICS) and int(p.get("rows", -1)) == len(store):
            kept = {**p[schema.STATISTICS], "failures_by_reason": failures_by_reason(store.failures())}
    usable = kept is not None and len(kept["top1_counts"]) == m.num_classes
    summary = _summary_from_statistics(kept, m) if usable else _summary_by_reading(store)
    failures = store.failures()
    sizes = (kept or {}).get("stored_bytes") if usable else None
    sizes = sizes if sizes and set(sizes) == set(store.arrays) else store_bytes(store)
    raw_logits = len(store) * m.views.count * m.num_classes * np.dtype(m.dtype).itemsize
    stored_logits = sum(sizes.get(name, 0) for name in m.target_arrays())  # sparse: against full logits
    n = max(1, len(store))
    on_disk = sum(sizes.values()) + other_bytes(store)
    hist = summary["top1"]
    return {
        "location": store.location, "format_version": m.format_version, "complete": m.complete,
        "images": len(store), "listed": m.corpus.n_listed, "failed": len(failures),
        "views": m.views.to_dict(), "num_classes": m.num_classes, "classes": list(m.classes),
        "dtype": m.dtype, "precision": m.precision, "seed": m.seed, "chunk_rows": m.chunk_rows,
        "teacher": m.teacher.to_dict(), "preprocess": m.preprocess.to_dict(), "corpus": m.corpus.to_dict(),
        "created": m.created, "versions": m.versions, "fingerprints": dict(m.fingerprints),
        "teachers": [{"name": "primary", "arch": m.teacher.arch, "fingerprint": m.fingerprints.get("teacher")}]
        + [{"name": t.name, "arch": t.teacher.arch, "logits_sha256": t.fingerprint} for t in m.extra_teachers],
        "embedded_pixels": m.embedded_pixels, "targets": m.targets.to_dict(),
        "bytes_on_disk": on_disk, "bytes_per_image": on_disk / n if sizes else None,
        "logits_raw_bytes": raw_logits,
        "logits_compression_ratio": raw_logits / stored_logits if stored_logits else None,
        "confidence": summary["confidence"],
        "entropy_nats": {**summary["entropy"], "max_possible": float(np.log(m.num_classes))},
        "top_classes": [{"class": m.classes[k], "count": int(v), "fraction": int(v) / n}
                        for k, v in sorted(((k, v) for k, v in enumerate(hist) if v), key=lambda kv: (-kv[1], kv[0]))[:top]],
        "class_histogram": {m.classes[k]: int(hist[k]) for k in range(m.num_classes)},
        "failures": [{"id": i, "reason": r} for i, r in failures[:20]],
        "confidence_histogram": {"edges": np.linspace(0.0, 1.0, 21).tolist(), "counts": coarse(summary["conf_bins"])},
        "entropy_histogram": {"edges": np.linspace(0.0, float(np.log(m.num_classes)), 21).tolist(),
                              "counts": coarse(summary["ent_bins"])},
        "teacher_agreement": summary["agreement"],
        "failures_by_reason": summary.get("failures_by_reason") or failures_by_reason(failures),
    }


def _summary_from_statistics(st: dict[str, Any], m: StoreMeta) -> dict[str, Any]:
    rows, ln_c = int(st["rows"]), float(np.log(m.num_classes))
    conf, ent = st["confidence_counts"], st["entropy_counts"]
    nan = float("nan")
    ent_known = st.get("entropy_sum_1e9") is not None and rows > 0
    return {
        "top1": list(st["top1_counts"]), "conf_bins": conf, "ent_bins": ent,
        "confidence": {"mean": st["confidence_sum_1e9"] / 1e9 / rows if rows else nan,
                       "p10": percentile(conf, 10, 1.0), "median": percentile(conf, 50, 1.0),
                       "p90": percentile(conf, 90, 1.0)},
        "entropy": {"mean": st["entropy_sum_1e9"] / 1e9 / rows if ent_known else nan,
                    "median": percentile(ent, 50, ln_c) if ent_known else nan},
        "agreement": [{"name": a["name"], "agreement": a["agree"] / rows if rows else nan}
                      for a in st.get("teacher_agreement") or []],
        "failures_by_reason": dict(st.get("failures_by_reason") or {}),
    }


def _summary_by_reading(store: LogitStore) -> dict[str, Any]:
    """Stores before 1.4: every chunk's first view read once."""
    m = store.meta
    conf, ent, hist = [], [], np.zeros(m.num_classes, np.int64)
    agree = {t.name: 0 for t in m.extra_teachers}
    for k, rows in store.iter_chunks():
        c, e, a = predictions(rows, m)
        conf.append(c)
        ent.append(e)
        hist += np.bincount(a, minlength=m.num_classes)[:m.num_classes]
        for name in agree:
            other = store.teacher_logits(name, *store.chunk_bounds(k))[:, 0].astype(np.float32).argmax(axis=1)
            agree[name] += int((other == rows.logits[:, 0].astype(np.float32).argmax(axis=1)).sum())
    conf_all = np.concatenate(conf) if conf else np.zeros(0)
    ent_all = np.concatenate(ent) if ent else np.zeros(0)

    def pct(a: np.ndarray, q: float) -> float:
        return float(np.percentile(a, q)) if a.size else float("nan")

    eb = bin_of(ent_all, float(np.log(m.num_classes)))
    return {
        "top1": hist.tolist(),
        "conf_bins": np.bincount(bin_of(conf_all, 1.0), minlength=schema.STAT_BINS).tolist(),
        "ent_bins": np.bincount(eb[eb >= 0], minlength=schema.STAT_BINS).tolist(),
        "confidence": {"mean": float(conf_all.mean()) if conf_all.size else float("nan"),
                       "p10": pct(conf_all, 10), "median": pct(conf_all, 50), "p90": pct(conf_all, 90)},
        "entropy": {"mean": float(ent_all.mean()) if ent_all.size else float("nan"), "median": pct(ent_all, 50)},
        "agreement": [{"name": name, "agreement": v / max(1, len(store))} for name, v in agree.items()],
    }


@dataclass
class VerifyReport:
    location: str
    rows: int = 0
    chunks: int = 0
    images_checked: int = 0          # images read and compared with their digests (--images)
    images_matched: int = 0          # of those, the images whose bytes have the stored digest
    stopped: bool = False            # max_problems reached: the rest of the store was not checked
    chunks_checked: int = 0          # chunks read (all of them unless `sample`)
    sample: float | None = None      # the fraction of chunks asked for (--sample), None: every chunk
    seed: int | None = None          # the sample's seed
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # harmless findings (an interrupted write's temporary files)

    @property
    def ok(self) -> bool:
        return not self.problems


def sample_chunks(n_chunks: int, fraction: float, seed: int) -> list[int]:
    """A seeded sample of ceil(fraction * n_chunks) chunks (at least one), in chunk order."""
    if not 0 < fraction <= 1:
        raise OptionError(f"--sample {fraction} must be a fraction in (0, 1]")
    m = min(n_chunks, max(1, math.ceil(fraction * n_chunks)))
    return sorted(np.random.default_rng(seed).choice(n_chunks, size=m, replace=False).tolist()) if n_chunks else []


def verify(store: LogitStore, images: str | None = None, max_problems: int = 50,
           allow_incomplete: bool = False, sample: float | None = None, seed: int = 0,
           workers: int | None = None, storage_options: dict[str, Any] | None = None) -> VerifyReport:
    """Read every chunk (checksums), check logits are finite, ids unique, and digests against `images`
    (the corpus wherever it lives: logitstore/sources.py; `storage_options` for a URL).

    1.4 stores: each chunk of each row array is also hashed and compared with its record, several
    chunks at once (`workers` threads), and the records with fingerprints.contents. `sample`: only a
    seeded random fraction of the chunks is read (what is then left unchecked is noted)."""
    rep = VerifyReport(store.location, rows=len(store), chunks=store.n_chunks, sample=sample,
                       seed=seed if sample is not None else None)
    stray = stray_keys(store.group.store)
    if stray:
        rep.notes.append(f"{len(stray)} temporary file(s) of an interrupted write (e.g. {stray[0]}) are not part "
                         "of the store; readers and copies ignore them, the next write into it removes them")
    chosen = list(range(store.n_chunks)) if sample is None else sample_chunks(store.n_chunks, sample, seed)
    if sample is not None:
        rep.notes.append(f"sampled {len(chosen)} of {store.n_chunks} chunks (seed {seed}): the corpus fingerprint, "
                         "ids unique across the store and added teachers' whole-array fingerprints are checked "
                         "only by a full verify")
    with _image_checker(store, images, storage_options) as check_images:
        if store.meta.has_records:
            _verify_records(store, rep, chosen, sample is None, check_images, max_problems, workers)
        else:
            _verify_by_reading(store, rep, chosen, sample is None, check_images, max_problems)
    if store.meta.complete:
        for name in schema.FAILURE_ARRAYS:
            try:
                store.group[name][:]
            except Exception as exc:
                rep.problems.append(f"{store.location}: array '{name}' cannot be read ({exc})")
    elif not allow_incomplete:
        rep.problems.append(f"{store.location}: the store is incomplete (rows checked: {len(store)})")
    return rep


def _stop(rep: VerifyReport, max_problems: int) -> None:
    """The first `max_problems` problems are listed (a window of chunks may find more at once), and the report
    says the rest of the store was not checked."""
    del rep.problems[max_problems:]
    rep.stopped = True
    rep.notes.append(f"stopped after {max_problems} problems: the chunks after them were not checked")


@contextmanager
def _image_checker(store: LogitStore, images: str | None, storage_options: dict[str, Any] | None) -> Iterator[Any]:
    """A function checking a chunk's images against their digests (None without `images`); the corpus
    reader (and its cache of remote units) is closed on exit."""
    if not images:
        yield None
        return
    root = images_root(images)
    reader = open_reader(root, store.meta.corpus.source, storage_options)

    def check(ids: Any, digests: np.ndarray, rep: VerifyReport) -> None:
        for image_id, digest, data in zip(ids, digests, reader.read_many([str(i) for i in ids])):
            path = f"{root.rstrip('/')}/{image_id}"
            if isinstance(data, BaseException):
                rep.problems.append(f"{path}: cannot be read ({getattr(data, 'strerror', None) or data})")
                continue
            rep.images_checked += 1
            if sha256_bytes(data) != digest.tobytes():
                rep.problems.append(f"{path}: its bytes differ from the digest stored when it was dumped")
            else:
                rep.images_matched += 1
    with reader:
        yield check


def _verify_records(store: LogitStore, rep: VerifyReport, chosen: list[int], full: bool, check_images: Any,
                    max_problems: int, workers: int | None) -> None:
    """1.4: every chosen chunk of every row array (and added teacher) against its record, in parallel;
    the records against fingerprints.contents; in a full pass the corpus fingerprint and unique ids."""
    m, loc = store.meta, store.location
    names = record_names(m)
    k_all = store.n_chunks
    try:
        records = store.group[schema.CHUNK_SHA256]
        recs = records[:k_all] if records.shape[0] >= k_all else None
    except Exception as exc:
        rep.problems.append(f"{loc}: array '{schema.CHUNK_SHA256}' cannot be read ({exc})")
        return
    if recs is None or records.shape[1:] != (len(names), 32):
        rep.problems.append(f"{loc}: array '{schema.CHUNK_SHA256}' has shape {records.shape}; "
                            f"[{k_all}, {len(names)}, 32] expected (docs/FORMAT.md, 1.4)")
        return
    if m.complete and contents_fingerprint(recs) != m.fingerprints.get("contents"):
        rep.problems.append(f"{loc}: the chunk records ('{schema.CHUNK_SHA256}') do not give the stored contents "
                            "fingerprint: the records or the metadata were altered after the store was written")
    extra = {}
    for t in m.extra_teachers:
        path = f"{schema.TEACHERS}/{t.name}/{schema.CHUNK_SHA256}"
        try:
            extra[t.name] = store.group[path][:k_all]
        except Exception:
            extra[t.name] = None  # added to an older store, or by an older logitstore: checked by fingerprint

    def check(k: int) -> tuple[int, list[str], Any, Any, dict[str, bytes]]:
        a, b = store.chunk_bounds(k)
        problems, got, stream = [], {}, {}
        for j, name in enumerate(names):
            try:
                got[name] = v = store.read_array(name, a, b)
            except IntegrityError as exc:
                problems.append((name, str(exc)))
                continue
            if hashlib.sha256(array_bytes(name, v)).digest() != recs[k, j].tobytes():
                problems.append((name, f"{loc}: array '{name}' chunk {k} (rows {a}-{b - 1}) differs from its record "
                                       f"in '{schema.CHUNK_SHA256}' (the store was altered after it was written, "
                                       "docs/FORMAT.md 1.4); restore it from its source"))
        for t in m.extra_teachers:
            try:
                lg = store.teacher_logits(t.name, a, b)
            except IntegrityError as exc:
                problems.append((t.name, str(exc)))
                continue
            data = array_bytes(schema.LOGITS, lg)
            if extra[t.name] is not None and hashlib.sha256(data).digest() != extra[t.name][k, 0].tobytes():
                problems.append((t.name, f"{loc}: teacher {t.name!r} chunk {k} (rows {a}-{b - 1}) differs from its "
                                         "record (the store was altered after it was written)"))
            if full:
                stream[t.name] = data
        ids = got.get(schema.IDS)
        first = ", ".join(repr(str(i)) for i in ids[:3]) if ids is not None else "unreadable"
        out = [f"{p} [chunk {k}, rows {a}-{b - 1}, first ids {first}]" if name != schema.IDS else p
               for name, p in problems]
        return k, out, ids, got.get(schema.DIGESTS), stream

    seen: set[str] = set()
    corpus, teachers = hashlib.sha256(), {t.name: hashlib.sha256() for t in m.extra_teachers}
    threads = workers or min(8, os.cpu_count() or 1)
    window = 4 * threads  # chunks in flight: bounded memory, results taken in chunk order
    with ThreadPoolExecutor(threads, thread_name_prefix="logitstore-verify") as pool:
        for w0 in range(0, len(chosen), window):
            for k, problems, ids, digests, stream in pool.map(check, chosen[w0:w0 + window]):
                rep.chunks_checked += 1
                rep.problems.extend(problems)
                if ids is not None:
                    for i in ids:
                        if i in seen:
                            rep.problems.append(f"{i}: id appears twice")
                        seen.add(i)
                    if digests is not None:
                        corpus.update(b"".join(str(i).encode("utf-8") + b"\0" + d.tobytes() for i, d in zip(ids, digests)))
                        if check_images is not None:
                            check_images(ids, digests, rep)
                for name, data in stream.items():
                    teachers[name].update(data)
            if len(rep.problems) >= max_problems:
                _stop(rep, max_problems)
                return
    if full and not rep.problems:
        if m.complete and "sha256:" + corpus.hexdigest() != m.fingerprints.get("corpus"):
            rep.problems.append(f"{loc}: corpus fingerprint differs from the stored {m.fingerprints.get('corpus')} "
                                "(the store was altered after it was written)")
        for t in m.extra_teachers:
            if "sha256:" + teachers[t.name].hexdigest() != t.fingerprint:
                rep.problems.append(f"{loc}: teacher {t.name!r} logits differ from their fingerprint")


def _verify_by_reading(store: LogitStore, rep: VerifyReport, chosen: list[int], full: bool, check_images: Any,
                       max_problems: int) -> None:
    """Stores before 1.4: each chosen chunk read in turn; the fingerprints recomputed in a full pass."""
    seen: set[str] = set()
    hasher = RowHasher()
    for k in chosen:
        rep.chunks_checked += 1
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
        if check_images is not None:
            check_images(rows.ids, rows.digests, rep)
        if len(rep.problems) >= max_problems:
            _stop(rep, max_problems)
            break
    if full and store.meta.complete and not rep.problems:
        got = hasher.result()
        for key, value in got.items():
            if store.meta.fingerprints.get(key) != value:
                rep.problems.append(f"{store.location}: {key} fingerprint {value} differs from the stored "
                                    f"{store.meta.fingerprints.get(key)} (the store was altered after it was written)")
    for extra in store.meta.extra_teachers if full else ():
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
