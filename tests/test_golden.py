"""Golden stores of each released format version: still readable, and still what the writer writes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import logitstore
from logitstore import schema

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))
from make_golden import KINDS, TARGETS, build, golden_rows  # noqa: E402

VERSIONS = sorted(p for p in GOLDEN.glob("v*.zarr"))


def test_there_is_a_golden_store_of_every_kind_and_of_the_current_version():
    assert sorted(GOLDEN / f"{name}.zarr" for name in TARGETS) == VERSIONS and KINDS
    assert any(p.name.startswith(f"v{schema.FORMAT_VERSION}") for p in VERSIONS)


@pytest.mark.parametrize("path", VERSIONS, ids=[p.name for p in VERSIONS])
def test_golden_store_reads_back_its_values(path):
    st = logitstore.open_store(path)
    batches = golden_rows(path.name[:-len(".zarr")])
    rows = st[:]
    assert list(rows.ids) == [i for b in batches for i in b.ids]
    if batches[0].targets is None:
        assert np.array_equal(rows.logits, np.concatenate([b.logits for b in batches]))
    else:
        assert rows.logits is None and sorted(rows.targets) == sorted(batches[0].targets)
        for name, values in rows.targets.items():
            assert values.dtype == batches[0].targets[name].dtype, name
            assert np.array_equal(values, np.concatenate([b.targets[name] for b in batches])), name
    assert np.array_equal(rows.view_params, np.concatenate([b.view_params for b in batches]))
    if batches[0].view_extras is not None:  # 1.5 augmented views
        assert sorted(rows.view_extras) == sorted(batches[0].view_extras)
        for name, values in rows.view_extras.items():
            assert np.array_equal(values, np.concatenate([b.view_extras[name] for b in batches])), name
    else:
        assert rows.view_extras is None
    assert np.array_equal(rows.digests, np.concatenate([b.digests for b in batches]))
    assert st.failures() == [("img06.png", "UnidentifiedImageError: cannot identify image file")]
    assert st.meta.classes == ("cat", "dog", "bird") and st.meta.views.count == 2
    assert "OK" in __import__("conftest").run_cli("logitstore", "verify", str(path)).stdout


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", list(KINDS))
def test_writer_still_writes_every_golden_store_byte_for_byte(tmp_path, name):
    """An accidental change of arrays, dtypes, chunks, codecs or attributes fails here."""
    build(tmp_path / "now.zarr", name)
    now, golden = _files(tmp_path / "now.zarr"), _files(GOLDEN / f"{name}.zarr")
    assert sorted(now) == sorted(golden)
    for key in golden:
        if key.endswith("zarr.json"):
            a, b = json.loads(now[key]), json.loads(golden[key])
            assert a == b, f"{key} changed: bump format_version and add a golden store"
        else:
            assert now[key] == golden[key], f"{key} changed: bump format_version and add a golden store"
