"""Divergences between teacher and student, and the KD/SFT objective (naive and chunked)."""
from distill.losses.divergences import (
    DIVERGENCES,
    forward_kl,
    get_divergence,
    jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from distill.losses.kd import LossOutput, kd_loss, kd_loss_chunked

__all__ = [
    "DIVERGENCES",
    "LossOutput",
    "forward_kl",
    "get_divergence",
    "jsd",
    "kd_loss",
    "kd_loss_chunked",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
]
