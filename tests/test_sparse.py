"""Sparse teacher targets: top-K with an exact tail and importance-sampled classes, against float64 references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from logitstore.sparse import (REFERENCE_TEMPERATURES, encode_sample, encode_topk, index_dtype,
                               topk_kl_bound, topk_probabilities, topk_reconstruction_kl)
from trainer.loss import distillation_loss, sampled_distillation_loss, topk_distillation_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny nets: one thread is faster


def teacher_like(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Logits shaped like a trained classifier's: Gaussian background, one confident class, a few related ones."""
    z = rng.normal(0.0, 1.5, shape)
    c = shape[-1]
    flat = z.reshape(-1, c)
    for row in flat:
        picks = rng.choice(c, size=min(c, 4), replace=False)
        row[picks[0]] += 9.0
        row[picks[1:]] += 5.0
    return flat.reshape(shape).astype(np.float32)


def log_softmax64(z: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(z, np.float64) / temperature
    top = z.max(axis=-1, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(axis=-1, keepdims=True))


def logsumexp64(z: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(z, np.float64) / temperature
    top = z.max(axis=-1)
    return top + np.log(np.exp(z - top[..., None]).sum(axis=-1))


# --- top-K ------------------------------------------------------------------------------------

def test_index_dtype_is_uint16_up_to_65536_classes_then_uint32():
    assert index_dtype(10) == np.uint16
    assert index_dtype(1000) == np.uint16
    assert index_dtype(65536) == np.uint16  # indices 0..65535
    assert index_dtype(65537) == np.uint32
    assert index_dtype(70000) == np.uint32


def test_topk_indices_above_65535_survive_in_uint32():
    z = np.zeros((1, 1, 70000), np.float32)
    z[0, 0, [69999, 65536, 3]] = [5.0, 4.0, 3.0]
    topk = encode_topk(torch.from_numpy(z), 3, [1.0])
    assert topk.indices.dtype == np.uint32
    assert topk.indices[0, 0].tolist() == [69999, 65536, 3]
    assert topk.values[0, 0].tolist() == [5.0, 4.0, 3.0]


def test_topk_keeps_the_k_largest_logits_descending_with_their_classes():
    rng = np.random.default_rng(0)
    z = teacher_like(rng, (4, 3, 1000))
    topk = encode_topk(torch.from_numpy(z), 20, REFERENCE_TEMPERATURES)
    assert topk.values.dtype == np.float32 and topk.indices.dtype == np.uint16 and topk.tail_lse.dtype == np.float32
    assert topk.values.shape == (4, 3, 20) and topk.tail_lse.shape == (4, 3, 4)
    np.testing.assert_array_equal(topk.values, -np.sort(-z, axis=-1)[..., :20])
    np.testing.assert_array_equal(np.take_along_axis(z, topk.indices.astype(np.int64), -1), topk.values)


@pytest.mark.parametrize("c,k", [(10, 1), (10, 9), (1000, 1), (1000, 50), (21841, 5), (21841, 200)])
def test_topk_stored_probabilities_and_tail_mass_equal_the_full_softmax_at_every_reference_temperature(c, k):
    rng = np.random.default_rng(c + k)
    z = teacher_like(rng, (3, 2, c))
    topk = encode_topk(torch.from_numpy(z), k, REFERENCE_TEMPERATURES)
    idx = topk.indices.astype(np.int64)
    for r, t in enumerate(REFERENCE_TEMPERATURES):
        log_p = log_softmax64(z, t)
        in_top = np.zeros(z.shape, bool)
        np.put_along_axis(in_top, idx, True, -1)
        want_tail = np.log(np.where(in_top, 0.0, np.exp(log_p)).sum(-1))
        want_tail_lse = logsumexp64(np.where(in_top, -np.inf, z), t)

        log_pk, log_tail = topk_probabilities(topk.values, topk.tail_lse[..., r], t)
        np.testing.assert_allclose(topk.tail_lse[..., r], want_tail_lse, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(log_pk, np.take_along_axis(log_p, idx, -1), rtol=0, atol=5e-6)
        np.testing.assert_allclose(log_tail, want_tail, rtol=0, atol=5e-6)
        np.testing.assert_allclose(np.exp(log_pk).sum(-1) + np.exp(log_tail), 1.0, rtol=1e-12)


@pytest.mark.parametrize("k", [0, 10, 11])
def test_topk_refuses_k_outside_1_to_c_minus_1(k):
    with pytest.raises(ValueError, match=r"1 <= k < number of classes \(10\)"):
        encode_topk(torch.zeros(2, 1, 10), k, [1.0])


def test_topk_breaks_ties_by_class_index_whatever_the_batch():
    row = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 3.0])
    topk = encode_topk(row.reshape(1, 1, 6), 3, [1.0])
    assert topk.indices[0, 0].tolist() == [1, 2, 4]  # class 5 ties at 3.0 too, and goes to the tail
    assert topk.values[0, 0].tolist() == [3.0, 3.0, 3.0]
    assert topk.tail_lse[0, 0, 0] == pytest.approx(math.log(math.exp(1) + math.exp(2) + math.exp(3)), rel=1e-6)

    # bf16 teachers tie constantly: the selection of a row must not depend on its neighbours
    rng = np.random.default_rng(1)
    z = torch.from_numpy(rng.normal(0, 2, (6, 2, 5000)).astype(np.float32)).bfloat16().float()
    whole = encode_topk(z, 64, REFERENCE_TEMPERATURES)
    for i in range(6):
        alone = encode_topk(z[i:i + 1], 64, REFERENCE_TEMPERATURES)
        np.testing.assert_array_equal(alone.indices, whole.indices[i:i + 1])
        np.testing.assert_array_equal(alone.values, whole.values[i:i + 1])
    v, ix = whole.values, whole.indices.astype(np.int64)
    assert np.all((v[..., :-1] > v[..., 1:]) | ((v[..., :-1] == v[..., 1:]) & (ix[..., :-1] < ix[..., 1:])))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_topk_on_cuda_selects_the_same_classes_as_on_cpu():
    rng = np.random.default_rng(2)
    z = torch.from_numpy(rng.normal(0, 2, (8, 2, 21841)).astype(np.float32)).half().float()
    cpu, gpu = encode_topk(z, 100, REFERENCE_TEMPERATURES), encode_topk(z.cuda(), 100, REFERENCE_TEMPERATURES)
    np.testing.assert_array_equal(cpu.indices, gpu.indices)
    np.testing.assert_array_equal(cpu.values, gpu.values)
    np.testing.assert_allclose(cpu.tail_lse, gpu.tail_lse, rtol=1e-6)


@pytest.mark.parametrize("c,ks", [(10, (1, 3, 9)), (1000, (1, 10, 100)), (21841, (1, 20, 500))])
def test_topk_reconstruction_kl_is_within_its_bound_on_teacher_like_logits(c, ks):
    rng = np.random.default_rng(c)
    z = teacher_like(rng, (4, 2, c))
    for k in ks:
        topk = encode_topk(torch.from_numpy(z), k, REFERENCE_TEMPERATURES)
        for r, t in enumerate(REFERENCE_TEMPERATURES):
            kl = topk_reconstruction_kl(z, topk, r, t)
            bound = topk_kl_bound(topk, r, t, c)
            assert kl.shape == bound.shape == (4, 2)
            assert np.all(kl >= -1e-12)
            assert np.all(kl <= bound * (1 + 1e-9) + 1e-12), (k, t, kl, bound)
            if k == c - 1:
                assert np.all(bound == 0) and np.all(kl < 1e-12)  # a one-class tail is exact


def test_topk_kl_bound_is_tight_when_the_tail_sits_on_one_class_and_zero_cost_when_flat():
    c, k = 1000, 10
    peaked = np.full((1, 1, c), -40.0, np.float32)
    peaked[0, 0, :k] = np.linspace(10, 8, k)
    peaked[0, 0, k] = 6.0  # nearly all of the tail mass on one class
    topk = encode_topk(torch.from_numpy(peaked), k, [1.0])
    kl, bound = topk_reconstruction_kl(peaked, topk, 0, 1.0), topk_kl_bound(topk, 0, 1.0, c)
    assert bound[0, 0] > 0.01 and kl[0, 0] / bound[0, 0] > 0.99

    flat = np.zeros((1, 1, c), np.float32)
    flat[0, 0, :k] = np.linspace(6, 4, k)
    topk = encode_topk(torch.from_numpy(flat), k, [1.0])
    kl, bound = topk_reconstruction_kl(flat, topk, 0, 1.0), topk_kl_bound(topk, 0, 1.0, c)
    assert bound[0, 0] > 1.0 and kl[0, 0] < 1e-9  # the even spread is the tail: nothing is lost


# --- top-K loss -------------------------------------------------------------------------------

def topk_args(topk, r: int = 0) -> tuple[torch.Tensor, ...]:
    """(values, indices, tail_lse at temperature index r) of view 0, as the trainer would batch them."""
    return (torch.from_numpy(topk.values[:, 0]), torch.from_numpy(topk.indices[:, 0].astype(np.int64)),
            torch.from_numpy(topk.tail_lse[:, 0, r]))


def bucket_kl_reference(student: np.ndarray, teacher: np.ndarray, idx: np.ndarray, t: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Per row: T^2 * KL over (K classes, tail) and its gradient w.r.t. the student's logits, float64."""
    log_p, log_s = log_softmax64(teacher, t), log_softmax64(student, t)
    p, s = np.exp(log_p), np.exp(log_s)
    in_top = np.zeros(teacher.shape, bool)
    np.put_along_axis(in_top, idx, True, -1)
    p_tail, s_tail = np.where(in_top, 0, p).sum(-1), np.where(in_top, 0, s).sum(-1)
    pk, sk = np.take_along_axis(p, idx, -1), np.take_along_axis(s, idx, -1)
    kl = (pk * np.log(pk / sk)).sum(-1) + p_tail * np.log(p_tail / s_tail)
    # d/ds_j of T^2 * KL: T * (s_j - p_bucket(j) * s_j / S_bucket(j)); a kept class is its own bucket
    ratio = np.where(in_top, p / s, (p_tail / s_tail)[:, None])
    return t * t * kl, t * (s - ratio * s)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0, 8.0])
