"""Sparse teacher targets for large label spaces: top-K with an exact tail, or K sampled classes.

Pure functions, no I/O: the writer stores what these return, the trainer's losses
(`trainer.loss.topk_distillation_loss`, `sampled_distillation_loss`) consume it.

Top-K keeps the K largest raw logits and, per reference temperature T_r, the logsumexp of the
other C-K classes' z / T_r. With both, the teacher's probability of every kept class and the
total tail mass are exact at T_r; only how the tail mass splits over its classes is lost, which
costs at most p_tail * log(C-K) nats (`topk_kl_bound`).

Sampling keeps K draws (with replacement) from q = softmax(z / T_q), plus the full logsumexp
at each T_r. Importance weights p_T / q then give an unbiased estimate of KL(p_T || s_T) and of
its gradient at any stored T_r, not only at T_q.

All arrays are [n, V, ...]: n rows, V views per row, as in the full-logits store.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# The trainer can distil at these temperatures exactly (the tail / full logsumexp is stored for
# each); powers of two span what KD recipes use (1 to 8) with few extra floats per row.
REFERENCE_TEMPERATURES: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)

_MAX_COUNT = np.iinfo(np.uint16).max  # Sample.counts is uint16, so K draws must fit in it


def index_dtype(num_classes: int) -> np.dtype:
    """The narrowest unsigned integer that holds every class index: uint16 up to 65536 classes, else uint32.

    Never a float: float16/float32 cannot represent every index above 2048 / 2^24 exactly.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_classes <= 1 << 16:
        return np.dtype(np.uint16)
    if num_classes <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"num_classes {num_classes} does not fit a uint32 class index")


@dataclass
class TopK:
    """The top-K representation of [n, V, C] logits (all numpy, on the CPU)."""
    values: np.ndarray    # [n, V, K] float32: the K largest raw logits, descending
    indices: np.ndarray   # [n, V, K] index_dtype(C): their classes
    tail_lse: np.ndarray  # [n, V, R] float32: logsumexp of z_j / T_r over the C-K other classes


@dataclass
class Sample:
    """K draws from softmax(z / T_q) per (row, view), as distinct classes with counts (numpy, CPU).

    The distinct classes fill the first slots in ascending class order; the remaining slots are
    padding with count 0, index 0, logit 0 and proposal 0.
    """
    indices: np.ndarray   # [n, V, K] index_dtype(C)
    counts: np.ndarray    # [n, V, K] uint16: draws that hit the class; 0 = padding; sums to K
    logits: np.ndarray    # [n, V, K] float32: the teacher's raw logits of those classes
    proposal: np.ndarray  # [n, V, K] float32: q_i = softmax(z / T_q)_i
    lse: np.ndarray       # [n, V, R] float32: logsumexp over all C classes of z / T_r


def _check_temperatures(temperatures: Sequence[float]) -> tuple[float, ...]:
    temps = tuple(float(t) for t in temperatures)
    if not temps or not all(math.isfinite(t) and t > 0 for t in temps):
        raise ValueError(f"temperatures must be a non-empty list of finite positive numbers, got {list(temperatures)}")
    return temps


