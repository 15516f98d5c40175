"""Students distilled from sparse stores (--topk, --sample): what a batch carries, the loss, what is refused."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import logitstore
import trainer
from logitstore import schema
from trainer.cli import main
from trainer.errors import ConfigError, StoreMismatchError
from trainer.loss import distillation_loss, soft_target_loss, teacher_top1
from trainer.storeset import open_stores

from conftest import World

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny nets: one thread is faster

FAST = dict(student="lenet", batch_size=32, warmup_epochs=0.2, num_workers=0)


def _dump(world: World, out: Path, **kw) -> Path:
    # The fixture store's chunking, so the epoch's block order (and so every batch) is the same.
    logitstore.dump(str(world.teacher), str(world.corpus), str(out), chunk_rows=64, batch_size=128, num_workers=0, **kw)
    return out


@pytest.fixture(scope="module")
def stores(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sparse_stores")
    return {"full32": _dump(world, d / "full32.zarr", dtype="float32"),
            "top3": _dump(world, d / "top3.zarr", dtype="float32", topk=3),
            "top9": _dump(world, d / "top9.zarr", dtype="float32", topk=9),
            "sample": _dump(world, d / "sample.zarr", dtype="float32", sample=16, temperatures=(1, 2, 4),
                            sample_temperature=2)}


def _first_batches(store: Path, temperature: float, n: int = 3):
    data = open_stores([store], temperature=temperature)
    return [r for _, r in zip(range(n), data.requests(0, 50, seed=3))]


def _lse(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]


@pytest.mark.parametrize("temperature", [2.0, 4.0])
def test_topk_batches_carry_the_top_classes_and_the_tail_at_the_training_temperature(stores, temperature):
    full = _first_batches(stores["full32"], temperature)
    top = _first_batches(stores["top3"], temperature)
    for f, t in zip(full, top):
        assert np.array_equal(f.keys, t.keys)  # same rows, same order: only the teacher's side differs
        z = f.logits.astype(np.float64)
        idx = t.logits[schema.TOPK_INDICES].astype(np.int64)
        assert set(t.logits) == {schema.TOPK_VALUES, schema.TOPK_INDICES, schema.TAIL_LSE}
        assert np.array_equal(idx[:, 0], z.argmax(-1))
        np.testing.assert_array_equal(t.logits[schema.TOPK_VALUES], np.take_along_axis(f.logits, idx, -1))
        rest = z.copy()
        np.put_along_axis(rest, idx, -np.inf, -1)
        np.testing.assert_allclose(t.logits[schema.TAIL_LSE], _lse(rest / temperature), rtol=1e-5, atol=1e-5)


def test_sampled_batches_carry_draws_and_the_full_normaliser_at_the_training_temperature(stores):
    full = _first_batches(stores["full32"], 4.0)
    sam = _first_batches(stores["sample"], 4.0)
    for f, s in zip(full, sam):
        assert np.array_equal(f.keys, s.keys)
        t = s.logits
        assert (t[schema.SAMPLE_COUNTS].astype(int).sum(-1) == 16).all()
        used = t[schema.SAMPLE_COUNTS] > 0
        z = np.take_along_axis(f.logits, t[schema.SAMPLE_INDICES].astype(np.int64), -1)
        np.testing.assert_array_equal(t[schema.SAMPLE_LOGITS][used], z[used])
        np.testing.assert_allclose(t[schema.LSE], _lse(f.logits.astype(np.float64) / 4.0), rtol=1e-5)
        # The teacher's top-1 is drawn almost always at T_q = 2 on a confident MNIST teacher.
        top = teacher_top1({k: torch.from_numpy(v) for k, v in t.items()}).numpy()
        assert (top == f.logits.argmax(-1)).mean() > 0.95


def test_top_c_minus_1_loss_is_the_full_distillation_loss_on_real_batches(stores):
    """With K = C-1 the tail bucket is one class, so the stored targets carry the whole softmax."""
    torch.manual_seed(0)
    for f, t in zip(_first_batches(stores["full32"], 4.0), _first_batches(stores["top9"], 4.0)):
        student = torch.randn(len(f), 10) * 3
        full = distillation_loss(student, torch.from_numpy(f.logits), 4.0)
        sparse = soft_target_loss(student, {k: torch.from_numpy(v) for k, v in t.logits.items()}, 4.0)
        assert float(sparse) == pytest.approx(float(full), rel=1e-5, abs=1e-6)


def test_fit_on_top_c_minus_1_store_tracks_the_full_logits_run(world: World, stores, tmp_path: Path):
    kw = dict(epochs=2, seed=5, **FAST)
    a = trainer.fit([stores["full32"]], tmp_path / "full", **kw)
    b = trainer.fit([stores["top9"]], tmp_path / "top9", **kw)
    for ra, rb in zip(a.history, b.history):
        assert rb["train_kd"] == pytest.approx(ra["train_kd"], rel=1e-3)
        assert rb["holdout_kd"] == pytest.approx(ra["holdout_kd"], rel=1e-3)
        assert rb["agree"] == ra["agree"]


@pytest.mark.parametrize("name", ["top3", "sample"])
def test_students_learn_from_sparse_stores(world: World, stores, tmp_path: Path, name: str):
    res = trainer.fit([stores[name]], tmp_path / name, epochs=3, temperature=2.0 if name == "sample" else 4.0,
                      eval_images=world.labeled, **FAST)
    final = res.final
    assert final["eval_top1"] > 0.7 and final["agree"] > 0.6            # chance: 0.1
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    # The student is a teacher like any other: its checkpoint dumps full logits.
    out = logitstore.dump(res.checkpoint, str(world.corpus), str(tmp_path / "next.zarr"), num_workers=0)
    assert out.n_images == 640


def test_a_temperature_the_store_does_not_keep_is_refused_in_one_line(stores, tmp_path: Path):
    r = CliRunner().invoke(main, ["fit", "--store", str(stores["top3"]), "--out", str(tmp_path / "r"),
                                  "--temperature", "3", "--num-workers", "0"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("trainer: error: --temperature 3:") and "T = 1, 2, 4, 8 only" in line, line
    with pytest.raises(ConfigError, match="T = 1, 2, 4 only"):
        open_stores([stores["sample"]], temperature=8.0)


def test_sparse_stores_do_not_mix_with_full_ones_or_form_ensembles(world: World, stores):
    with pytest.raises(StoreMismatchError, match="teacher targets differ"):
        open_stores([stores["full32"], stores["top3"]])
    with pytest.raises(StoreMismatchError, match="teacher targets differ"):
        open_stores([stores["top3"], stores["top9"]])
    with pytest.raises(ConfigError, match="ensembles mix full logits"):
        open_stores([stores["top3"]], teachers=["primary"])