def test_topk_loss_equals_distillation_loss_when_the_tail_is_one_class(t):
    rng = np.random.default_rng(3)
    c = 100
    teacher = teacher_like(rng, (16, 1, c))
    student = torch.from_numpy(rng.normal(0, 3, (16, c)).astype(np.float32))
    topk = encode_topk(torch.from_numpy(teacher), c - 1, [t])
    got = topk_distillation_loss(student, *topk_args(topk), t)
    want = distillation_loss(student, torch.from_numpy(teacher[:, 0]), t)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("k", [1, 5, 50])
@pytest.mark.parametrize("t", [1.0, 4.0])
def test_topk_loss_is_the_bucket_kl_below_the_full_kl_with_its_exact_gradient(k, t):
    rng = np.random.default_rng(k)
    b, c = 12, 300
    teacher = teacher_like(rng, (b, 1, c))
    student_np = teacher[:, 0] * 0.5 + rng.normal(0, 2, (b, c)).astype(np.float32)
    topk = encode_topk(torch.from_numpy(teacher), k, [t])
    values, idx, tail = topk_args(topk)

    want, want_grad = bucket_kl_reference(student_np, teacher[:, 0], idx.numpy(), t)
    per_row = [float(topk_distillation_loss(torch.from_numpy(student_np[i:i + 1]), values[i:i + 1], idx[i:i + 1],
                                            tail[i:i + 1], t)) for i in range(b)]
    full = [float(distillation_loss(torch.from_numpy(student_np[i:i + 1]), torch.from_numpy(teacher[i:i + 1, 0]), t))
            for i in range(b)]
    # float32 log-probabilities of size ~5 carry ~5e-7 absolute error, scaled by T^2
    np.testing.assert_allclose(per_row, want, rtol=1e-4, atol=1e-6 * t * t)
    assert all(bucket <= f * (1 + 1e-5) + 1e-6 * t * t for bucket, f in zip(per_row, full))
    assert sum(per_row) < 0.99 * sum(full)  # the grouping really loses something here

    student = torch.from_numpy(student_np).requires_grad_()
    topk_distillation_loss(student, values, idx, tail, t).backward()
    np.testing.assert_allclose(student.grad.numpy(), want_grad / b, rtol=1e-3, atol=1e-6)


