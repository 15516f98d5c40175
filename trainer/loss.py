"""Distillation losses as pure functions of logits (no state, no modules)."""
from __future__ import annotations

from typing import Mapping, Union

import torch
import torch.nn.functional as F

from logitstore import schema

from .inputs import NO_LABEL


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


# What a batch carries of the teacher: full logits [B, C] as a tensor, or a sparse store's target
# arrays as a dict of [B, K] tensors (names from logitstore.schema) with tail_lse / lse [B] already
# taken at the training temperature.
Teacher = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def soft_target_loss(student_logits: torch.Tensor, teacher: Teacher, temperature: float) -> torch.Tensor:
    """The distillation loss for what the store keeps: full logits, top-K with its tail, or sampled classes."""
    if isinstance(teacher, torch.Tensor):
        return distillation_loss(student_logits, teacher, temperature)
    if schema.TOPK_VALUES in teacher:
        return topk_distillation_loss(student_logits, teacher[schema.TOPK_VALUES], teacher[schema.TOPK_INDICES],
                                      teacher[schema.TAIL_LSE], temperature)
    return sampled_distillation_loss(student_logits, teacher[schema.SAMPLE_INDICES], teacher[schema.SAMPLE_COUNTS],
                                     teacher[schema.SAMPLE_LOGITS], teacher[schema.SAMPLE_PROPOSAL],
                                     teacher[schema.LSE], temperature)


def teacher_top1(teacher: Teacher) -> torch.Tensor:
    """The teacher's predicted class per row (sampled stores: the drawn class with the largest logit,
    which is the top-1 whenever it was drawn)."""
    if isinstance(teacher, torch.Tensor):
        return teacher.argmax(-1)
    if schema.TOPK_VALUES in teacher:
        return teacher[schema.TOPK_INDICES][:, 0].long()
    drawn = teacher[schema.SAMPLE_COUNTS].int() > 0  # .int(): torch cannot compare uint16
    z = teacher[schema.SAMPLE_LOGITS].float().masked_fill(~drawn, float("-inf"))
    return teacher[schema.SAMPLE_INDICES].long().gather(-1, z.argmax(-1, keepdim=True))[:, 0]


DISTILL_MODES = ("soft", "hard")


def hard_distillation_loss(student_logits: torch.Tensor, teacher: Teacher) -> torch.Tensor:
    """Cross-entropy against the teacher's top-1 class (DeiT's "hard distillation"), mean over the batch.

    No temperature: the target is a class, not a distribution. float32, like the soft loss."""
    return F.cross_entropy(student_logits.float(), teacher_top1(teacher))


def distill_loss(student_logits: torch.Tensor, teacher: Teacher, temperature: float, distill: str) -> torch.Tensor:
    """The distillation term of --distill: "soft" (`soft_target_loss` at `temperature`) or "hard"."""
    if distill == "hard":
        return hard_distillation_loss(student_logits, teacher)
    return soft_target_loss(student_logits, teacher, temperature)


def _teacher_rows(teacher: Teacher, rows: torch.Tensor) -> Teacher:
    """The teacher's targets for a subset of the batch (every target array is batch-first)."""
    if isinstance(teacher, torch.Tensor):
        return teacher[rows]
    return {k: v[rows] for k, v in teacher.items()}


