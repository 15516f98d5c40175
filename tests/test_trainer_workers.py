"""How a run feeds its student: the worker choice (measured once, a pure function of what was measured,
logged), passes in the training process once the cache is warm, and that none of it changes what is trained."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import trainer
from trainer.batches import make_batches, time_source
from trainer.fit import WORKER_SHARE, FitConfig, choose_workers, student_step_seconds
from trainer.inputs import make_input_spec
from trainer.storeset import open_stores
from trainer.students import lenet

from conftest import World

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny nets: one thread is faster


def test_worker_choice_follows_the_share_of_a_step_that_the_data_takes():
    step = 0.010
    small = WORKER_SHARE * step * 0.5
    big = WORKER_SHARE * step * 2
    # No core to spare: never a worker, whatever was measured.
    assert choose_workers(0, 1.0, 1.0, step, True).workers == 0
    # Data work under the share, cold and warm: the loop does it itself.
    none = choose_workers(3, small, small, step, True)
    assert (none.workers, none.in_process_when_warm) == (0, False)
    # Decoding is costly, replay from the cache is not: workers for the first pass only.
    first = choose_workers(3, big, small, step, True)
    assert (first.workers, first.in_process_when_warm) == (3, True)
    # Replay itself is costly (random crops resized per image): workers throughout.
    always = choose_workers(3, big, big, step, True)
    assert (always.workers, always.in_process_when_warm) == (3, False)
    # When later passes cannot find their images cached (cache too small, or a DDP rank that meets
    # other rows each epoch), they decode too and count as cold.
    uncached = choose_workers(3, big, small, step, False)
    assert (uncached.workers, uncached.in_process_when_warm) == (3, False)
    # Deterministic given its inputs, and the reason says what was measured.
    assert choose_workers(3, big, small, step, True) == first
    assert "10.0 ms" in first.reason and f"{1e3 * big:.1f} ms cold" in first.reason
    assert first.reason.startswith("3 while decoding, then 0")


def test_timing_a_student_step_trains_nothing_and_draws_no_random_numbers(world: World):
    data = open_stores([world.store])
    spec = make_input_spec(data.pre, None, 1)
    batch = make_batches(data, spec, 1 << 30).source.__getitems__(next(iter(data.requests(0, 32))))
    torch.manual_seed(7)
    model = torch.nn.Sequential(lenet(10, 1), torch.nn.Dropout(0.5))  # dropout draws from the RNG
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cfg = FitConfig(stores=[str(world.store)], out="-", optimizer="adamw")
    seconds = student_step_seconds(model, batch, spec, torch.device("cpu"), cfg, "fp32")
    assert 0 < seconds < 10
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_timing_the_source_caches_what_it_decoded(world: World):
    data = open_stores([world.store])
    batches = make_batches(data, make_input_spec(data.pre, None, 1), 1 << 30)
    cold, warm = time_source(batches.source, data.requests(0, 32), k=2)
    assert cold > 0 and warm > 0
    assert batches.source.cache.n_cached == 64        # the two batches' images, decoded once
    assert time_source(batches.source, iter(()), k=2) == (0.0, 0.0)


@pytest.mark.parametrize("store", ["store", "store_views"])
def test_passes_in_process_once_warm_give_the_same_batches(world: World, store: str):
    data = open_stores([getattr(world, store)], min_block_rows=64)
    spec = make_input_spec(data.pre, None, 1)
    ref = make_batches(data, spec, 1 << 30, num_workers=0)
    mixed = make_batches(data, spec, 1 << 30, num_workers=1, in_process_when_warm=True)
    assert not mixed.in_process()
    for epoch in (0, 1, 2):
        a = list(ref(data.requests(epoch, 50, seed=3)))
        b = list(mixed(data.requests(epoch, 50, seed=3)))
        assert mixed.in_process() and mixed.passes_done == epoch + 1   # the first pass had the worker
        assert len(a) == len(b) > 5
        for x, y in zip(a, b):
            assert torch.equal(x["pixels"], y["pixels"]) and torch.equal(x["keys"], y["keys"])
            assert torch.equal(x["logits"], y["logits"]) and torch.equal(x["labels"], y["labels"])
    assert mixed.source.cache.n_cached == data.n_train


def test_default_workers_are_measured_logged_and_change_nothing(world: World, tmp_path: Path):
    kw = dict(student="lenet", batch_size=32, warmup_epochs=0.2, epochs=2, seed=4)
    chosen = trainer.fit([world.store_views], tmp_path / "a", **kw)            # --num-workers not given
    fixed = trainer.fit([world.store_views], tmp_path / "b", num_workers=0, **kw)
    assert "a batch takes" in chosen.info["workers"] and "student step" in chosen.info["workers"]
    assert fixed.info["workers"] == "0 (--num-workers)"
    a = torch.load(chosen.checkpoint, weights_only=False)["state_dict"]
    b = torch.load(fixed.checkpoint, weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in chosen.history] == [r["train_loss"] for r in fixed.history]
    assert np.isfinite(chosen.final["train_loss"])


def test_student_input_is_normalize_bit_for_bit_and_travels_without_device_constants(world: World):
    import pickle

    from logitstore.views import normalize

    data = open_stores([world.store])
    spec = make_input_spec(data.pre, None, 3)                      # grey store, RGB student
    pixels = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    x = spec.to_input(pixels)
    assert torch.equal(x, normalize(pixels, data.pre).expand(-1, 3, -1, -1))
    assert torch.equal(spec.to_input(pixels), x) and len(spec._consts) == 1   # made once per device
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and again._consts == {}
    assert torch.equal(again.to_input(pixels), x)