def test_topk_loss_is_zero_when_the_student_is_the_teacher():
    rng = np.random.default_rng(5)
    teacher = teacher_like(rng, (8, 1, 500))
    for t in REFERENCE_TEMPERATURES:
        topk = encode_topk(torch.from_numpy(teacher), 10, [t])
        loss = topk_distillation_loss(torch.from_numpy(teacher[:, 0]), *topk_args(topk), t)
        assert abs(float(loss)) < 1e-5 * t * t


def test_topk_loss_is_finite_when_the_teachers_tail_is_minus_inf():
    teacher = torch.tensor([[[5.0, 1.0, -math.inf, -math.inf]]])
    topk = encode_topk(teacher, 2, [1.0])
    assert topk.tail_lse[0, 0, 0] == -np.inf
    student = torch.tensor([[2.0, 0.0, 1.0, -1.0]], requires_grad=True)
    loss = topk_distillation_loss(student, *topk_args(topk), 1.0)
    loss.backward()
    p = np.exp([5.0, 1.0]) / np.exp([5.0, 1.0]).sum()
    s = np.exp([2.0, 0.0, 1.0, -1.0]) / np.exp([2.0, 0.0, 1.0, -1.0]).sum()
    assert float(loss.detach()) == pytest.approx(float((p * np.log(p / s[:2])).sum()), rel=1e-5)
    assert torch.isfinite(student.grad).all()


