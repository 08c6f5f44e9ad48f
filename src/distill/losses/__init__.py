"""Divergences between teacher and student, the KD/SFT objective (naive and chunked), hidden-state matching."""
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
from distill.losses.hidden import HiddenStateMatcher, check_layer_map, default_layer_map
from distill.losses.kd import LossOutput, kd_loss, kd_loss_chunked

__all__ = [
    "DIVERGENCES",
    "HiddenStateMatcher",
    "LossOutput",
    "check_layer_map",
    "default_layer_map",
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
