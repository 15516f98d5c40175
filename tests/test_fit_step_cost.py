"""The cheaper per-step pieces of the training loop (issue 16) give exactly what the pieces they replace gave:
clipping bit for bit torch's clip_grad_norm_, the epoch meter's sums the per-product sums, and the
read-ahead in runs the same items, errors and early stops as the read-ahead item by item."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from logitstore.prefetch import read_ahead_in_runs, runs_of
from trainer.fit import EpochMeter, clip_grad_norm
from trainer.students import lenet


def _student_with_grads(seed: int) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = lenet(num_classes=10, in_channels=1)
    x, t = torch.randn(16, 1, 28, 28), torch.randn(16, 10)
    (model(x) - 3 * t).pow(2).sum().backward()
    return model, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("max_norm", [1e-3, 0.5, 1e6])  # clipping hard, a little, and not at all
def test_clip_grad_norm_is_torch_bit_for_bit(max_norm: float):
    model, grads = _student_with_grads(1)
    params = list(model.parameters())
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    expected = [p.grad.clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    clip_grad_norm(params, max_norm)
    assert all(torch.equal(p.grad, e) for p, e in zip(params, expected))
    changed = not all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert changed == (float(total) > max_norm)


def test_clip_grad_norm_skips_missing_grads_and_falls_back_on_mixed_dtypes():
    model, grads = _student_with_grads(2)
    params = list(model.parameters())
    params[0].grad = None  # a parameter the loss did not reach
    expected = [None] + [g.clone() for g in grads[1:]]
    torch.nn.utils.clip_grad_norm_(params, 0.01)
    want = [None if p.grad is None else p.grad.clone() for p in params]
    for p, g in zip(params, expected):
        p.grad = None if g is None else g.clone()
    clip_grad_norm(params, 0.01)
    assert params[0].grad is None
    assert all(torch.equal(p.grad, w) for p, w in zip(params[1:], want[1:]))
    # Gradients of two dtypes: torch's own grouping handles them (the fallback), the same numbers.
    mixed = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, dtype=torch.float64))]
    mixed[0].grad, mixed[1].grad = torch.full((3,), 4.0), torch.full((2,), 3.0, dtype=torch.float64)
    clip_grad_norm(mixed, 1.0)
    total = (3 * 16 + 2 * 9) ** 0.5
    assert torch.allclose(mixed[0].grad, torch.full((3,), 4.0 / (total + 1e-6)))
    assert torch.allclose(mixed[1].grad, torch.full((2,), 3.0 / (total + 1e-6), dtype=torch.float64))


def test_epoch_meter_sums_are_the_per_step_products_summed():
    meter = EpochMeter(torch.device("cpu"))
    steps = [(128, 2.3456789, 2.1, 0.25), (128, float.fromhex("0x1.fffffep-1"), 0.75, 0.0), (37, 1e-7, 3e-8, 5.5)]
    want = [0.0, 0.0, 0.0, 0.0]
    for i, (n, loss, soft, hard) in enumerate(steps):
        vals = [torch.tensor(v, dtype=torch.float32) for v in (loss, soft, hard)]
        meter.add(i, n, *vals)
        for k in range(3):
            want[k] += float(vals[k]) * n  # float32 value, in float64, times n: what the meter used to add
        want[3] += n
    assert meter.sums.tolist() == want
    assert not meter.diverged()
    meter.add(3, 5, torch.tensor(float("nan")), torch.tensor(1.0), torch.tensor(0.0))
    meter.add(4, 5, torch.tensor(float("inf")), torch.tensor(1.0), torch.tensor(0.0))
    assert meter.diverged() and int(meter.first_bad) == 3


def test_runs_of_keeps_order_and_the_error_after_the_items_before_it():
    assert list(runs_of(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(runs_of([], 3)) == []

    def failing():
        yield from range(5)
        raise OSError("chunk 3 unreadable")

    got = []
    with pytest.raises(OSError, match="chunk 3 unreadable"):
        for item in read_ahead_in_runs(failing(), k=3):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]  # every item the source gave, then its error
    assert list(read_ahead_in_runs(iter(range(20)), k=8)) == list(range(20))


def test_read_ahead_in_runs_stopping_early_releases_the_thread():
    before = threading.active_count()
    items = read_ahead_in_runs(iter(range(10 ** 6)), k=8)
    assert [next(items) for _ in range(10)] == list(range(10))
    items.close()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before