# --- sampled ----------------------------------------------------------------------------------

def seeds(rows) -> list[tuple[int, int]]:
    return [(20240601, r) for r in rows]


@pytest.mark.parametrize("tq", [1.0, 4.0])
def test_sample_counts_sum_to_k_classes_are_distinct_and_padding_is_empty(tq):
    rng = np.random.default_rng(6)
    z = teacher_like(rng, (5, 3, 1000))
    k = 64
    s = encode_sample(z, k, REFERENCE_TEMPERATURES, tq, seeds(range(5)))
    assert s.indices.dtype == np.uint16 and s.counts.dtype == np.uint16
    assert s.logits.dtype == s.proposal.dtype == s.lse.dtype == np.float32
    np.testing.assert_array_equal(s.counts.astype(int).sum(-1), k)
    pad = s.counts == 0
    assert pad.any() and (~pad).any()
    assert np.all(s.indices[pad] == 0) and np.all(s.logits[pad] == 0) and np.all(s.proposal[pad] == 0)
    # drawn classes fill the first slots, in strictly increasing (so distinct) class order
    assert np.all(np.diff(pad.astype(int), axis=-1) >= 0)
    ix = s.indices.astype(np.int64)
    assert np.all((np.diff(ix, axis=-1) > 0) | pad[..., 1:])

    idx = np.where(pad, 0, ix)
    np.testing.assert_array_equal(np.where(pad, 0, np.take_along_axis(z, idx, -1)), s.logits)
    q = np.exp(log_softmax64(z, tq))
    np.testing.assert_allclose(s.proposal, np.where(pad, 0, np.take_along_axis(q, idx, -1)), rtol=1e-6)
    for r, t in enumerate(REFERENCE_TEMPERATURES):
        np.testing.assert_allclose(s.lse[..., r], logsumexp64(z, t), rtol=1e-6)


def test_sample_of_a_row_is_byte_identical_whatever_batch_it_is_in():
    rng = np.random.default_rng(7)
    z = teacher_like(rng, (6, 2, 3000))
    args = (32, REFERENCE_TEMPERATURES, 2.0)
    whole = encode_sample(z, *args, seeds(range(6)))
    parts = [encode_sample(z[:2], *args, seeds(range(2))),
             encode_sample(torch.from_numpy(z[2:]), *args, seeds(range(2, 6)))]  # a tensor gives the same
    backwards = encode_sample(z[::-1].copy(), *args, seeds(range(5, -1, -1)))
    for field in ("indices", "counts", "logits", "proposal", "lse"):
        a = getattr(whole, field)
        joined = np.concatenate([getattr(p, field) for p in parts])
        assert a.tobytes() == joined.tobytes(), field
        assert a.tobytes() == getattr(backwards, field)[::-1].copy().tobytes(), field
    # the seed is the row's, plus the view: views of one row get different draws
    assert not np.array_equal(whole.indices[:, 0], whole.indices[:, 1])
    other = encode_sample(z, *args, [(20240602, r) for r in range(6)])
    assert not np.array_equal(whole.counts, other.counts)


def test_sample_never_draws_a_class_the_proposal_cannot_reach():
    z = np.full((1, 1, 20), -np.inf, np.float32)
    z[0, 0, [3, 11]] = [0.0, 1.0]
    s = encode_sample(z, 200, [1.0], 1.0, [(0,)])
    assert set(s.indices[0, 0][s.counts[0, 0] > 0].tolist()) == {3, 11}


def test_encoders_refuse_nan_and_plus_inf_logits():
    for bad in (math.nan, math.inf):
        z = torch.zeros(1, 1, 5)
        z[0, 0, 2] = bad
        with pytest.raises(ValueError, match=r"NaN or \+inf"):
            encode_topk(z, 2, [1.0])
        with pytest.raises(ValueError, match=r"NaN or \+inf"):
            encode_sample(z, 2, [1.0], 1.0, [(0,)])


