"""Format 1.4 chunk records and statistics: what finalize, verify and info need, computed as rows are written.

A record is the SHA-256 of one chunk of rows (R = chunk_rows rows) of one row array, over its
decoded values (docs/FORMAT.md, "1.4: chunk records"); fingerprints.contents is the SHA-256 of all
records in order, so finalize never reads the rows back. Statistics are integer counts (and two
sums) of the first view's predictions, so a resumed or distributed write adds them up to the same
values as one uninterrupted run.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import schema
from .rows import Rows
from .schema import StoreMeta
from .sparse import topk_probabilities


# -- records ---------------------------------------------------------------------------------------
def array_bytes(name: str, values: np.ndarray) -> bytes | memoryview:
    """The bytes a record hashes: ids as UTF-8 each followed by 0x00, any other array little-endian, C order
    (a view of the array's own memory when it is that already: hashing needs no copy)."""
    if name == schema.IDS:
        return ids_bytes(values)
    if values.size == 0:
        return b""
    return memoryview(np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))).cast("B")


def row_values(rows: Rows, name: str) -> np.ndarray:
    """One row array's values in `rows`, by its name in the store."""
    if name == schema.IDS:
        return rows.ids
    if name in (schema.DIGESTS, schema.IMAGE_HW, schema.VIEW_PARAMS, schema.PIXELS):
        return getattr(rows, name)
    if rows.view_extras is not None and name in rows.view_extras:
        return rows.view_extras[name]
    return rows.target_arrays()[name]


def chunk_records(rows: Rows, names: Sequence[str], chunk_rows: int) -> np.ndarray:
    """[k, A, 32] uint8: the records of `rows`, which start on a chunk boundary, chunk by chunk."""
    k = -(-len(rows) // chunk_rows)
    out = np.zeros((k, len(names), 32), np.uint8)
    for j, name in enumerate(names):
        values = row_values(rows, name)
        for i in range(k):
            part = values[i * chunk_rows:(i + 1) * chunk_rows]
            out[i, j] = np.frombuffer(hashlib.sha256(array_bytes(name, part)).digest(), np.uint8)
    return out


def contents_fingerprint(records: np.ndarray) -> str:
    """fingerprints.contents of a 1.4 store: SHA-256 of its records [K, A, 32] in order."""
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(records, np.uint8).tobytes()).hexdigest()


def ids_bytes(ids: Sequence[Any]) -> bytes:
    """Each id as UTF-8 followed by 0x00, all in one string: one join and one encode (a Python loop per
    row held the GIL the zarr thread writing the same rows needs)."""
    return ("\0".join(map(str, ids)) + "\0").encode("utf-8") if len(ids) else b""


def corpus_entries(rows: Rows) -> bytes | memoryview:
    """What fingerprints.corpus hashes for these rows (every version): id UTF-8, 0x00, digest.

    Laid out with NumPy from one encoded string of the ids: runs of id bytes and of 32 digest bytes
    alternate, so one mask places both (2x faster than a join per row, which also held the GIL)."""
    n = len(rows)
    digests = rows.digests
    blob = ids_bytes(rows.ids)
    b = np.frombuffer(blob, np.uint8)
    ends = np.flatnonzero(b == 0)  # each id's 0x00
    if len(ends) != n or digests.dtype != np.uint8 or digests.shape[1:] != (32,):
        # an id holding 0x00 itself (no id does), or digests of another form: row by row
        return b"".join(str(i).encode("utf-8") + b"\0" + d.tobytes() for i, d in zip(rows.ids, digests))
    if n == 0:
        return b""
    runs = np.empty(2 * n, np.int64)
    runs[0::2], runs[1::2] = np.diff(ends, prepend=-1), 32  # id i with its 0x00, then digest i
    is_digest = np.repeat(np.tile(np.array([False, True]), n), runs)
    out = np.empty(len(b) + 32 * n, np.uint8)
    out[~is_digest] = b
    out[is_digest] = digests.reshape(-1)
    return memoryview(out)


# -- statistics ------------------------------------------------------------------------------------
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


# Rows of logits converted at a time: 128 x 1000 float32 (0.5 MB, twice) stay in the L2 cache; measured
# at 5.9 ms of CPU per 2048 x 1000 chunk against 13.6 ms for the whole chunk at once (float64: ~30 ms).
# (Whole 2048-row blocks, 16x fewer NumPy calls so fewer GIL hand-overs, cost 1.3 ms more CPU a chunk and
# left the statistics the longer of the two threads: benchmarks/RESULTS.md, "Where the 1.4 writer's CPU goes".)
STAT_BLOCK_ROWS = 128
# float16 -> float32 through torch (F16C: 0.65 ms a 2048 x 1000 chunk; NumPy's cast: 2.1 ms, one value at a
# time) in pieces of at most this many values: below torch's grain size (32,768), so no intra-op threads wake
# up beside zarr's. The conversion is exact either way, so the statistics keep their bits.
CONVERT_VALUES = 32_000


