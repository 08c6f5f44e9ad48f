"""Divergences between teacher and student, the KD/SFT objective (naive and chunked; dense or sparse top-k
teacher signal), hidden-state matching."""
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
from distill.losses.kd import kd_loss, kd_loss_chunked
from distill.losses.objective import LossOutput
from distill.losses.sparse import SparseTargets, kd_loss_sparse, kd_loss_sparse_chunked

__all__ = [
    "DIVERGENCES",
    "HiddenStateMatcher",
    "LossOutput",
    "SparseTargets",
    "check_layer_map",
    "default_layer_map",
    "forward_kl",
    "get_divergence",
    "jsd",
    "kd_loss",
    "kd_loss_chunked",
    "kd_loss_sparse",
    "kd_loss_sparse_chunked",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
]