def test_sample_refuses_a_proposal_temperature_that_is_not_stored_and_bad_k():
    z = np.zeros((2, 1, 10), np.float32)
    with pytest.raises(ValueError, match="proposal_temperature 3.0 must be one of the stored temperatures"):
        encode_sample(z, 4, REFERENCE_TEMPERATURES, 3.0, seeds(range(2)))
    with pytest.raises(ValueError, match="number of draws k"):
        encode_sample(z, 0, REFERENCE_TEMPERATURES, 1.0, seeds(range(2)))
    with pytest.raises(ValueError, match="one seed per row"):
        encode_sample(z, 4, REFERENCE_TEMPERATURES, 1.0, seeds(range(3)))


def sampled_args(s, t: float) -> tuple[torch.Tensor, ...]:
    r = REFERENCE_TEMPERATURES.index(t)
    return (torch.from_numpy(s.indices[:, 0].astype(np.int64)), torch.from_numpy(s.counts[:, 0].astype(np.int64)),
            torch.from_numpy(s.logits[:, 0]), torch.from_numpy(s.proposal[:, 0]), torch.from_numpy(s.lse[:, 0, r]))


def test_sampled_loss_ignores_padding_and_is_zero_when_the_student_is_the_teacher():
    rng = np.random.default_rng(8)
    z = teacher_like(rng, (4, 1, 200))
    s = encode_sample(z, 16, REFERENCE_TEMPERATURES, 1.0, seeds(range(4)))
    student = torch.from_numpy(rng.normal(0, 2, (4, 200)).astype(np.float32))
    idx, counts, logits, proposal, lse = sampled_args(s, 2.0)
    base = sampled_distillation_loss(student, idx, counts, logits, proposal, lse, 2.0)
    pad = counts == 0
    assert bool(pad.any())
    junk = sampled_distillation_loss(student, torch.where(pad, 7, idx), counts, torch.where(pad, 50.0, logits),
                                     proposal, lse, 2.0)
    assert torch.isfinite(base) and float(junk) == float(base)
    same = sampled_distillation_loss(torch.from_numpy(z[:, 0]), idx, counts, logits, proposal, lse, 2.0)
    assert abs(float(same)) < 1e-5


@pytest.mark.parametrize("tq", [1.0, 4.0])
def test_sampled_loss_and_its_gradient_are_unbiased_at_any_stored_temperature(tq):
    draws, c, k = 4000, 50, 8
    rng = np.random.default_rng(9)
    # A moderately confident teacher: with a proposal much sharper than the target (T_q=1 for a
    # loss at T=4 on a +9-logit teacher) the weights p_T/q are heavy-tailed and 4000 draws' SE is
    # no longer a reliable yardstick, though the estimator stays unbiased.
    teacher = 0.4 * teacher_like(rng, (1, 1, c))
    student_row = (0.5 * teacher[0, 0] + rng.normal(0, 1.5, c)).astype(np.float32)
    s = encode_sample(np.repeat(teacher, draws, axis=0), k, REFERENCE_TEMPERATURES, tq, [(s,) for s in range(draws)])

    for t in (1.0, 4.0):
        log_p, log_s = log_softmax64(teacher[0, 0], t), log_softmax64(student_row, t)
        exact = t * t * float((np.exp(log_p) * (log_p - log_s)).sum())
        exact_grad = t * (np.exp(log_s) - np.exp(log_p))

        # one independent draw per row; vmap evaluates the loss (and its gradient) row by row
        student = torch.from_numpy(np.repeat(student_row[None], draws, axis=0)).requires_grad_()
        per_draw = torch.func.vmap(lambda *a: sampled_distillation_loss(*(x[None] for x in a), t))(
            student, *sampled_args(s, t))
        per_draw.sum().backward()
        values, grads = per_draw.detach().numpy().astype(np.float64), student.grad.numpy().astype(np.float64)

        se = values.std(ddof=1) / math.sqrt(draws)
        assert se < 0.05 * exact  # the check below has teeth
        assert abs(values.mean() - exact) < 4 * se, (t, values.mean(), exact, se)

        mean_grad = grads.mean(0)
        z = (mean_grad - exact_grad) / (grads.std(0, ddof=1) / math.sqrt(draws))
        assert np.all(np.abs(z) < 5), (t, z)
        assert (z ** 2).sum() < 100  # chi-square with ~49 degrees of freedom: P(> 100) ~ 2e-5
        cosine = mean_grad @ exact_grad / (np.linalg.norm(mean_grad) * np.linalg.norm(exact_grad))
        assert cosine > 0.98