def first_view_predictions(rows: Rows, meta: StoreMeta) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top-1 probability, entropy in nats, top-1 class) of each row's first view, as `predictions`
    defines them; full logits in float32 from the logsumexp (this runs on every chunk a writer writes):
    confidence 1 / S and entropy log S - sum(e (z - max)) / S, with e = exp(z - max), S = sum(e)."""
    if meta.sparse:
        return predictions(rows, meta)
    z = rows.logits[:, 0, :]
    n, c = z.shape
    top, s, dot = np.empty(n, np.int64), np.empty(n), np.empty(n)
    x, e = np.empty((STAT_BLOCK_ROWS, c), np.float32), np.empty((STAT_BLOCK_ROWS, c), np.float32)
    at = np.arange(STAT_BLOCK_ROWS)
    convert = half_to_float(z, x)
    for a in range(0, n, STAT_BLOCK_ROWS):
        b = min(n, a + STAT_BLOCK_ROWS)
        xb, eb = x[:b - a], e[:b - a]
        convert(a, b)
        top[a:b] = t = xb.argmax(axis=1)
        np.subtract(xb, xb[at[:b - a], t][:, None], out=xb)
        np.exp(xb, out=eb)
        s[a:b] = eb.sum(axis=1, dtype=np.float64)
        dot[a:b] = np.einsum("ij,ij->i", eb, xb)
    return 1.0 / s, np.log(s) - dot / s, top


def half_to_float(z: np.ndarray, x: np.ndarray) -> Any:
    """convert(a, b): rows [a, b) of `z` into x[:b - a], exactly (float32 holds every float16 and float32 as is)."""
    if z.dtype != np.float16 or not z.flags.writeable:  # torch.from_numpy warns on read-only arrays
        return lambda a, b: np.copyto(x[:b - a], z[a:b], casting="same_kind")
    import torch

    zt, xt = torch.from_numpy(z), torch.from_numpy(x)
    step = max(1, CONVERT_VALUES // max(1, z.shape[1]))

    def convert(a: int, b: int) -> None:
        for i in range(a, b, step):
            j = min(b, i + step)
            xt[i - a:j - a].copy_(zt[i:j])
    return convert


def bin_of(values: np.ndarray, hi: float) -> np.ndarray:
    """Fine-histogram bin of each value in [0, hi] (clipped into it); NaN values get -1."""
    scaled = np.where(np.isfinite(values), values / hi if hi > 0 else 0.0, np.nan)
    bins = np.clip(np.floor(np.nan_to_num(scaled, nan=-1.0) * schema.STAT_BINS), 0, schema.STAT_BINS - 1)
    return np.where(np.isnan(scaled), -1, bins).astype(np.int64)


@dataclass
class Statistics:
    """Running counts over the rows written so far (the `statistics` attribute, less what finalize adds)."""

    num_classes: int
    rows: int = 0
    top1: np.ndarray = None  # type: ignore[assignment]
    conf: np.ndarray = None  # type: ignore[assignment]
    ent: np.ndarray = None   # type: ignore[assignment]
    conf_sum: int = 0          # sum of the top-1 probabilities, in units of 1e-9
    ent_sum: int | None = 0    # sum of the entropies, in units of 1e-9; None when unknown (sampled targets)
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    teacher_agreement: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.top1 = np.zeros(self.num_classes, np.int64) if self.top1 is None else np.asarray(self.top1, np.int64)
        self.conf = np.zeros(schema.STAT_BINS, np.int64) if self.conf is None else np.asarray(self.conf, np.int64)
        self.ent = np.zeros(schema.STAT_BINS, np.int64) if self.ent is None else np.asarray(self.ent, np.int64)

    def add(self, rows: Rows, meta: StoreMeta) -> None:
        if not len(rows):
            return
        conf, ent, top = first_view_predictions(rows, meta)
        ent = np.maximum(ent, 0.0)  # -1e-16 from rounding is 0 nats
        self.rows += len(rows)
        self.top1 += np.bincount(top, minlength=self.num_classes)[:self.num_classes]
        self.conf += np.bincount(bin_of(conf, 1.0), minlength=schema.STAT_BINS)
        b = bin_of(ent, math.log(self.num_classes))
        self.ent += np.bincount(b[b >= 0], minlength=schema.STAT_BINS)
        # Sums in whole units of 1e-9, row by row: integers add up alike in any grouping (a resumed
        # or distributed write records the very same numbers as one uninterrupted run).
        self.conf_sum += int(np.rint(conf * 1e9).astype(np.int64).sum())
        if self.ent_sum is not None:
            self.ent_sum = None if np.isnan(ent).any() else self.ent_sum + int(np.rint(ent * 1e9).astype(np.int64).sum())

    def merged(self, other: "Statistics") -> "Statistics":
        ent = None if self.ent_sum is None or other.ent_sum is None else self.ent_sum + other.ent_sum
        return Statistics(self.num_classes, self.rows + other.rows, self.top1 + other.top1, self.conf + other.conf,
                          self.ent + other.ent, self.conf_sum + other.conf_sum, ent)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "top1_counts": self.top1.tolist(), "confidence_counts": self.conf.tolist(),
                "entropy_counts": self.ent.tolist(), "confidence_sum_1e9": self.conf_sum, "entropy_sum_1e9": self.ent_sum,
                "failures_by_reason": dict(sorted(self.failures_by_reason.items())),
                "teacher_agreement": list(self.teacher_agreement)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, num_classes: int) -> "Statistics":
        if not d:
            return cls(num_classes)
        return cls(num_classes, int(d["rows"]), d["top1_counts"], d["confidence_counts"], d["entropy_counts"],
                   int(d["confidence_sum_1e9"]), None if d.get("entropy_sum_1e9") is None else int(d["entropy_sum_1e9"]),
                   dict(d.get("failures_by_reason") or {}), list(d.get("teacher_agreement") or []))


# What a reason names rather than what kind it is: a quoted path or key, a bare path, a number.
_SPECIFIC = re.compile(r"'[^']*'|\"[^\"]*\"|(?<![\w.])/[^\s:;,()]+|[^\s:;,()]+\.(?:jpe?g|png|bmp|webp|gif|tiff?)\b"
                       r"|(?<![\w.-])\d+\b", re.IGNORECASE)
MAX_REASONS = 50  # kinds of failure counted apart; the rest under OTHER_REASONS
OTHER_REASONS = "other reasons"


def reason_kind(reason: str) -> str:
    """A failure's reason less what it names ("sample 000000005 has no image member" and "No such file or
    directory: '/data/a.png'" count as one kind each), so a corpus with many failures has few reasons."""
    return _SPECIFIC.sub("…", str(reason))


