"""A fuzz corpus of damaged stores, derived from one small good store: every reader (info, verify, fit)
either refuses in one line, with no traceback, or is unaffected (docs/FORMAT.md, R1-R9)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

import logitstore
from logitstore import schema

from conftest import invoke

SEED = 20261201
N_ATTRIBUTE_CASES = 200  # of ~500 (key, value) mutations, half of them re-sealed with a valid checksum
N_CHUNK_CASES = 60       # of ~150 chunk damages


@pytest.fixture(scope="module")
def good(tmp_path_factory, corpus, teacher_ckpt) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "good.zarr"
    listing = out.parent / "list.txt"
    listing.write_text("\n".join(str(p) for p in sorted(corpus.rglob("*.png"))[:40]))
    logitstore.dump(str(teacher_ckpt), str(listing), str(out), num_workers=0, chunk_rows=16, views=2, seed=1)
    return out


def _paths(d: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out.append((*prefix, k))
        if isinstance(v, dict) and len(prefix) < 2:
            out.extend(_paths(v, (*prefix, k)))
    return out


HOSTILE = [None, True, -1, 0, 2 ** 70, 1e308, float("nan"), float("inf"), "", "x" * 5000, [], [1, "a"], {}, {"k": 1}]


def attribute_cases(root: dict) -> list[tuple[tuple, object, bool]]:
    rng = random.Random(SEED)
    keys = _paths(root)
    cases = [(k, v, reseal) for k in keys for v in HOSTILE for reseal in (False, True)]
    return rng.sample(cases, N_ATTRIBUTE_CASES)


def _set(d: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def _write_root(store: Path, meta: dict, reseal: bool) -> None:
    doc = json.loads((store / "zarr.json").read_text())
    if reseal:
        try:
            sealed = schema.meta_from_attrs({schema.ATTR_ROOT: meta}, check_seal=False).sealed()
            meta["fingerprints"] = {**meta["fingerprints"], "metadata": sealed.fingerprints["metadata"]}
        except (logitstore.LogitStoreError, TypeError, ValueError, AttributeError, KeyError):
            pass  # the edit breaks an earlier rule; the store stays as edited
    doc["attributes"][schema.ATTR_ROOT] = meta
    (store / "zarr.json").write_text(json.dumps(doc))


def _chunk_files(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file() and "/c/" in p.as_posix())


def chunk_cases(good: Path) -> list[tuple[str, str, str]]:
    files = [p.relative_to(good).as_posix() for p in _chunk_files(good)]
    arrays = sorted({p.split("/c/")[0] for p in files})
    cases = [(kind, f, "") for f in files for kind in ("delete", "truncate", "flip", "empty")]
    cases += [("swap", f, g) for f in files for g in files if f.split("/c/")[0] != g.split("/c/")[0]][:200]
    cases += [(kind, a, "") for a in arrays for kind in ("dtype", "codec")]
    return random.Random(SEED).sample(cases, N_CHUNK_CASES)


def _damage_chunks(store: Path, kind: str, a: str, b: str) -> None:
    p = store / a
    if kind == "delete":
        p.unlink()
    elif kind == "truncate":
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "flip":
        data = bytearray(p.read_bytes())
        data[len(data) // 3] ^= 0x10
        p.write_bytes(bytes(data))
    elif kind == "swap":
        q = store / b
        x, y = p.read_bytes(), q.read_bytes()
        p.write_bytes(y)
        q.write_bytes(x)
    else:  # the array's own metadata: a wrong dtype, or no checksum codec
        meta_path = p / "zarr.json"
        meta = json.loads(meta_path.read_text())
        if kind == "dtype":
            meta["data_type"] = "float64" if meta["data_type"] != "float64" else "int8"
        else:
            meta["codecs"] = [c for c in meta["codecs"] if c.get("name") != "crc32c"]
        meta_path.write_text(json.dumps(meta))


def _outcomes(store: Path, tmp: Path, fit: bool) -> dict[str, tuple[int, str]]:
    """Exit code and output of each reader; a traceback fails the test inside `invoke`."""
    res = {"info": invoke("logitstore", "info", str(store), "--json"),
           "verify": invoke("logitstore", "verify", str(store))}
    if fit:
        run = tmp / f"run{len(list(tmp.glob('run*')))}"
        res["fit"] = invoke("trainer", "fit", "--store", str(store), "--out", str(run), "--epochs", "1",
                            "--num-workers", "0", "--cache-images", "0", "--batch-size", "16", "--quiet",
                            "--holdout", "0")
    out = {}
    for name, r in res.items():
        err = r.stderr.strip()
        if r.returncode != 0:
            lines = [ln for ln in err.splitlines() if not ln.lstrip().startswith(("problem:", "note:"))]  # verify lists them
            assert len(lines) == 1, (name, err)
        out[name] = (r.returncode, r.stdout if name != "fit" else "")
    return out


def _normalised(outcomes: dict[str, tuple[int, str]], store: Path, good: Path) -> dict:
    """What a reader said, less where the store is, its provenance (`created`, `versions`: outside the
    metadata checksum, shown as they are) and its size on disk (the root metadata's own bytes count)."""
    out = {}
    for k, (c, o) in outcomes.items():
        o = o.replace(str(store), str(good))
        if k == "info" and c == 0:
            d = json.loads(o)
            o = json.dumps({key: v for key, v in d.items()
                            if key not in ("created", "versions", "bytes_on_disk", "bytes_per_image")})
        out[k] = (c, o)
    return out


def test_damaged_metadata_is_refused_in_one_line_or_harmless(good, tmp_path):
    reference = _outcomes(good, tmp_path, fit=True)
    root = json.loads((good / "zarr.json").read_text())["attributes"][schema.ATTR_ROOT]
    refused = harmless = 0
    for i, (path, value, reseal) in enumerate(attribute_cases(root)):
        bad = tmp_path / f"a{i}.zarr"
        shutil.copytree(good, bad)
        meta = json.loads(json.dumps(root))
        _set(meta, path, value)
        _write_root(bad, meta, reseal)
        got = _outcomes(bad, tmp_path, fit=i % 3 == 0)
        if all(code == 0 for code, _ in got.values()):
            harmless += 1
            mine, ref = _normalised(got, bad, good), _normalised(reference, good, good)
            # The rows serve exactly as before; unsealed, only provenance (outside the checksum) may change
            # what info says, while a re-sealed edit is another, self-consistent description of them.
            assert mine["verify"] == ref["verify"], (path, value)
            assert reseal or mine["info"] == ref["info"], (path, value)
        else:
            refused += 1
        shutil.rmtree(bad)
    print(f"\nmetadata fuzz: {N_ATTRIBUTE_CASES} stores, {refused} refused in one line, {harmless} harmless, "
          "0 tracebacks")
    assert refused + harmless == N_ATTRIBUTE_CASES and refused > harmless


def test_damaged_chunks_are_refused_in_one_line_or_harmless(good, tmp_path):
    refused = harmless = 0
    for i, (kind, a, b) in enumerate(chunk_cases(good)):
        bad = tmp_path / f"c{i}.zarr"
        shutil.copytree(good, bad)
        _damage_chunks(bad, kind, a, b)
        got = _outcomes(bad, tmp_path, fit=i % 4 == 0)
        if kind in ("flip", "truncate", "empty", "delete", "codec", "dtype"):
            assert got["verify"][0] != 0, (kind, a)  # verify reads every chunk: it must see every damage
        if any(code for code, _ in got.values()):
            refused += 1
        else:
            harmless += 1
        shutil.rmtree(bad)
    print(f"\nchunk fuzz: {N_CHUNK_CASES} stores, {refused} refused in one line, {harmless} harmless, 0 tracebacks")
