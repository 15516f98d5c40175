"""Open a store read-only (a path, a .zip, or an fsspec URL), validate it against the schema, read rows."""
from __future__ import annotations

import os
import warnings
from typing import Any, Iterator

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from . import schema
from .chunk_io import read_strings
from .errors import FormatError, IntegrityError, StoreStateError
from .locations import crc32c_ok, get_bytes, known_zarr_warnings_silenced, list_all_keys, open_group
from .rows import Rows
from .schema import StoreMeta



# iter_chunks reads up to this many chunks at once: zarr decodes the chunks of one read concurrently
# (Zstd in its thread pool), so a fingerprint or a copy runs on every core; a read stays under
# ITER_READ_BYTES of decoded rows (embedded pixels can make one chunk of rows hundreds of MB).
CHUNKS_PER_READ = 4
ITER_READ_BYTES = 64 << 20


def row_nbytes(arrays: dict[str, zarr.Array]) -> int:
    """Decoded bytes of one row across `arrays` (a string counted as 16 bytes)."""
    return sum(int(np.prod(arr.shape[1:])) * arr.dtype.itemsize for arr in arrays.values())


def row_array_names(meta: StoreMeta) -> tuple[str, ...]:
    """Every array with one entry per row: the teacher's targets first, then ids, digests, sizes, views."""
    names = (*meta.target_arrays(), *schema.ROW_ARRAYS[1:], *schema.view_extra_arrays(meta.views))
    return (*names, schema.PIXELS) if meta.embedded_pixels else names