def failures_by_reason(failures: Sequence[Sequence[str]]) -> dict[str, int]:
    """{kind of reason: count} (docs/FORMAT.md, statistics): the MAX_REASONS commonest kinds, the rest summed."""
    counts = Counter(reason_kind(f[1]) for f in failures).most_common()
    kept = dict(counts[:MAX_REASONS])
    rest = sum(n for _, n in counts[MAX_REASONS:])
    if rest:
        kept[OTHER_REASONS] = kept.get(OTHER_REASONS, 0) + rest
    return dict(sorted(kept.items()))


# -- what info reports from them -------------------------------------------------------------------
def coarse(counts: Sequence[int], bins: int = 20) -> list[int]:
    """The fine histogram summed into `bins` equal bins."""
    c = np.asarray(counts, np.int64)
    return c.reshape(bins, -1).sum(axis=1).tolist()


def percentile(counts: Sequence[int], q: float, hi: float) -> float:
    """The q-th percentile read from a fine histogram over [0, hi], linear within the bin (within hi / STAT_BINS)."""
    c = np.asarray(counts, np.float64)
    total = c.sum()
    if total == 0:
        return float("nan")
    target = q / 100 * total
    cum = np.cumsum(c)
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, len(c) - 1)
    before = cum[i] - c[i]
    frac = 0.0 if c[i] == 0 else (target - before) / c[i]
    return float((i + min(1.0, max(0.0, frac))) * hi / len(c))


@dataclass
class Written:
    """What a writer computed while it wrote rows [0, n): finalize needs nothing else."""

    records: np.ndarray        # [K, A, 32] uint8
    statistics: Statistics
    corpus: str                # fingerprints.corpus, "sha256:<hex>"


def record_names(meta: StoreMeta) -> tuple[str, ...]:
    """The row arrays a record covers, in record order (docs/FORMAT.md): the store's row arrays."""
    from .store import row_array_names

    return row_array_names(meta)


def corpus_hash_of(group: Any, n: int) -> "hashlib._Hash":
    """The corpus hash over rows [0, n) of a store being written, from its ids and digests alone (a few
    % of a row's bytes): how a resumed writer, or a distributed dump's assembly, takes it up."""
    from .chunk_io import read_strings

    h = hashlib.sha256()
    step = 1 << 16
    ids, digests = group[schema.IDS], group[schema.DIGESTS]
    for a in range(0, n, step):
        b = min(n, a + step)
        h.update(b"".join(str(i).encode("utf-8") + b"\0" + d.tobytes()
                          for i, d in zip(read_strings(ids, a, b), digests[a:b])))
    return h