def two_head_objective(cls_logits: torch.Tensor, dist_logits: torch.Tensor, teacher: Teacher,
                       labels: torch.Tensor | None, temperature: float, distill: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, distillation head's loss, class head's loss) of a DeiT-style student (Touvron et al. 2021).

        total = 1/2 L_cls + 1/2 L_dist
        L_dist = D(dist_logits, teacher)                      D: --distill soft (T^2 KL) or hard (CE to top-1)
        L_cls  = (sum over labeled rows of CE(cls_logits, label) + n_unlabeled * D(cls rows without a label))
                 / batch size

    so the class head learns the labels where images have one and the teacher's target elsewhere (every
    row when no labels were given). At eval time the student answers the average of its two heads.
    """
    dist_term = distill_loss(dist_logits, teacher, temperature, distill)
    has = labels != NO_LABEL if labels is not None else torch.zeros(len(cls_logits), dtype=torch.bool,
                                                                     device=cls_logits.device)
    n, n_lab = len(cls_logits), int(has.sum())
    cls_term = cls_logits.float().sum() * 0.0  # keeps the graph when a part is empty (DDP backprops every step)
    if n_lab:
        cls_term = cls_term + F.cross_entropy(cls_logits.float()[has], labels[has], reduction="sum") / n
    if n_lab < n:
        rest = ~has
        cls_term = cls_term + distill_loss(cls_logits[rest], _teacher_rows(teacher, rest), temperature,
                                           distill) * ((n - n_lab) / n)
    return 0.5 * cls_term + 0.5 * dist_term, dist_term.detach(), cls_term.detach()


def objective(student_logits: torch.Tensor | tuple[torch.Tensor, torch.Tensor], teacher_logits: Teacher,
              labels: torch.Tensor | None, temperature: float, alpha: float, distill: str = "soft"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, soft, hard): the distillation loss (--distill soft or hard) plus alpha times the hard-label
    loss where labels exist. A student that returns two heads (class, distillation) in training is
    trained by `two_head_objective` instead (alpha unused: its class head takes the labels)."""
    if isinstance(student_logits, (tuple, list)):
        return two_head_objective(student_logits[0], student_logits[1], teacher_logits, labels, temperature, distill)
    soft = distill_loss(student_logits, teacher_logits, temperature, distill)
    if alpha == 0 or labels is None:
        return soft, soft.detach(), torch.zeros((), device=soft.device)
    hard = hard_label_loss(student_logits, labels)
    return soft + alpha * hard, soft.detach(), hard.detach()


def topk_distillation_loss(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                           tail_lse: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL over K+1 buckets (the teacher's top-K classes and one tail bucket), mean over the batch.

    The teacher side is exact from a top-K store (`logitstore.sparse.encode_topk`): values [B, K]
    are its K largest raw logits at classes `indices` [B, K], tail_lse [B] the logsumexp of z / T
    over its other C-K classes at this T. The student's tail bucket is its probability mass on
    those same C-K classes, so the loss is a KL between two distributions on K+1 outcomes. It
    equals `distillation_loss` when K = C-1 and is <= it otherwise (merging outcomes never
    raises a KL). float32 throughout, like `distillation_loss`.
    """
    idx = indices.long()
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_s_top = log_s.gather(-1, idx)
    # masked_fill, not log(1 - sum p_top): the tail can be ~1e-8 of the mass, where 1 - sum cancels
    log_s_tail = torch.logsumexp(log_s.scatter(-1, idx, float("-inf")), dim=-1)

    v = values.float() / temperature
    tail = tail_lse.float()
    norm = torch.logaddexp(torch.logsumexp(v, dim=-1), tail)
    log_p = torch.cat([v - norm[:, None], (tail - norm)[:, None]], dim=-1)
    log_q = torch.cat([log_s_top, log_s_tail[:, None]], dim=-1)
    p = log_p.exp()
    # p = 0 (a tail of -inf logits) contributes 0, not 0 * -inf
    kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    return kl.mean() * (temperature * temperature)


def sampled_distillation_loss(student_logits: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
                              logits: torch.Tensor, proposal: torch.Tensor, lse: torch.Tensor,
                              temperature: float) -> torch.Tensor:
    """T^2 * importance-sampled estimate of KL(p_T || s_T), mean over the batch.

    From a sampled store (`logitstore.sparse.encode_sample`): K draws from a proposal q, kept as
    distinct classes `indices` [B, K] with `counts` (0 = padding), the teacher's raw `logits` and
    `proposal` q at them, and lse [B] = logsumexp(z / T) over all classes at this T. Per row,
        (1/K) sum_k counts_k * p_T(i_k) / q(i_k) * (log p_T(i_k) - log s_T(i_k)),  p_T(i) = exp(z_i/T - lse),
    whose expectation over the draws is KL(p_T || s_T), and whose gradient's expectation is the
    gradient of that KL, at any T with a stored lse (the weights p_T / q do the reweighting). The
    estimate of one row can be negative. Variance grows when q is much sharper than p_T (a
    proposal at T=1 serving a loss at T=8): the rarely drawn tail carries large weights.
    """
    idx = indices.long()
    n = counts.float()
    drawn = n > 0
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, idx)
    log_p = logits.float() / temperature - lse.float()[:, None]
    # padding has q = 0; give it q = 1 so that its weight is finite before the mask zeroes it
    log_q = torch.where(drawn, proposal.float(), torch.ones_like(n)).log()
    weight = torch.where(drawn, n * (log_p - log_q).exp(), torch.zeros_like(n))
    kl = (weight * (log_p - log_s)).sum(-1) / n.sum(-1).clamp_min(1)
    return kl.mean() * (temperature * temperature)
