"""The distillation loss against a float64 reference, and the hard-label term."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.inputs import NO_LABEL
from trainer.loss import distillation_loss, hard_label_loss, objective

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny nets: one thread is faster


def reference_kd(student: np.ndarray, teacher: np.ndarray, T: float) -> float:
    """T^2 * mean_i sum_c p_t log(p_t / p_s), in float64 with NumPy."""
    def softmax(z):
        z = z / T
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)
    p_s, p_t = softmax(student.astype(np.float64)), softmax(teacher.astype(np.float64))
    return float(T * T * (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=1).mean())


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0, 10.0])
def test_distillation_loss_matches_float64_reference(T):
    rng = np.random.default_rng(0)
    student = rng.normal(0, 3, (64, 100)).astype(np.float32)
    teacher = rng.normal(0, 5, (64, 100)).astype(np.float16)  # stored logits are float16
    got = distillation_loss(torch.from_numpy(student), torch.from_numpy(teacher), T)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(reference_kd(student, teacher.astype(np.float32), T), rel=1e-5, abs=1e-6)


def test_distillation_loss_is_computed_in_float32_from_bf16_student():
    rng = np.random.default_rng(1)
    student = torch.from_numpy(rng.normal(0, 2, (32, 10)).astype(np.float32)).bfloat16()
    teacher = torch.from_numpy(rng.normal(0, 2, (32, 10)).astype(np.float16))
    got = distillation_loss(student, teacher, 4.0)
    assert got.dtype == torch.float32
    ref = reference_kd(student.float().numpy(), teacher.float().numpy(), 4.0)
    assert float(got) == pytest.approx(ref, rel=1e-5)


def test_distillation_loss_is_zero_when_student_equals_teacher_and_grows_otherwise():
    z = torch.randn(8, 5)
    assert float(distillation_loss(z, z.half().float(), 3.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(z, z + torch.randn(8, 5), 3.0)) > 0.01


def test_hard_label_loss_uses_only_labeled_rows():
    logits = torch.randn(6, 4)
    labels = torch.tensor([2, NO_LABEL, 0, NO_LABEL, 3, 1])
    has = labels != NO_LABEL
    expected = torch.nn.functional.cross_entropy(logits[has], labels[has])
    assert float(hard_label_loss(logits, labels)) == pytest.approx(float(expected), rel=1e-6)
    assert float(hard_label_loss(logits, torch.full((6,), NO_LABEL))) == 0.0


def test_objective_adds_alpha_times_cross_entropy():
    torch.manual_seed(0)
    s, t = torch.randn(16, 10), torch.randn(16, 10)
    labels = torch.randint(0, 10, (16,))
    total, soft, hard = objective(s, t, labels, 2.0, 0.3)
    assert float(soft) == pytest.approx(float(distillation_loss(s, t, 2.0)), rel=1e-6)
    assert float(hard) == pytest.approx(float(torch.nn.functional.cross_entropy(s, labels)), rel=1e-6)
    assert float(total) == pytest.approx(float(soft) + 0.3 * float(hard), rel=1e-6)
    total0, _, hard0 = objective(s, t, labels, 2.0, 0.0)
    assert float(total0) == pytest.approx(float(soft)) and float(hard0) == 0.0


def test_gradient_scale_is_about_independent_of_temperature():
    # The T^2 factor exists so soft-target gradients do not vanish as T grows (Hinton et al. 2015).
    torch.manual_seed(0)
    t = torch.randn(64, 10)
    norms = []
    for T in (4.0, 16.0):
        s = torch.zeros(64, 10, requires_grad=True)
        distillation_loss(s, t, T).backward()
        norms.append(float(s.grad.norm()))  # dL/ds = T (p_s - p_t) ~ (s - t) / C for large T
    assert math.isclose(norms[0], norms[1], rel_tol=0.2)
