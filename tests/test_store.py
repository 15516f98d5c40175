"""Reading a store: validation, checksums, info, verify, version rules."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

import logitstore
from logitstore import schema
from logitstore.errors import FormatError, IntegrityError, StoreStateError

from conftest import flip_byte, run_cli


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, corpus, teacher_ckpt) -> Path:
    out = tmp_path_factory.mktemp("store") / "s.zarr"
    logitstore.dump(str(teacher_ckpt), str(corpus), str(out), num_workers=0, chunk_rows=32)
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_slicing_and_chunks_agree(store_path):
    st = logitstore.open_store(store_path)
    assert st.n_chunks == 4 and st.chunk_bounds(3) == (96, 120)
    whole = st[:]
    assert np.array_equal(st.read_chunk(1).logits, whole.logits[32:64])
    assert st[-1].ids[0] == whole.ids[-1] and len(st[10:20]) == 10
    with pytest.raises(IndexError):
        st[120]
    head = st.head(50)
    assert len(head) == 50 and head.n_chunks == 2 and head.chunk_bounds(1) == (32, 50)
    assert np.array_equal(head.read_chunk(1).logits, whole.logits[32:50])


def test_a_flipped_byte_fails_the_read_and_verify(tmp_path, store_path):
    bad = _copy(store_path, tmp_path / "bad.zarr")
    chunk = bad / "logits" / "c" / "1" / "0" / "0"
    flip_byte(chunk, len(chunk.read_bytes()) // 2, 0x01)
    st = logitstore.open_store(bad)
    np.testing.assert_array_equal(st.read_chunk(0).logits, logitstore.open_store(store_path).read_chunk(0).logits)
    with pytest.raises(IntegrityError, match=r"'logits' chunk\(s\) 1 \(rows 32-63, 'logits/c/1/0/0'\) fail their CRC32C"):
        st.read_chunk(1)
    r = run_cli("logitstore", "verify", str(bad), check=False)
    assert r.returncode == 1 and "chunk(s) 1 (" in r.stderr and "FAILED" in r.stderr
    last = bad / "logits" / "c" / "3" / "0" / "0"  # the last chunk: 24 of its 32 rows are the store's
    flip_byte(last, len(last.read_bytes()) // 2, 0x01)
    with pytest.raises(IntegrityError, match=r"chunk\(s\) 3 \(rows 96-119, 'logits/c/3/0/0'\)"):
        st.read(96, 120)


def test_verify_checks_images_against_digests(tmp_path, store_path, corpus):
    r = run_cli("logitstore", "verify", str(store_path), "--images", str(corpus))
    assert "120 of 120 images read matched their digests" in r.stdout
    images = tmp_path / "imgs"
    import shutil

    shutil.copytree(corpus, images)
    victim = sorted(images.rglob("*.png"))[3]
    victim.write_bytes(victim.read_bytes() + b"\0")
    r = run_cli("logitstore", "verify", str(store_path), "--images", str(images), check=False)
    assert r.returncode == 1 and victim.name in r.stderr and "differ from the digest" in r.stderr
    assert "119 of 120 images read matched their digests" in r.stderr  # the changed one read, but did not match
    # Many problems: the first max_problems are listed, and the report says it stopped there
    for p in sorted(images.rglob("*.png"))[:30]:
        p.unlink()
    from logitstore.tools.inspect_store import verify

    rep = verify(logitstore.open_store(store_path), str(images), max_problems=8)
    assert len(rep.problems) == 8 and rep.stopped and not rep.ok
    assert rep.notes == ["stopped after 8 problems: the chunks after them were not checked"]


def test_info_reports_counts_sizes_and_predictions(store_path):
    d = json.loads(run_cli("logitstore", "info", str(store_path), "--json").stdout)
    assert d["images"] == 120 and d["failed"] == 0 and d["num_classes"] == 10 and d["complete"]
    assert sum(d["class_histogram"].values()) == 120
    assert d["top_classes"][0]["count"] == max(d["class_histogram"].values())
    assert 0.1 <= d["confidence"]["mean"] <= 1.0 and 0 <= d["entropy_nats"]["mean"] <= np.log(10) + 1e-9
    assert d["bytes_on_disk"] > 0 and d["logits_compression_ratio"] > 0
    # every key of the store, as dump counts them: the metadata, records and failure arrays too
    assert d["bytes_on_disk"] == sum(p.stat().st_size for p in store_path.rglob("*") if p.is_file()
                                     and not p.name.startswith("."))
    assert d["teacher"]["arch"] == "nets:tiny_cnn" and d["preprocess"]["size"] == [28, 28]
    text = run_cli("logitstore", "info", str(store_path)).stdout
    assert "most predicted" in text and "complete" in text


def _set_root_attr(path: Path, **changes) -> None:
    """Edit the root attribute and re-record its checksum, as a writer that meant it would: each test
    then meets the rule it is about, not R4 (tests/test_data_safety.py covers R4)."""
    g = zarr.open_group(str(path), mode="a")
    d = dict(g.attrs[schema.ATTR_ROOT])
    d.update(changes)
    try:
        sealed = schema.meta_from_attrs({schema.ATTR_ROOT: d}, check_seal=False).sealed()
        d["fingerprints"] = {**d["fingerprints"], "metadata": sealed.fingerprints["metadata"]}
    except FormatError:
        pass  # the edit breaks another rule first
    g.attrs[schema.ATTR_ROOT] = d


def test_readers_refuse_a_newer_major_and_read_a_newer_minor(tmp_path, store_path):
    newer = _copy(store_path, tmp_path / "newer.zarr")
    _set_root_attr(newer, format_version=f"{schema.FORMAT_MAJOR + 1}.0")
    with pytest.raises(FormatError, match=rf"store format {schema.FORMAT_MAJOR + 1}\.0 is a newer major .* "
                                          rf"{schema.FORMAT_VERSION}"):
        logitstore.open_store(newer)
    r = run_cli("logitstore", "info", str(newer), check=False)
    assert r.returncode == 2 and "newer major" in r.stderr and "Traceback" not in r.stderr
    minor = _copy(store_path, tmp_path / "minor.zarr")
    _set_root_attr(minor, format_version=f"{schema.FORMAT_MAJOR}.{schema.FORMAT_MINOR + 1}")
    assert len(logitstore.open_store(minor)) == 120


def test_readers_refuse_stores_that_break_the_spec(tmp_path, store_path):
    no_crc = tmp_path / "nocrc.zarr"
    g = zarr.open_group(str(no_crc), mode="w")
    g.attrs.update(dict(zarr.open_group(str(store_path), mode="r").attrs))
    src = zarr.open_group(str(store_path), mode="r")
    for name in src.array_keys():
        a = src[name]
        g.create_array(name, shape=a.shape, chunks=a.chunks, dtype=a.dtype, fill_value=a.fill_value)
    with pytest.raises(FormatError, match="crc32c"):
        logitstore.open_store(no_crc)
    with pytest.raises(FormatError, match="not a logitstore store"):
        logitstore.open_store(_plain_group(tmp_path / "plain.zarr"))
    with pytest.raises(StoreStateError, match="no store there"):
        logitstore.open_store(tmp_path / "missing.zarr")
    wrong = _copy(store_path, tmp_path / "wrong.zarr")
    _set_root_attr(wrong, classes=["a", "b"])
    with pytest.raises(FormatError, match="logits"):
        logitstore.open_store(wrong)
    malformed = _copy(store_path, tmp_path / "malformed.zarr")
    _set_root_attr(malformed, seed="three", chunk_rows=[4])
    r = run_cli("logitstore", "info", str(malformed), check=False)
    assert r.returncode == 2 and "seed" in r.stderr and "R3" in r.stderr and "Traceback" not in r.stderr
    sparse = _copy(store_path, tmp_path / "unknown_targets.zarr")
    _set_root_attr(sparse, format_version="1.1", targets={"kind": "hashed", "k": 8, "temperatures": [1]})
    with pytest.raises(FormatError, match="targets kind 'hashed' is not understood"):
        logitstore.open_store(sparse)


def test_an_overwrite_killed_while_clearing_never_leaves_a_complete_looking_store(tmp_path, store_path):
    from logitstore.locations import open_raw_store, retire_root

    victim = _copy(store_path, tmp_path / "victim.zarr")
    retire_root(open_raw_store(str(victim), "w"))  # what an --overwrite does first ...
    for chunk in (victim / "logits").rglob("c/*"):  # ... then it is killed halfway through clearing
        if chunk.is_file():
            chunk.unlink()
    with pytest.raises(StoreStateError, match="incomplete"):
        logitstore.open_store(victim)


def test_float16_limit_keeps_bitrounded_logits_finite():
    from numcodecs import BitRound

    rng = np.random.default_rng(0)
    for keep_bits in (1, 4, 7, 9, None):
        limit = schema.float16_limit(keep_bits)
        x = np.concatenate([[limit, -limit], rng.uniform(-limit, limit, 10000)]).astype(np.float32).astype(np.float16)
        back = x if keep_bits is None else BitRound(keep_bits).decode(BitRound(keep_bits).encode(x)).view(np.float16)
        assert np.isfinite(back).all() and np.abs(back).max() <= limit, keep_bits


def _plain_group(path: Path) -> Path:
    zarr.open_group(str(path), mode="w")
    return path
