"""Dumps that keep sparse teacher targets (--topk, --sample): what they store, and what they refuse."""
from __future__ import annotations

import numpy as np
import pytest

import logitstore
from logitstore import schema
from logitstore.errors import LogitStoreError, StoreStateError
from logitstore.sparse import topk_probabilities

from conftest import run_cli


@pytest.fixture(scope="module")
def full(tmp_path_factory, corpus, teacher_ckpt):
    """float32 full logits of the same teacher and corpus: the reference for the sparse stores."""
    out = tmp_path_factory.mktemp("full") / "full.zarr"
    logitstore.dump(str(teacher_ckpt), str(corpus), str(out), num_workers=0, dtype="float32", views=2)
    return logitstore.open_store(out)[:].logits.astype(np.float64)


def _log_softmax(z: np.ndarray, t: float) -> np.ndarray:
    z = z / t
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_topk_store_keeps_exact_top_probabilities_and_tail_mass(tmp_path, corpus, teacher_ckpt, full):
    out = tmp_path / "topk.zarr"
    logitstore.dump(str(teacher_ckpt), str(corpus), str(out), num_workers=0, dtype="float32", views=2, topk=3)
    st = logitstore.open_store(out)
    assert st.meta.format_version == schema.version_for(st.meta.targets, st.meta.views) and st.meta.targets.kind == "topk" and st.meta.targets.k == 3
    t = st[:].targets
    assert t[schema.TOPK_INDICES].dtype == np.uint16 and t[schema.TAIL_LSE].dtype == np.float32
    order = np.argsort(-full, axis=-1, kind="stable")[..., :3]
    assert np.array_equal(t[schema.TOPK_INDICES], order)
    assert np.allclose(t[schema.TOPK_VALUES], np.take_along_axis(full, order, -1), atol=1e-6)
    for r, temp in enumerate(st.meta.targets.temperatures):
        log_p, log_tail = topk_probabilities(t[schema.TOPK_VALUES], t[schema.TAIL_LSE][..., r], temp)
        exact = _log_softmax(full, temp)
        kept = np.take_along_axis(exact, order, -1)
        assert np.allclose(log_p, kept, atol=1e-5)
        assert np.allclose(np.exp(log_tail), 1 - np.exp(kept).sum(-1), atol=1e-5)
    assert "OK" in run_cli("logitstore", "verify", str(out)).stdout
    info = run_cli("logitstore", "info", str(out)).stdout
    assert "top-3 + tail log-sum-exp at T = 1,2,4,8" in info


def test_sampled_store_keeps_draws_with_their_logits_and_proposal(tmp_path, corpus, teacher_ckpt, full):
    out = tmp_path / "sample.zarr"
    logitstore.dump(str(teacher_ckpt), str(corpus), str(out), num_workers=0, dtype="float32", views=2,
                    sample=6, temperatures=(1, 4), sample_temperature=1)
    st = logitstore.open_store(out)
    assert st.meta.targets == schema.TargetSpec("sample", 6, (1.0, 4.0), 1.0)
    t = st[:].targets
    counts, idx = t[schema.SAMPLE_COUNTS].astype(np.int64), t[schema.SAMPLE_INDICES].astype(np.int64)
    assert (counts.sum(-1) == 6).all()
    used = counts > 0
    assert np.allclose(t[schema.SAMPLE_LOGITS][used], np.take_along_axis(full, idx, -1)[used], atol=1e-6)
    q = np.exp(np.take_along_axis(_log_softmax(full, 1.0), idx, -1))
    assert np.allclose(t[schema.SAMPLE_PROPOSAL][used], q[used], rtol=1e-5)
    for r, temp in enumerate((1.0, 4.0)):
        lse = np.log(np.exp(full / temp).sum(-1))
        assert np.allclose(t[schema.LSE][..., r], lse, atol=1e-5)
    # Draws depend on the image, not on where it sits: a second dump draws the same classes.
    again = tmp_path / "again.zarr"
    logitstore.dump(str(teacher_ckpt), str(corpus), str(again), num_workers=0, dtype="float32", views=2,
                    sample=6, temperatures=(1, 4), sample_temperature=1, chunk_rows=16)
    assert np.array_equal(logitstore.open_store(again)[:].targets[schema.SAMPLE_INDICES], idx)
    assert "OK" in run_cli("logitstore", "verify", str(out)).stdout


def test_sparse_flags_are_checked_and_full_logit_tools_refuse_sparse_stores(tmp_path, corpus, teacher_ckpt):
    base = ["logitstore", "dump", "--teacher", str(teacher_ckpt), "--images", str(corpus), "--num-workers", "0"]
    cases = [(["--topk", "3", "--sample", "3"], "alternatives"),
             (["--topk", "10"], "1 <= K < 10"),
             (["--sample", "3", "--sample-temperature", "3"], "must be one of --temperatures 1,2,4,8"),
             (["--temperatures", "1,2"], "apply to --topk or --sample")]
    for flags, message in cases:
        r = run_cli(*base, "--out", str(tmp_path / "x.zarr"), *flags, check=False)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (flags, r.stderr)
    out = tmp_path / "k.zarr"
    logitstore.dump(str(teacher_ckpt), str(corpus), str(out), num_workers=0, topk=2)
    with pytest.raises(StoreStateError, match="not full logits"):
        logitstore.open_store(out).logits
    r = run_cli("logitstore", "select", str(out), "--out", str(tmp_path / "s.zarr"), "--min-confidence", "0.1",
                check=False)
    assert r.returncode == 2 and "needs a full-logits store" in r.stderr
    r = run_cli(*base, "--out", str(out), "--add-teacher", check=False)
    assert r.returncode == 2 and "full-logits stores only" in r.stderr
    with pytest.raises(LogitStoreError, match="kind 'dense'"):
        schema.TargetSpec.from_dict({"kind": "dense", "k": 1, "temperatures": [1]}, 10)