def encode_topk(logits: torch.Tensor | np.ndarray, k: int, temperatures: Sequence[float]) -> TopK:
    """The K largest logits of each (row, view), their classes, and the tail's logsumexp at each T.

    `logits` is [n, V, C], on any device; the work runs there in float32 and the result comes
    back as numpy on the CPU. Ties are broken by class index: values descend, and equal values
    are in ascending class order, with the lowest classes kept when a tie straddles the K-th
    place. This is exact integer/compare work, so it is the same on CPU and CUDA and for any
    batching (torch.topk alone leaves the order of ties to the kernel, and 16-bit teachers tie
    often). NaN and +inf logits are refused (ValueError); -inf logits are allowed and give
    tail_lse = -inf when the whole tail is -inf.
    """
    z = torch.as_tensor(logits)
    if z.ndim != 3:
        raise ValueError(f"logits must be [n, V, C], got shape {tuple(z.shape)}")
    n, v, c = z.shape
    if not 1 <= k < c:
        raise ValueError(f"top-K needs 1 <= k < number of classes ({c}), got k={k}; "
                         f"with k >= {c} store the full logits instead")
    temps = _check_temperatures(temperatures)
    z = z.float().reshape(n * v, c)
    if not bool((z < math.inf).all()):  # also False for NaN
        raise ValueError("logits must not be NaN or +inf")

    kth = torch.topk(z, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # the K-th largest value
    above = z > kth
    tie = z == kth
    room = k - above.sum(-1, keepdim=True)                     # how many of the tied classes fit
    keep = above | (tie & (torch.cumsum(tie, -1, dtype=torch.int32) <= room))
    idx = keep.nonzero()[:, 1].reshape(n * v, k)               # exactly k per row, ascending class
    vals = z.gather(-1, idx)
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices  # stable: ties keep class order
    idx, vals = idx.gather(-1, order), vals.gather(-1, order)

    tail = z.scatter(-1, idx, float("-inf"))
    tail_lse = torch.stack([torch.logsumexp(tail / t, dim=-1) for t in temps], dim=-1)

    return TopK(values=vals.reshape(n, v, k).cpu().numpy(),
                indices=idx.reshape(n, v, k).cpu().numpy().astype(index_dtype(c)),
                tail_lse=tail_lse.reshape(n, v, len(temps)).cpu().numpy())


def topk_probabilities(values: np.ndarray, tail_lse_at_T: np.ndarray, temperature: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(log p of the K kept classes [..., K], log p_tail [...]) at T, in float64, from stored fields only.

    `tail_lse_at_T` is the stored tail logsumexp at this T (z / T units). The normaliser is
    L = logaddexp(logsumexp(v / T), tail_lse), so the K+1 probabilities sum to 1 whatever
    rounding the stored values went through.
    """
    v = np.asarray(values, dtype=np.float64) / temperature
    tail = np.asarray(tail_lse_at_T, dtype=np.float64)
    top = v.max(axis=-1)  # finite: the largest kept logit is the row's largest
    head_lse = top + np.log(np.exp(v - top[..., None]).sum(axis=-1))
    norm = np.logaddexp(head_lse, tail)
    return v - norm[..., None], tail - norm


def topk_reconstruction_kl(full_logits: np.ndarray, topk: TopK, temperature_index: int,
                           temperature: float) -> np.ndarray:
    """Per (row, view) [n, V]: KL(softmax(z / T) || p_hat) in nats, float64.

    p_hat is what the top-K store can reconstruct: the stored probabilities of the K kept
    classes and the stored tail mass spread evenly over the C-K tail classes.
    """
    z = np.asarray(full_logits, dtype=np.float64) / temperature
    c, k = z.shape[-1], topk.values.shape[-1]
    top = z.max(axis=-1, keepdims=True)
    log_p = z - top - np.log(np.exp(z - top).sum(axis=-1, keepdims=True))

    log_pk, log_tail = topk_probabilities(topk.values, topk.tail_lse[..., temperature_index], temperature)
    log_p_hat = np.broadcast_to((log_tail - math.log(c - k))[..., None], z.shape).copy()
    np.put_along_axis(log_p_hat, topk.indices.astype(np.int64), log_pk, axis=-1)

    p = np.exp(log_p)
    terms = np.where(p > 0, p * (log_p - np.where(p > 0, log_p_hat, 0.0)), 0.0)  # 0 log 0 = 0
    return terms.sum(axis=-1)


def topk_kl_bound(topk: TopK, temperature_index: int, temperature: float, num_classes: int) -> np.ndarray:
    """Per (row, view) [n, V]: p_tail * log(C - K), an upper bound on `topk_reconstruction_kl`.

    Proof: p_hat equals p on the K kept classes, so KL(p || p_hat) = p_tail * KL(p_tail-normalised
    tail || uniform on C-K) = p_tail * (log(C-K) - H(tail)) <= p_tail * log(C-K), as H >= 0.
    Equality when the tail mass sits on one class; zero when the tail is flat.
    """
    k = topk.values.shape[-1]
    _, log_tail = topk_probabilities(topk.values, topk.tail_lse[..., temperature_index], temperature)
    return np.exp(log_tail) * math.log(num_classes - k)


def _logsumexp(x: np.ndarray) -> float:
    top = x.max()
    if top == -np.inf:
        return -np.inf
    return float(top + np.log(np.exp(x - top).sum()))


def encode_sample(logits: np.ndarray | torch.Tensor, k: int, temperatures: Sequence[float],
                  proposal_temperature: float, row_seeds: Sequence[Sequence[int]]) -> Sample:
    """K draws with replacement from q = softmax(z / proposal_temperature) per (row, view).

    Row i, view v draws from np.random.default_rng(list(row_seeds[i]) + [v]) and is computed
    alone, in float64, so a row's sample is a function of its logits and seed only: the same in
    any batch, in a resumed dump and on any rank. Inverse-CDF draws never pick a class with q = 0.
    `proposal_temperature` must be one of `temperatures`, so that q can be recomputed from the
    stored logits and lse. Costs O(C) per (row, view) on the CPU.
    """
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().numpy()
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 3:
        raise ValueError(f"logits must be [n, V, C], got shape {z.shape}")
    n, views, c = z.shape
    if not 1 <= k <= _MAX_COUNT:
        raise ValueError(f"the number of draws k must be in 1..{_MAX_COUNT} (counts are uint16), got {k}")
    temps = _check_temperatures(temperatures)
    if float(proposal_temperature) not in temps:
        raise ValueError(f"proposal_temperature {proposal_temperature} must be one of the stored "
                         f"temperatures {list(temps)}")
    if not bool((z < np.inf).all()):  # also False for NaN
        raise ValueError("logits must not be NaN or +inf")
    if len(row_seeds) != n:
        raise ValueError(f"need one seed per row: {len(row_seeds)} seeds for {n} rows")
    tq = temps.index(float(proposal_temperature))

    out = Sample(indices=np.zeros((n, views, k), index_dtype(c)), counts=np.zeros((n, views, k), np.uint16),
                 logits=np.zeros((n, views, k), np.float32), proposal=np.zeros((n, views, k), np.float32),
                 lse=np.zeros((n, views, len(temps)), np.float32))
    for i in range(n):
        seed = [int(s) for s in row_seeds[i]]
        for v in range(views):
            row = z[i, v]
            lse = [_logsumexp(row / t) for t in temps]
            if not math.isfinite(lse[tq]):
                raise ValueError(f"row {i} view {v}: every logit is -inf, there is nothing to sample")
            q = np.exp(row / temps[tq] - lse[tq])
            cdf = np.cumsum(q)
            u = np.random.default_rng(seed + [v]).random(k) * cdf[-1]
            # u < cdf[-1] except when the product rounds up; such a draw takes the last class with q > 0
            draws = np.minimum(np.searchsorted(cdf, u, side="right"), np.flatnonzero(q)[-1])
            cls, cnt = np.unique(draws, return_counts=True)
            m = len(cls)
            out.indices[i, v, :m] = cls
            out.counts[i, v, :m] = cnt
            out.logits[i, v, :m] = row[cls]
            out.proposal[i, v, :m] = q[cls]
            out.lse[i, v] = lse
    return out
