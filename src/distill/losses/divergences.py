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


def _log_probs(logits: Tensor) -> Tensor:
    """log_softmax over the vocabulary in float32 or wider."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.log_softmax(logits, dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(P || Q) per row, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mixture(log_p: Tensor, log_q: Tensor, weight: float) -> Tensor:
    """log(weight * P + (1 - weight) * Q), as a two-term logsumexp."""
    if weight == 0.0:
        return log_q
    if weight == 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(weight), log_q + math.log1p(-weight))


def forward_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(P_teacher || P_student): mass-covering, the classic KD objective."""
    return _kl(_log_probs(teacher_logits), _log_probs(student_logits))


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(P_student || P_teacher): mode-seeking (MiniLLM)."""
    return _kl(_log_probs(student_logits), _log_probs(teacher_logits))


def jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised JSD as in TRL's GKD: beta*KL(P_t||M) + (1-beta)*KL(P_s||M), M = beta*P_t + (1-beta)*P_s."""
    _check_open_unit("beta", beta)
    log_t, log_s = _log_probs(teacher_logits), _log_probs(student_logits)
    log_m = _log_mixture(log_t, log_s, beta)
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def skew_forward_kl(student_logits: Tensor, teacher_logits: Tensor, skew: float = 0.1) -> Tensor:
    """DistiLLM's skew KL: KL(P_t || skew*P_t + (1-skew)*P_s); skew=0 is forward KL."""
    _check_skew(skew)
    log_t, log_s = _log_probs(teacher_logits), _log_probs(student_logits)
    return _kl(log_t, _log_mixture(log_t, log_s, skew))


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, skew: float = 0.1) -> Tensor:
    """DistiLLM's skew reverse KL: KL(P_s || skew*P_s + (1-skew)*P_t); skew=0 is reverse KL."""
    _check_skew(skew)
    log_t, log_s = _log_probs(teacher_logits), _log_probs(student_logits)
    return _kl(log_s, _log_mixture(log_s, log_t, skew))


def tvd(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Total variation distance: 0.5 * sum |P_t - P_s|."""
    p_t, p_s = _log_probs(teacher_logits).exp(), _log_probs(student_logits).exp()
    return 0.5 * (p_t - p_s).abs().sum(-1)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}


def get_divergence(name: str, *, beta: float = 0.5, skew: float = 0.1) -> Divergence:
    """The divergence called `name`, with its mixing weight (beta for jsd, skew for skew KL) bound."""
    if name not in DIVERGENCES:
        raise DistillError(f"method.divergence: unknown divergence {name!r}; choose one of {', '.join(DIVERGENCES)}")
    if name == "jsd":
        _check_open_unit("beta", beta)
        return partial(jsd, beta=beta)
    if name.startswith("skew_"):
        _check_skew(skew)
        return partial(DIVERGENCES[name], skew=skew)
    return DIVERGENCES[name]


def _check_open_unit(key: str, value: float) -> None:
    # beta 0 or 1 makes the JSD identically zero: a silent no-op loss.
    if not 0.0 < value < 1.0:
        raise DistillError(f"method.{key}: must be strictly between 0 and 1, got {value}")


def _check_skew(skew: float) -> None:
    # skew 1 makes the mixture equal to the first distribution: the loss is identically zero.
    if not 0.0 <= skew < 1.0:
        raise DistillError(f"method.skew: must be in [0, 1), got {skew}")
