"""Fingerprints: short hashes that tell two teams whether they hold the same teacher, corpus, cache.

Defined in docs/FORMAT.md ("Fingerprints"); computed from decoded values, so a store copied,
zipped or re-compressed keeps its fingerprints.
"""
from __future__ import annotations

import hashlib

import numpy as np



class RowHasher:
    """Streams rows (in order, chunk by chunk) into the corpus and contents fingerprints."""

    def __init__(self) -> None:
        self._corpus, self._contents = hashlib.sha256(), hashlib.sha256()

    def update(self, rows) -> None:
        for image_id, digest in zip(rows.ids, rows.digests):
            entry = str(image_id).encode("utf-8") + b"\0" + digest.tobytes()
            self._corpus.update(entry)
            self._contents.update(entry)
        targets = list(rows.targets.values()) if rows.targets is not None else [rows.logits]
        extras = list((rows.view_extras or {}).values())  # 1.5 augmented views
        for arr in (*targets, rows.image_hw, rows.view_params, *extras, rows.pixels):
            if arr is None:
                continue
            self._contents.update(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes())

    def result(self) -> dict[str, str]:
        return {"corpus": "sha256:" + self._corpus.hexdigest(), "contents": "sha256:" + self._contents.hexdigest()}


def row_fingerprints(store) -> dict[str, str]:
    """{"corpus": ids + digests, "contents": every row array} of a LogitStore, chunk by chunk.

    A failed checksum raises IntegrityError.
    """
    hasher = RowHasher()
    for _, rows in store.iter_chunks():
        hasher.update(rows)
    return hasher.result()
