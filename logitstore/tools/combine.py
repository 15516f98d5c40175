"""Derived stores: merge corpora dumped by one teacher, and select a transfer set by the teacher's outputs."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .. import schema
from ..errors import MismatchError, OptionError
from ..schema import CorpusInfo, StoreMeta, compatibility_problem
from ..rows import Rows
from ..store import open_store
from ..writer import already_complete, open_writer


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _derived_meta(base: StoreMeta, n_rows: int, root: str, listing: str, listing_sha: str,
                  source: dict[str, Any] | None = None) -> StoreMeta:
    # Added teachers' arrays are not carried into derived stores, so they are not listed either.
    return replace(base, complete=False, fingerprints={}, format_version=schema.version_for(base.targets, base.views), extra_teachers=(),
                   statistics=None,  # its writer counts the rows it writes
                   corpus=CorpusInfo(root, listing, listing_sha, n_rows, source=source),
                   created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _write(out: str, meta: StoreMeta, batches: Iterable[Rows], overwrite: bool,
           storage_options: dict[str, Any] | None, sources: Sequence[str]) -> StoreMeta:
    """Write a derived store at `out` (never over one of its `sources`); a complete store that this
    very recipe made is left as it is."""
    done = None if overwrite else already_complete(out, meta, storage_options, sources)
    if done is not None:
        return done
    writer = open_writer(out, meta, overwrite=overwrite, storage_options=storage_options, protected=sources)
    if writer.progress.rows:  # derived stores are cheap to rebuild: start over rather than resume
        writer.close(finalize=False)
        writer = open_writer(out, meta, overwrite=True, storage_options=storage_options, protected=sources)
    try:
        for batch in batches:
            writer.submit(batch)
    except BaseException:
        writer.close(finalize=False)
        raise
    return writer.close(finalize=True)


def _batch(rows: Rows, keep: np.ndarray, first: int, ids: Sequence[str] | None = None,
           failures: list[tuple[int, str, str]] | None = None) -> Rows:
    """The kept rows, numbered from listing position `first`, renamed to `ids` when given."""
    out = rows.take(keep)
    n = len(out)
    out.source = np.arange(first, first + n, dtype=np.int64)
    out.failures = list(failures or [])
    if ids is not None:
        out.ids = np.array(list(ids), dtype=object)
    return out


@dataclass
class MergeReport:
    out: str
    rows: int
    dropped_duplicates: int
    sources: list[dict[str, Any]]


def merge(sources: Sequence[str], out: str, *, prefixes: Sequence[str] | None = None, dedupe: bool = False,
          overwrite: bool = False, storage_options: dict[str, Any] | None = None) -> MergeReport:
    """Concatenate stores dumped by the same teacher into one; ids become `prefix/id`.

    The default prefix is the name of each source's corpus folder, so when the corpora are
    sibling folders the merged ids are paths under their common parent and the images stay findable.
    """
    if len(sources) < 2:
        raise MismatchError("merge needs at least two stores")
    stores = [open_store(s, storage_options=storage_options) for s in sources]
    for s in stores[1:]:
        problem = compatibility_problem(stores[0].meta, s.meta)
        if problem:
            raise MismatchError(f"cannot merge {stores[0].location} and {s.location}: {problem}")
    names = list(prefixes) if prefixes else [PurePosixPath(s.meta.corpus.root).name or f"s{i}"
                                             for i, s in enumerate(stores)]
    if len(names) != len(stores) or len(set(names)) != len(names) or any("/" in p or not p for p in names):
        raise MismatchError(f"prefixes {names} must be one unique, non-empty folder name per store; "
                            "pass --prefix a,b,...")
    if dedupe and stores[0].meta.views.mix is not None:  # 1.5: partners are row offsets; plain merge keeps them
        raise MismatchError(f"merge --dedupe: {stores[0].location} stores mixed views (mixup/cutmix) whose partners "
                            "are row offsets, which dropping rows would break; merge without --dedupe")
    kinds = {str(s.meta.corpus.source) for s in stores}  # 1.4 row sources: ids are found the same way in all
    if len(kinds) > 1:
        named = sorted({"a folder or listing" if s.meta.corpus.source is None else
                        f"{s.meta.corpus.source.get('kind')} ({s.location})" for s in stores})
        raise MismatchError(f"cannot merge stores of different kinds of corpus ({', '.join(named)}); "
                            "merge stores dumped from the same kind (folders, shards, tables, URLs)")
    roots = [os.path.dirname(s.meta.corpus.root.rstrip("/")) for s in stores]
    sibling = all(r == roots[0] for r in roots) and names == [PurePosixPath(s.meta.corpus.root).name for s in stores]
    root = roots[0] if sibling else ""
    total = sum(len(s) for s in stores)
    seen: set[bytes] = set()
    dropped = 0

    def batches() -> Iterator[Rows]:
        nonlocal dropped
        written = 0
        for prefix, store in zip(names, stores):
            failures = [(0, f"{prefix}/{i}", r) for i, r in store.failures()]
            for _, rows in store.iter_chunks(checked=True):  # a derived store is made of rows that pass verify
                keep = np.ones(len(rows), dtype=bool)
                if dedupe:
                    for j, d in enumerate(rows.digests):
                        key = d.tobytes()
                        keep[j] = key not in seen
                        seen.add(key)
                    dropped += int((~keep).sum())
                ids = [f"{prefix}/{i}" for i in rows.ids[keep]]
                yield _batch(rows, keep, written, ids, failures)
                failures = []
                written += len(ids)

    # The recipe (sources, prefixes, dedupe) is the derived listing's identity: a re-run of the same
    # merge finds its store complete and has nothing to do; another recipe needs --overwrite.
    listing_sha = _sha256_text("merge:" + ",".join(s.meta.fingerprints["corpus"] for s in stores)
                               + f";prefixes={','.join(names)};dedupe={dedupe}")
    meta = _derived_meta(stores[0].meta, total, root, "merge", listing_sha, stores[0].meta.corpus.source)
    final = _write(out, meta, batches(), overwrite, storage_options, list(sources))
    return MergeReport(out, final.corpus.n_images, dropped,
                       [{"store": s.location, "prefix": p, "rows": len(s), "contents": s.meta.fingerprints["contents"]}
                        for s, p in zip(stores, names)])


def _probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Mean over views of softmax(logits / T), float64: [n, V, C] -> [n, C]."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    return p.mean(axis=1)


@dataclass
class SelectReport:
    out: str
    rows_in: int
    rows_out: int
    per_class: dict[str, int]


def select(source: str, out: str, *, min_confidence: float | None = None, max_entropy: float | None = None,
           per_class: int | None = None, limit: int | None = None, temperature: float = 1.0,
           overwrite: bool = False, storage_options: dict[str, Any] | None = None) -> SelectReport:
    """Keep the rows the teacher is sure enough about; optionally K per predicted class, at most `limit`.

    Confidence is the top probability and entropy is in nats, of the teacher's softmax at
    `temperature` averaged over the stored views. With --per-class the K most confident rows of
    each predicted class are kept; --limit then keeps the most confident overall. Rows keep their
    original order.
    """
    if temperature <= 0 or (per_class is not None and per_class < 1) or (limit is not None and limit < 1):
        raise OptionError("select: --temperature must be positive and --per-class, --limit at least 1")
    store = open_store(source, storage_options=storage_options)
    if store.meta.sparse:
        raise OptionError(f"select: {source} keeps {store.meta.targets.kind} targets; selecting by the "
                              "teacher's confidence needs a full-logits store")
    if store.meta.views.mix is not None:  # 1.5: partners are row offsets, which dropping rows would break
        raise OptionError(f"select: {source} stores mixed views (mixup/cutmix) whose partners are row offsets; "
                          "selecting rows would break them: dump the selected images again instead")
    conf, ent, arg = [], [], []
    for _, rows in store.iter_chunks():  # pass 1: three numbers per row, never the logits
        p = _probabilities(rows.logits, temperature)
        conf.append(p.max(axis=1))
        ent.append(-(p * np.log(np.clip(p, 1e-300, None))).sum(axis=1))
        arg.append(p.argmax(axis=1))
    conf_a, ent_a, arg_a = (np.concatenate(x) if x else np.zeros(0) for x in (conf, ent, arg))
    keep = np.ones(len(store), dtype=bool)
    if min_confidence is not None:
        keep &= conf_a >= min_confidence
    if max_entropy is not None:
        keep &= ent_a <= max_entropy
    if per_class is not None:
        chosen = np.zeros_like(keep)
        for c in range(store.meta.num_classes):
            idx = np.nonzero(keep & (arg_a == c))[0]
            chosen[idx[np.argsort(-conf_a[idx], kind="stable")[:per_class]]] = True
        keep = chosen
    if limit is not None and keep.sum() > limit:
        idx = np.nonzero(keep)[0]
        keep = np.zeros_like(keep)
        keep[idx[np.argsort(-conf_a[idx], kind="stable")[:limit]]] = True
    n_out = int(keep.sum())
    if n_out == 0:
        raise OptionError(f"select: no row of {source} meets the criteria; loosen --min-confidence, "
                              "--max-entropy or --per-class")

    def batches() -> Iterator[Rows]:
        written = 0
        for k, rows in store.iter_chunks(checked=True):  # pass 2: copy the chosen rows (checked), chunk by chunk
            a, b = store.chunk_bounds(k)
            sel = keep[a:b]
            if sel.any():
                yield _batch(rows, sel, written)
                written += int(sel.sum())

    m = store.meta
    recipe = f";min_confidence={min_confidence};max_entropy={max_entropy};per_class={per_class};limit={limit};T={temperature}"
    meta = _derived_meta(m, n_out, m.corpus.root, m.corpus.listing,
                         _sha256_text("select:" + m.fingerprints["contents"] + recipe), m.corpus.source)
    final = _write(out, meta, batches(), overwrite, storage_options, [source])
    counts = np.bincount(arg_a[keep].astype(np.int64), minlength=m.num_classes)
    return SelectReport(out, len(store), final.corpus.n_images,
                        {m.classes[c]: int(counts[c]) for c in range(m.num_classes)})