class LogitStore:
    """A validated, read-only view of a store. Use `open_store`."""

    def __init__(self, location: str, group: zarr.Group, meta: StoreMeta, rows: int):
        self.location, self.group, self.meta, self._rows = location, group, meta, rows
        self.arrays = {name: array_of(location, group, name) for name in row_array_names(meta)}
        # Size checks came with 1.3 (R6); older stores, synthetic golden ones included, read as before.
        self._sizes_checked = schema.parse_version(meta.format_version) >= schema.SIZES_CHECKED_SINCE

    def __len__(self) -> int:
        return self._rows

    def __repr__(self) -> str:
        state = "complete" if self.meta.complete else "INCOMPLETE"
        return (f"LogitStore({self.location!r}, {len(self)} images x {self.meta.views.count} views x "
                f"{self.meta.num_classes} classes, {self.meta.dtype}, {state})")

    def head(self, n: int) -> "LogitStore":
        """The first n rows, read as a store of their own (a transfer-set size sweep on one dump)."""
        if not 0 < n <= len(self):
            raise IndexError(f"head({n}): the store has {len(self)} rows")
        return LogitStore(self.location, self.group, self.meta, n)

    @property
    def logits(self) -> zarr.Array:
        if self.meta.sparse:
            raise StoreStateError(f"{self.location} stores {self.meta.targets.kind} targets, not full logits; "
                                  "read them with read() (Rows.targets)")
        return self.arrays[schema.LOGITS]

    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes)

    @property
    def chunk_rows(self) -> int:
        return self.meta.chunk_rows

    @property
    def n_chunks(self) -> int:
        return -(-len(self) // self.chunk_rows)

    def chunk_bounds(self, k: int) -> tuple[int, int]:
        a = k * self.chunk_rows
        return a, min(len(self), a + self.chunk_rows)

    def __getitem__(self, index: slice | int) -> Rows:
        if isinstance(index, int):
            i = index + len(self) if index < 0 else index
            if not 0 <= i < len(self):
                raise IndexError(f"row {index} out of range for {len(self)} rows")
            index = slice(i, i + 1)
        a, b, step = index.indices(len(self))
        if step != 1:
            raise IndexError("store slices must be contiguous (step 1)")
        return self.read(a, b)

    def read_array(self, name: str, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of one row array (or `teachers/<name>/logits`) by name; R6 as in `read`."""
        arr = self.arrays.get(name)
        return self._read_array(name, array_of(self.location, self.group, name) if arr is None else arr, a, b)

    def _read_array(self, name: str, arr: zarr.Array, a: int, b: int) -> np.ndarray:
        try:
            values = arr[a:b] if arr.dtype.kind in "biuf" else read_strings(arr, a, b)  # ids: counts checked first
        except OSError:
            raise  # the storage failed (a network, a disk): not the store's bytes
        except Exception as exc:
            bad = self._failing_chunks(arr, a, b)
            if not bad:  # the checksums hold, yet the bytes do not decode as this array's: not its chunk
                raise IntegrityError(f"{self.location}: array '{name}' rows {a}-{b - 1} do not decode "
                                     f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}), though their "
                                     "checksums hold: chunks were moved or the array's metadata changed; restore "
                                     "the store from its source (docs/FORMAT.md, R6)") from None
        else:
            if arr.dtype.kind == "f" and not np.isfinite(values).all():
                self._refuse_non_finite(name, values, a, arr.chunks[0])
            if name in _AUGMENTED and len(values):
                problem = _augmented_problem(name, values, self.meta, a, arr.shape[0])
                if problem:
                    raise IntegrityError(f"{self.location}: array '{name}' rows {a}-{b - 1} {problem} (docs/FORMAT.md, "
                                         "1.5: augmented views): restore the store from its source")
            if name in _SIZES and self._sizes_checked and len(values) and not _sizes_ok(name, values):
                raise IntegrityError(f"{self.location}: array '{name}' rows {a}-{b - 1} hold impossible image or "
                                     "view sizes (a height or width below 1, a negative offset, a flip not 0 or 1; "
                                     "docs/FORMAT.md, R6): restore the store from its source")
            return values
        rows = arr.chunks[0]
        last = max(len(self), b) - 1  # the store's last row: a chunk past it holds only padding
        where = ", ".join(f"{k} (rows {k * rows}-{min((k + 1) * rows - 1, last)}, '{key}')" for k, key in bad[:5])
        raise IntegrityError(f"{self.location}: array '{name}' chunk(s) {where} fail their CRC32C checksum "
                             "(corrupted bytes, docs/FORMAT.md R6); restore the store from its source or re-run "
                             "the dump")

    def _refuse_non_finite(self, name: str, values: np.ndarray, a: int, rows: int) -> None:
        bad = a + int(np.nonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))[0][0])
        raise IntegrityError(f"{self.location}: array '{name}' holds NaN or inf at row {bad} (chunk {bad // rows}, "
                             "id " + repr(str(self.read_array(schema.IDS, bad, bad + 1)[0])) + "); a teacher's outputs must be finite "
                             "(docs/FORMAT.md, R6): the store was altered or written by a broken tool, restore it "
                             "from its source or re-run the dump")

    def _failing_chunks(self, arr: zarr.Array, a: int, b: int) -> list[tuple[int, str]]:
        """(k, key) of the chunks of rows [a, b) whose stored bytes fail their CRC32C: computed on the
        raw bytes, so corruption is told from any other failure by the checksum itself."""
        rows, tail = arr.chunks[0], (0,) * (arr.ndim - 1)
        bad = []
        for k in range(a // rows, (max(a, b - 1) // rows) + 1):
            key = f"{arr.path}/{arr.metadata.encode_chunk_key((k, *tail))}"
            data = get_bytes(self.group.store, key)
            if data is not None and not crc32c_ok(data):
                bad.append((k, key))
        return bad

    def read(self, a: int, b: int, pixels: bool = True) -> Rows:
        """Rows [a, b); a failed checksum raises IntegrityError naming the array and chunk."""
        out = {name: self._read_array(name, arr, a, b) for name, arr in self.arrays.items()
               if pixels or name != schema.PIXELS}
        targets = {name: out[name] for name in self.meta.target_arrays()} if self.meta.sparse else None
        extras = {name: out[name] for name in schema.view_extra_arrays(self.meta.views) if name in out} or None
        return Rows(np.asarray(out[schema.IDS], dtype=object), out.get(schema.LOGITS), out[schema.DIGESTS],
                    out[schema.IMAGE_HW], out[schema.VIEW_PARAMS], out.get(schema.PIXELS), targets,
                    view_extras=extras)

    @property
    def teacher_names(self) -> list[str]:
        """"primary" (the `logits` array) and the names of teachers added later."""
        return self.meta.teacher_names

    def teacher_logits(self, name: str, a: int, b: int) -> np.ndarray:
        """[b - a, V, C] logits of one teacher by name."""
        if name == schema.PRIMARY_TEACHER:
            return self._read_array(schema.LOGITS, self.logits, a, b)
        if name not in self.teacher_names:
            raise StoreStateError(f"{self.location} has no teacher {name!r}; it has {', '.join(self.teacher_names)}")
        path = f"{schema.TEACHERS}/{name}/{schema.LOGITS}"
        if path not in self.arrays:  # opened once: on an object store each open is a request
            self.arrays[path] = array_of(self.location, self.group, path)
        return self._read_array(path, self.arrays[path], a, b)

    def read_chunk(self, k: int) -> Rows:
        return self.read(*self.chunk_bounds(k))

    def iter_chunks(self, checked: bool = False) -> Iterator[tuple[int, Rows]]:
        """(k, rows of chunk k) in chunk order, read several chunks at a time. `checked` (a 1.4 store): each chunk
        against its records, and the records against fingerprints.contents, as verify does, so that a store
        derived from these rows (merge, select) is never made from rows that fail verify."""
        records = self._checked_records() if checked and self.meta.has_records else None
        per_read = max(1, min(CHUNKS_PER_READ, ITER_READ_BYTES // max(1, row_nbytes(self.arrays) * self.chunk_rows)))
        for k0 in range(0, self.n_chunks, per_read):
            k1 = min(self.n_chunks, k0 + per_read)
            a, b = self.chunk_bounds(k0)[0], self.chunk_bounds(k1 - 1)[1]
            rows = self.read(a, b)
            for k in range(k0, k1):
                lo, hi = self.chunk_bounds(k)
                part = rows.slice(lo - a, hi - a)
                if records is not None:
                    self._check_chunk(k, part, records[k])
                yield k, part

    def _checked_records(self) -> np.ndarray:
        from .records import contents_fingerprint, record_names

        records = self.read_array(schema.CHUNK_SHA256, 0, self.n_chunks)
        if records.shape != (self.n_chunks, len(record_names(self.meta)), 32) or (
                self.meta.complete and contents_fingerprint(records) != self.meta.fingerprints.get("contents")):
            raise IntegrityError(f"{self.location}: the chunk records ('{schema.CHUNK_SHA256}') do not give the stored "
                                 "contents fingerprint: the store was altered after it was written (docs/FORMAT.md, "
                                 "1.4); restore it from its source")
        return records

    def _check_chunk(self, k: int, rows: Rows, records: np.ndarray) -> None:
        from .records import chunk_records, record_names

        names = record_names(self.meta)
        got = chunk_records(rows, names, max(1, len(rows)))[0]
        for j in np.nonzero((got != records).any(axis=1))[0][:1]:
            a, b = self.chunk_bounds(k)
            raise IntegrityError(f"{self.location}: array '{names[j]}' chunk {k} (rows {a}-{b - 1}) differs from its "
                                 f"record in '{schema.CHUNK_SHA256}' (the store was altered after it was written, "
                                 "docs/FORMAT.md 1.4); restore it from its source")

    def failures(self) -> list[tuple[str, str]]:
        if self.meta.complete:
            ids, reasons = (self.read_array(name, 0, array_of(self.location, self.group, name).shape[0])
                            for name in (schema.FAILED_IDS, schema.FAILED_REASONS))
            return [(str(i), str(r)) for i, r in zip(ids, reasons)]
        progress = self.group.attrs.get(schema.ATTR_PROGRESS) or {}
        if schema.PROGRESS_N_FAILURES in progress:  # 1.4: the failure arrays grow as the dump goes
            n = int(progress[schema.PROGRESS_N_FAILURES])
            ids, reasons = (self.read_array(name, 0, n) for name in (schema.FAILED_IDS, schema.FAILED_REASONS))
            return [(str(i), str(r)) for i, r in zip(ids, reasons)]
        return [(str(i), str(r)) for i, r in progress.get("failures", [])]


def _require_checksum(location: str, name: str, arr: zarr.Array) -> None:
    if not any(isinstance(cd, Crc32cCodec) for cd in arr.metadata.codecs):
        raise FormatError(f"{location}: array '{name}' has no crc32c codec; docs/FORMAT.md R5 requires a checksum "
                          "on every chunk")


def _validate_arrays(location: str, group: zarr.Group, meta: StoreMeta) -> None:
    v, r = meta.views.count, meta.chunk_rows
    expected = {
        **{name: ((v, last), (r, v, last), (dtype,)) for name, (last, dtype) in meta.target_arrays().items()},
        schema.IDS: ((), (r,), ("string", "str", "<U0", "StringDType()")),
        schema.DIGESTS: ((32,), (r, 32), ("uint8",)),
        schema.IMAGE_HW: ((2,), (r, 2), ("int32",)),
        schema.VIEW_PARAMS: ((v, 5), (r, v, 5), ("int32",)),
        **{name: ((v, *tail), (r, v, *tail), (dtype,)) for name, (tail, dtype) in schema.view_extra_arrays(meta.views).items()},
    }
    if meta.embedded_pixels:
        pre = meta.preprocess
        tail = (v, pre.channels, *pre.size)
        expected[schema.PIXELS] = (tail, (meta.pixel_chunk_rows, *tail), ("uint8",))
    names = array_names(location, group)
    n = None
    for name, (tail, chunks, dtypes) in expected.items():
        if name not in names:
            raise FormatError(f"{location}: required array '{name}' is missing (docs/FORMAT.md, R5)")
        arr = array_of(location, group, name)
        if tuple(arr.shape[1:]) != tail or tuple(arr.chunks) != chunks:
            raise FormatError(f"{location}: array '{name}' has shape {arr.shape} chunks {arr.chunks}; "
                              f"the spec requires [N, {', '.join(map(str, tail))}] chunked {chunks}")
        if name != schema.IDS and str(arr.dtype) not in dtypes:
            raise FormatError(f"{location}: array '{name}' has dtype {arr.dtype}; docs/FORMAT.md R5 requires {dtypes[0]}")
        _require_checksum(location, name, arr)
        if n is not None and arr.shape[0] != n:
            raise FormatError(f"{location}: array '{name}' has {arr.shape[0]} rows, others have {n} (docs/FORMAT.md, R5)")
        n = arr.shape[0]


_SIZES = (schema.IMAGE_HW, schema.VIEW_PARAMS)
_AUGMENTED = (schema.AUGMENT_OPS, schema.ERASE_BOXES, schema.MIX_PARAMS, schema.MIX_LAMBDA)


def _augmented_problem(name: str, values: np.ndarray, meta: StoreMeta, a: int, n: int) -> str | None:
    """What is impossible in a 1.5 view array (an op the policy does not list, a box outside the input,
    a lambda outside [0, 1], a partner outside its mix group or the store's n rows) of rows a.., or None;
    a replay would otherwise index out of range, crash mid-epoch or mix with the wrong image."""
    h, w = meta.preprocess.size
    if name == schema.MIX_PARAMS and len(values):
        offset, group = values[..., 0].astype(np.int64), meta.views.mix.group
        if not (np.abs(offset) < group).all():
            return f"hold a mix partner offset of {group} or more (views.mix.group {group})"
        if not meta.complete:  # a partial read or a distributed dump's segment: partners may lie beyond its rows
            return None
        partner = a + np.arange(len(values), dtype=np.int64).reshape((-1,) + (1,) * (offset.ndim - 1)) + offset
        if not ((partner >= 0) & (partner < n)).all():
            return f"name a mix partner outside the store's rows 0-{n - 1}"
    if name == schema.AUGMENT_OPS:
        ops, bins = values[..., 0], values[..., 1]
        pol = meta.views.augment
        if not ((ops >= 0) & (ops < len(pol.ops))).all() or not (np.abs(bins.astype(np.int16)) < pol.bins).all():
            return f"name an op or magnitude bin outside views.augment ({len(pol.ops)} ops, {pol.bins} bins)"
        return None
    if name == schema.MIX_LAMBDA:
        return None if ((values >= 0) & (values <= 1)).all() else "hold a mix lambda outside [0, 1]"
    box = values[..., 1:5] if name == schema.MIX_PARAMS else values[..., :4]
    t, l, bh, bw = (box[..., i].astype(np.int64) for i in range(4))
    if not ((t >= 0) & (l >= 0) & (bh >= 0) & (bw >= 0) & (t + bh <= h) & (l + bw <= w)).all():
        return f"hold a box outside the {h}x{w} input"
    if name == schema.ERASE_BOXES and not ((values[..., 4] >= 0) & (values[..., 4] <= 255)).all():
        return "hold an erasing fill outside 0..255"
    return None


def array_names(loc: str, group: zarr.Group) -> set[str]:
    """The store's top-level arrays; zarr parses each one's metadata to list them (R5 as in `array_of`)."""
    try:
        with known_zarr_warnings_silenced(), warnings.catch_warnings():
            # a folder without its zarr.json: the required arrays missing are named by the caller, in one line
            warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component")
            return set(group.array_keys())
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{loc}: an array has metadata zarr cannot read ({' '.join(str(exc).split())[:160]}; "
                          "docs/FORMAT.md, R5)") from None


def array_of(loc: str, group: zarr.Group, name: str) -> zarr.Array:
    """One array of the store, its metadata parsed by zarr; unreadable metadata is one FormatError (R5)."""
    try:
        arr = group[name]
    except KeyError:
        raise FormatError(f"{loc}: required array '{name}' is missing (docs/FORMAT.md, R5)") from None
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{loc}: array '{name}' has metadata zarr cannot read ({' '.join(str(exc).split())[:160]}; "
                          "docs/FORMAT.md, R5)") from None
    if not isinstance(arr, zarr.Array):
        raise FormatError(f"{loc}: '{name}' is a group, not an array (docs/FORMAT.md, R5)")
    return arr


def _sizes_ok(name: str, values: np.ndarray) -> bool:
    """Image sizes are at least 1; a view is a crop at a non-negative offset, at least 1 x 1, flip 0 or 1."""
    if name == schema.IMAGE_HW:
        return bool((values >= 1).all())
    top_left, hw, flip = values[..., :2], values[..., 2:4], values[..., 4]
    return bool((top_left >= 0).all() and (hw >= 1).all() and np.isin(flip, (0, 1)).all())


def _never_fill(meta: StoreMeta) -> list[str]:
    """Row arrays whose chunks can never hold only the fill value: every one of their chunks is stored,
    so a missing one is a hole (zarr would read it back as zeros). Class index and count arrays and
    pixels can be all zeros, so older writers (which skipped fill-value chunks) left some out; a
    view's height and width are never 0."""
    targets = [n for n, (_, dtype) in meta.target_arrays().items() if np.dtype(dtype).kind == "f"]
    extra = [f"{schema.TEACHERS}/{t.name}/{schema.LOGITS}" for t in meta.extra_teachers]
    return [*targets, *extra, schema.IDS, schema.DIGESTS, schema.IMAGE_HW, schema.VIEW_PARAMS]


def _check_no_holes(loc: str, group: zarr.Group, meta: StoreMeta, rows: int) -> None:
    """R5: every chunk of rows [0, rows) of the arrays that always store theirs is present, and (1.4) every
    chunk of the records of those rows' chunks (a missing one read as zeros: every row array 'altered')."""
    spans = [(name, rows) for name in _never_fill(meta)]
    if meta.has_records:
        spans.append((schema.CHUNK_SHA256, -(-rows // meta.chunk_rows)))
    for name, rows in spans:
        arr = array_of(loc, group, name)
        n_chunks = -(-rows // arr.chunks[0])
        if n_chunks == 0:
            continue
        tail = (0,) * (arr.ndim - 1)
        local = _local_root(group.store)
        # A local store is asked file by file (~2 us a stat); listing through zarr costs ~70 us a key,
        # which made opening a 5M-row store (12,000 chunk files) take most of a second.
        present = None if local is not None else set(list_all_keys(group.store, f"{arr.path}/c/"))
        for k in range(n_chunks):
            key = f"{arr.path}/{arr.metadata.encode_chunk_key((k, *tail))}"
            if not (os.path.isfile(os.path.join(local, key)) if present is None else key in present):
                r = arr.chunks[0]
                raise FormatError(f"{loc}: array '{name}' chunk {k} (rows {k * r}-{min(rows, (k + 1) * r) - 1}, "
                                  f"'{key}') is missing: a reader would see zeros there (docs/FORMAT.md, R5); "
                                  "restore the store from its source (`logitstore copy`) or re-run the dump")


def _local_root(store: Any) -> str | None:
    """The directory of a local zarr store, None for any other (zip, object storage)."""
    from zarr.storage import LocalStore

    return str(store.root) if isinstance(store, LocalStore) else None


def open_store(location: str | os.PathLike, allow_incomplete: bool = False,
               storage_options: dict[str, Any] | None = None) -> LogitStore:
    """Open a store read-only and validate it; an incomplete store is refused unless asked for."""
    loc = os.fspath(location)
    group = open_group(loc, mode="r", storage_options=storage_options)
    try:
        meta = schema.meta_from_attrs(dict(group.attrs))
    except FormatError as exc:  # the rules do not know where the store is: the user needs to
        raise FormatError(f"{loc}: {exc}") from None
    if not meta.complete and not allow_incomplete:
        raise StoreStateError(f"{loc}: the store is incomplete (a dump or copy was interrupted or is still "
                              "running); finish it by re-running the command that writes it (`logitstore info "
                              "--allow-incomplete` and `verify --allow-incomplete` read the rows written so far; "
                              "docs/FORMAT.md, R2)")
    _validate_arrays(loc, group, meta)
    if meta.complete:
        rows = array_of(loc, group, next(iter(meta.target_arrays()))).shape[0]
        missing = [n for n in schema.FAILURE_ARRAYS if n not in array_names(loc, group)]
        if missing:
            raise FormatError(f"{loc}: complete store lacks array(s) {missing} (docs/FORMAT.md, R5)")
        for name in schema.FAILURE_ARRAYS:
            _require_checksum(loc, name, array_of(loc, group, name))
        if rows != meta.corpus.n_images:
            raise FormatError(f"{loc}: {rows} rows but the metadata says n_images={meta.corpus.n_images} (docs/FORMAT.md, R5)")
        for t in meta.extra_teachers:
            path = f"{schema.TEACHERS}/{t.name}/{schema.LOGITS}"
            arr = array_of(loc, group, path)
            if arr.shape != group[schema.LOGITS].shape or arr.chunks != group[schema.LOGITS].chunks:
                raise FormatError(f"{loc}: '{path}' must have the shape and chunks of 'logits'")
            if str(arr.dtype) != meta.dtype:
                raise FormatError(f"{loc}: '{path}' has dtype {arr.dtype}; docs/FORMAT.md R5 requires {meta.dtype}")
            _require_checksum(loc, path, arr)
    else:
        rows = int((group.attrs.get(schema.ATTR_PROGRESS) or {}).get("rows", 0))
    _check_no_holes(loc, group, meta, rows)
    return LogitStore(loc, group, meta, rows)
