"""Per-token divergences between teacher and student distributions, computed stably from logits.

Every function takes `[N, V]` logits (already divided by the temperature) and returns `[N]` values.
Math runs in at least float32: bf16/fp16 inputs are upcast, float64 inputs stay float64.
Probabilities only appear as `exp(log_softmax(...))`, so nothing ever takes log(0).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import DistillError

Divergence = Callable[[Tensor, Tensor], Tensor]


def log_probs(logits: Tensor) -> Tensor:
    """log_softmax over the vocabulary, in float32 for half-precision inputs (float64 stays float64)."""
    wide = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else None
    return F.log_softmax(logits, dim=-1, dtype=wide)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(P || Q) per row, from log-probabilities, as sum(p * log p) - sum(p * log q)."""
    # Two row-wise dot products (bmm) instead of (p * (log_p - log_q)).sum(-1): no [N, V] difference or
    # product tensor is built or saved for backward, only tensors that exist anyway; faster on CPU too.
    p = log_p.exp()
    return _row_dot(p, log_p) - _row_dot(p, log_q)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.einsum("nv,nv->n", a, b)


def _log_mixture(log_p: Tensor, log_q: Tensor, weight: float) -> Tensor:
    """log(weight * P + (1 - weight) * Q), as a two-term logsumexp."""
    if weight == 0.0:
        return log_q
    if weight == 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(weight), log_q + math.log1p(-weight))


# The divergences on log-probabilities (student first). The loss code calls these directly so each
# log_softmax is computed once and no scaled-logits copy outlives it.

def _forward_kl(log_s: Tensor, log_t: Tensor) -> Tensor:
    return _kl(log_t, log_s)


def _reverse_kl(log_s: Tensor, log_t: Tensor) -> Tensor:
    return _kl(log_s, log_t)


def _jsd(log_s: Tensor, log_t: Tensor, beta: float = 0.5) -> Tensor:
    log_m = _log_mixture(log_t, log_s, beta)
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def _skew_forward_kl(log_s: Tensor, log_t: Tensor, skew: float = 0.1) -> Tensor:
    return _kl(log_t, _log_mixture(log_t, log_s, skew))


def _skew_reverse_kl(log_s: Tensor, log_t: Tensor, skew: float = 0.1) -> Tensor:
    return _kl(log_s, _log_mixture(log_s, log_t, skew))


def _tvd(log_s: Tensor, log_t: Tensor) -> Tensor:
    return 0.5 * torch.linalg.vector_norm(log_t.exp() - log_s.exp(), ord=1, dim=-1)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(P_teacher || P_student): mass-covering, the classic KD objective."""
    return _forward_kl(log_probs(student_logits), log_probs(teacher_logits))


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(P_student || P_teacher): mode-seeking (MiniLLM)."""
    return _reverse_kl(log_probs(student_logits), log_probs(teacher_logits))


def jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised JSD as in TRL's GKD: beta*KL(P_t||M) + (1-beta)*KL(P_s||M), M = beta*P_t + (1-beta)*P_s."""
    _check_beta(beta)
    return _jsd(log_probs(student_logits), log_probs(teacher_logits), beta)


def skew_forward_kl(student_logits: Tensor, teacher_logits: Tensor, skew: float = 0.1) -> Tensor:
    """DistiLLM's skew KL: KL(P_t || skew*P_t + (1-skew)*P_s); skew=0 is forward KL."""
    _check_skew(skew)
    return _skew_forward_kl(log_probs(student_logits), log_probs(teacher_logits), skew)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, skew: float = 0.1) -> Tensor:
    """DistiLLM's skew reverse KL: KL(P_s || skew*P_s + (1-skew)*P_t); skew=0 is reverse KL."""
    _check_skew(skew)
    return _skew_reverse_kl(log_probs(student_logits), log_probs(teacher_logits), skew)


def tvd(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Total variation distance: 0.5 * sum |P_t - P_s|."""
    return _tvd(log_probs(student_logits), log_probs(teacher_logits))


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}

_ON_LOG_PROBS: dict[str, Callable[..., Tensor]] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
    "skew_forward_kl": _skew_forward_kl,
    "skew_reverse_kl": _skew_reverse_kl,
    "tvd": _tvd,
}


def get_divergence(name: str, *, beta: float = 0.5, skew: float = 0.1) -> Divergence:
    """The divergence called `name` on (student_logits, teacher_logits), with beta (jsd) or skew bound."""
    return _bind(DIVERGENCES, name, beta, skew)


def divergence_on_log_probs(name: str, *, beta: float = 0.5, skew: float = 0.1) -> Divergence:
    """Like `get_divergence`, but the function takes (student_log_probs, teacher_log_probs)."""
    return _bind(_ON_LOG_PROBS, name, beta, skew)


def _bind(table: dict[str, Callable[..., Tensor]], name: str, beta: float, skew: float) -> Divergence:
    if name not in table:
        raise DistillError(f"method.divergence: unknown divergence {name!r}; choose one of {', '.join(table)}")
    if name == "jsd":
        _check_beta(beta)
        return partial(table[name], beta=beta)
    if name.startswith("skew_"):
        _check_skew(skew)
        return partial(table[name], skew=skew)
    return table[name]


def _check_beta(beta: float) -> None:
    # beta 0 or 1 makes the JSD identically zero: a silent no-op loss.
    if not 0.0 < beta < 1.0:
        raise DistillError(f"method.beta: must be strictly between 0 and 1, got {beta}")


def _check_skew(skew: float) -> None:
    # skew 1 makes the mixture equal to the first distribution: the loss is identically zero.
    if not 0.0 <= skew < 1.0:
        raise DistillError(f"method.skew: must be in [0, 1), got {skew}")
