"""Distillation losses as pure functions of logits (no state, no modules)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NO_LABEL = -1


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target loss: T^2 * KL(softmax(t/T) || softmax(s/T)), mean over the batch.

    Always float32: stored logits may be float16 and the student may run in bf16, and a KL of
    two near-equal distributions loses everything to rounding in 16-bit types. The T^2 factor
    keeps the gradient scale independent of T (soft-target gradients shrink as 1/T^2).
    """
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    log_p_t = F.log_softmax(t, dim=-1)
    kl = F.kl_div(F.log_softmax(s, dim=-1), log_p_t, reduction="none", log_target=True).sum(-1)
    return kl.mean() * (temperature * temperature)


def hard_label_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the rows that have a label (label == NO_LABEL elsewhere); 0 if none do."""
    has = labels != NO_LABEL
    if not bool(has.any()):
        return student_logits.float().sum() * 0.0  # keeps the graph (DDP wants every step to backprop)
    return F.cross_entropy(student_logits.float()[has], labels[has])


def objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
              temperature: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, soft, hard): soft-target loss plus alpha times the hard-label loss where labels exist."""
    soft = distillation_loss(student_logits, teacher_logits, temperature)
    if alpha == 0 or labels is None:
        return soft, soft.detach(), torch.zeros((), device=soft.device)
    hard = hard_label_loss(student_logits, labels)
    return soft + alpha * hard, soft.detach(), hard.detach()


def ensemble_logits(teacher_logits: np.ndarray, weights: np.ndarray, temperature: float) -> np.ndarray:
    """Logits whose softmax at `temperature` is the weighted mean of the teachers' softmaxes.

    [n, K, C] logits of K teachers -> [n, C] float32: T * log(sum_k w_k softmax(t_k / T)). With
    these, `distillation_loss` at the same T distils from the ensemble's averaged probabilities
    (Hinton et al.'s ensemble target) with no change to the loss; the argmax is the ensemble's.
    """
    z = teacher_logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))            # log softmax per teacher
    mixed = log_p + np.log(np.asarray(weights, np.float64))[None, :, None]
    top = mixed.max(axis=1, keepdims=True)
    return (temperature * (top[:, 0] + np.log(np.exp(mixed - top).sum(axis=1)))).astype(np.float32)
