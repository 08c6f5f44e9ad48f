"""The KD objective against a sparse teacher signal: top-k log-probs plus the mass outside them (the tail).

Both distributions are coarsened to k + 1 buckets: the teacher's k kept tokens, and "everything else".
The student's buckets are its own log-probs at the kept ids and the logsumexp of all its other tokens, so
every divergence of distill.losses.divergences applies unchanged to the [N, k + 1] log-probs:
- forward KL = sum_S p log(p / q) + p_tail log(p_tail / q_tail): exact on the support, plus the tail term;
- reverse KL and JSD use the student's own mass on the support plus its tail mass.
With k = vocab the tail is empty and the loss equals the dense one.

Temperature. Values are stored at T = 1. On the support, log p_T = log p / T - log Z_T exactly. The tail's
tempered mass sum_{v in tail} p_v^(1/T) is unknown; it is approximated by spreading the tail mass uniformly over
its M = V - k tokens: M * (p_tail / M)^(1/T). That is exact at T = 1 and when the tail is empty, an upper bound
for T > 1 and a lower bound for T < 1 (x^(1/T) is concave or convex). Then all k + 1 buckets are renormalised.

Ids at or beyond the student's vocabulary (a teacher head padded past the tokenizer) get zero mass on both
sides, as the dense loss drops those rows of the teacher.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from distill.errors import DistillError
from distill.losses.divergences import log_probs
from distill.losses.objective import (
    IGNORE_INDEX,
    LossOutput,
    LossSettings,
    Objective,
    build_objective,
    check_labels,
    cross_entropy_sum,
    empty_output,
    fused_chunked_loss,
    tempered,
    wide,
)
from distill.losses.weighting import Weighting, weighted_sum

# A log-prob whose exp() is exactly 0 in float32/float64, but finite (0 * -inf would be NaN in the KL sums).
FLOOR = -1.0e4


@dataclass
class SparseTargets:
    """The teacher's top-k signal at the trained positions, in order: one row per label that is not -100."""

    ids: Tensor  # [n, k] long
    log_probs: Tensor  # [n, k] float, log-softmax over the teacher's full vocabulary at T = 1
    tail: Tensor  # [n] float, log of the mass outside the top-k
    vocab_size: int  # the teacher's vocabulary (rows of its head)
    weights: Optional[Tensor] = None  # [n] per-position weights of the KD term (method.weighting), or None

    def __post_init__(self) -> None:
        n, k = self.ids.shape
        if self.log_probs.shape != (n, k) or self.tail.shape != (n,):
            raise DistillError(f"sparse targets: ids {tuple(self.ids.shape)}, log_probs "
                               f"{tuple(self.log_probs.shape)} and tail {tuple(self.tail.shape)} do not agree")

    def __len__(self) -> int:
        return self.ids.size(0)

    def to(self, device: torch.device | str) -> "SparseTargets":
        weights = None if self.weights is None else self.weights.to(device)
        return SparseTargets(self.ids.to(device), self.log_probs.to(device), self.tail.to(device), self.vocab_size,
                             weights)

    def rows(self, index: slice | Tensor) -> "SparseTargets":
        weights = None if self.weights is None else self.weights[index]
        return SparseTargets(self.ids[index], self.log_probs[index], self.tail[index], self.vocab_size, weights)

    def weighted(self, weighting: Weighting) -> "SparseTargets":
        """These rows with the KD weights of `weighting` (averaging 1 over them); unchanged when it is off."""
        if not weighting.on or len(self) == 0:
            return self
        confidence = weighting.sparse_confidence(self.ids, self.log_probs, self.tail, self.vocab_size)
        return SparseTargets(self.ids, self.log_probs, self.tail, self.vocab_size, weighting.weights(confidence))

    def top1_matches(self, hidden: Tensor, head: Tensor, labels: Tensor, chunk_size: int) -> int:
        """How many trained positions' student top-1 token is the teacher's top-1 (from the kept log-probs)."""
        valid = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        teacher = self.ids.gather(1, self.log_probs.argmax(dim=1, keepdim=True)).squeeze(1).to(hidden.device)
        shared, matches = min(head.size(0), self.vocab_size), 0
        with torch.no_grad():
            for start in range(0, valid.numel(), chunk_size):
                rows = valid[start:start + chunk_size]
                student = (hidden[rows].to(head.dtype) @ head[:shared].t()).argmax(dim=1)
                matches += int((student == teacher[start:start + chunk_size]).sum())
        return matches

    def chunked_loss(self, hidden: Tensor, head: Tensor, labels: Tensor, settings: "LossSettings") -> LossOutput:
        """The objective against these cached top-k targets, `settings.chunk_size` positions at a time."""
        return kd_loss_sparse_chunked(hidden, head, self, labels, **settings.keywords())


def teacher_buckets(targets: SparseTargets, shared_vocab: int, temperature: float, dtype: torch.dtype) -> Tensor:
    """[n, k + 1] teacher log-probs at temperature T over the kept ids and the tail (see the module doc)."""
    t = temperature
    valid = targets.ids < shared_vocab
    support = torch.where(valid, targets.log_probs.to(dtype) / t, FLOOR)
    tail = targets.tail.to(dtype)
    tail_tokens = targets.vocab_size - targets.ids.size(1)
    if tail_tokens <= 0:
        tail = torch.full_like(tail, FLOOR)
    elif t != 1.0:
        log_m = math.log(tail_tokens)
        tail = log_m + (tail - log_m) / t
    buckets = torch.cat([support, tail.clamp(min=FLOOR)[:, None]], dim=1)
    return torch.log_softmax(buckets, dim=1)


def student_buckets(student_log_probs: Tensor, ids: Tensor) -> Tensor:
    """[n, k + 1] student log-probs at the kept ids (FLOOR beyond its vocabulary) and over all other tokens."""
    vocab = student_log_probs.size(1)
    valid = ids < vocab
    safe = torch.where(valid, ids, 0)
    support = torch.where(valid, student_log_probs.gather(1, safe), FLOOR)
    # A spare column takes the out-of-vocabulary ids, so scatter never writes a real token for them.
    kept = torch.zeros(ids.size(0), vocab + 1, dtype=torch.bool, device=ids.device)
    kept.scatter_(1, torch.where(valid, ids, vocab), True)
    tail = student_log_probs.masked_fill(kept[:, :vocab], FLOOR).logsumexp(dim=1)
    return torch.cat([support, tail[:, None]], dim=1)


def _sparse_sums(
    objective: Objective, student_logits: Tensor, targets: SparseTargets, labels: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, ce, kd) summed over rows; kd carries the T^2 factor, as in the dense objective."""
    student, t = wide(student_logits), objective.temperature
    shared = min(student.size(1), targets.vocab_size)
    student_log_probs = log_probs(tempered(student[:, :shared], t))
    if t == 1.0 and shared == student.size(1):
        ce = -student_log_probs.gather(1, labels[:, None]).sum()
    else:
        ce = cross_entropy_sum(student, labels)
    teacher = teacher_buckets(targets, shared, t, student_log_probs.dtype)
    kd = t * t * weighted_sum(objective.divergence(student_buckets(student_log_probs, targets.ids), teacher),
                              targets.weights)
    return objective.alpha * ce + (1.0 - objective.alpha) * kd, ce, kd


def _valid_rows(labels: Tensor, targets: SparseTargets) -> Tensor:
    valid = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    if valid.numel() != len(targets):
        raise DistillError(f"the teacher cache has {len(targets)} positions for this batch but the batch trains "
                           f"{valid.numel()}; the cache does not belong to this data")
    return valid


def _check_k(targets: SparseTargets) -> None:
    if targets.ids.size(1) > targets.vocab_size:
        raise DistillError(f"teacher cache: k = {targets.ids.size(1)} is larger than the vocabulary "
                           f"({targets.vocab_size})")


def kd_loss_sparse(
    student_logits: Tensor, targets: SparseTargets, labels: Tensor, *, divergence: str = "forward_kl",
    temperature: float = 1.0, alpha: float = 0.5, beta: float = 0.5, skew: float = 0.1,
    weighting: str = "none", weighting_floor: float = 0.1, weighting_temperature: float = 1.0,
) -> LossOutput:
    """The objective on full `[N, V]` student logits against sparse targets (the reference for the chunked one)."""
    objective = build_objective(divergence, temperature, alpha, beta, skew)
    targets = targets.weighted(Weighting(weighting, weighting_floor, weighting_temperature))
    _check_k(targets)
    check_labels(labels, student_logits.size(-1))
    valid = _valid_rows(labels, targets)
    if valid.numel() == 0:
        return empty_output(student_logits)
    n = valid.numel()
    loss, ce, kd = _sparse_sums(objective, student_logits[valid], targets.to(student_logits.device), labels[valid])
    return LossOutput(loss=loss / n, kd=kd.detach() / n, ce=ce.detach() / n, n_tokens=n)


def kd_loss_sparse_chunked(
    student_hidden: Tensor, student_head: Tensor, targets: SparseTargets, labels: Tensor, *,
    divergence: str = "forward_kl", temperature: float = 1.0, alpha: float = 0.5, beta: float = 0.5,
    skew: float = 0.1, chunk_size: int = 192, weighting: str = "none", weighting_floor: float = 0.1,
    weighting_temperature: float = 1.0,
) -> LossOutput:
    """`kd_loss_sparse` from hidden states and the student head, `chunk_size` positions at a time.

    Like `kd_loss_chunked`, it never holds more than [chunk_size, V] student logits, and its gradients for the
    hidden states and head are computed during the forward pass.
    """
    objective = build_objective(divergence, temperature, alpha, beta, skew)
    if chunk_size <= 0:
        raise DistillError(f"method.chunk_size: must be > 0, got {chunk_size}")
    _check_k(targets)
    if student_hidden.dim() != 2 or labels.shape != student_hidden.shape[:1] \
            or student_head.size(1) != student_hidden.size(1):
        raise DistillError(f"kd_loss_sparse_chunked: expected hidden [N, D], head [V, D], labels [N]; got "
                           f"{tuple(student_hidden.shape)}, {tuple(student_head.shape)}, {tuple(labels.shape)}")
    check_labels(labels, student_head.size(0))
    valid = _valid_rows(labels, targets)
    n = valid.numel()
    if n == 0:
        return empty_output(student_hidden, student_head)
    if n < labels.numel():
        student_hidden, labels = student_hidden[valid], labels[valid]
    targets = targets.to(student_hidden.device).weighted(Weighting(weighting, weighting_floor, weighting_temperature))
    loss, ce, kd = fused_chunked_loss(student_hidden, student_head, targets, labels, objective, chunk_size,
                                      _sparse_chunk)
    return LossOutput(loss=loss, kd=kd, ce=ce, n_tokens=n)


def _sparse_chunk(
    hidden: Tensor, head: Tensor, targets: SparseTargets, labels: Tensor, objective: Objective, scale: float,
    grad_hidden_out: Optional[Tensor], grad_head_acc: Optional[Tensor],
) -> Tensor:
    """One chunk's summed (loss, ce, kd); writes its hidden grads and adds its head grad in place.

    The [rows, V] part of the gradient is written by hand: the loss depends on the logits only through the
    softmax, the k kept logits, the tail mass and the label's logit, so d(loss)/d(logits) is one softmax scaled
    per row plus sparse corrections. Autograd runs only on the [rows, k + 1] bucket log-probs. This costs a few
    passes over [rows, V] more than plain CE, where autograd through the same math would cost a dozen.
    """
    want_grad = grad_hidden_out is not None or grad_head_acc is not None
    logits = wide(hidden @ head.t())
    t, alpha, k = objective.temperature, objective.alpha, targets.ids.size(1)
    shared = min(logits.size(1), targets.vocab_size)
    scaled = tempered(logits[:, :shared], t)
    log_norm = torch.logsumexp(scaled, dim=1)
    probs = torch.exp(scaled - log_norm[:, None])  # the student at temperature T
    del scaled
    valid = targets.ids < shared
    safe = torch.where(valid, targets.ids, 0)
    kept = torch.zeros(len(targets), shared + 1, dtype=torch.bool, device=logits.device)
    kept.scatter_(1, torch.where(valid, targets.ids, shared), True)
    # Summed over the tail tokens directly (not 1 - support): exact however small the tail is.
    tail_mass = probs.masked_fill(kept[:, :shared], 0.0).sum(dim=1)
    del kept
    kept_probs = torch.where(valid, probs.gather(1, safe), 0.0)
    support = torch.where(valid, logits.gather(1, safe) / t - log_norm[:, None], FLOOR)
    buckets = torch.cat([support, tail_mass.log().clamp(min=FLOOR)[:, None]], dim=1).requires_grad_(want_grad)
    teacher = teacher_buckets(targets, shared, t, buckets.dtype)
    with torch.enable_grad():
        kd = t * t * weighted_sum(objective.divergence(buckets, teacher), targets.weights)
    if t == 1.0 and shared == logits.size(1):
        ce_norm = log_norm
    else:
        ce_norm = torch.logsumexp(logits, dim=1)
    ce = (ce_norm - logits.gather(1, labels[:, None]).squeeze(1)).sum()
    sums = torch.stack([alpha * ce + (1.0 - alpha) * kd.detach(), ce, kd.detach()]).double()
    if not want_grad:
        return sums
    (grad_buckets,) = torch.autograd.grad(kd, buckets)
    grad_buckets = grad_buckets * ((1.0 - alpha) * scale)
    grad_support = torch.where(valid, grad_buckets[:, :k], 0.0)
    grad_tail = grad_buckets[:, k]
    # d tail_log / d scaled_v = probs_v / tail_mass on tail tokens; d support_i / d scaled = e_i - probs.
    per_tail_prob = torch.where(tail_mass > 0, grad_tail / tail_mass.clamp(min=torch.finfo(tail_mass.dtype).tiny), 0.0)
    row = per_tail_prob - grad_support.sum(dim=1) - grad_tail
    grad_scaled = probs.mul_(row[:, None])  # reuses the probs buffer
    grad_scaled.scatter_add_(1, safe, torch.where(valid, grad_support - per_tail_prob[:, None] * kept_probs, 0.0))
    grad_logits = _ce_grad(logits, ce_norm, labels, alpha * scale)
    del logits
    grad_logits[:, :shared].add_(grad_scaled, alpha=1.0 / t)
    del grad_scaled
    if grad_hidden_out is not None:
        torch.mm(grad_logits.to(hidden.dtype), head, out=grad_hidden_out)
    if grad_head_acc is not None:
        if grad_head_acc.dtype == grad_logits.dtype:
            grad_head_acc.addmm_(grad_logits.t(), hidden.to(grad_logits.dtype))
        else:
            grad_head_acc.add_(grad_logits.t().to(hidden.dtype) @ hidden)
    return sums


def _ce_grad(logits: Tensor, log_norm: Tensor, labels: Tensor, weight: float) -> Tensor:
    """weight * d(summed CE)/d(logits) = weight * (softmax - one_hot(label)), in a new [rows, V] tensor."""
    grad = torch.exp(logits - log_norm[:, None]).mul_(weight)
    grad.scatter_add_(1, labels[:, None], torch.full((labels.size(0), 1), -weight, dtype=grad.dtype,
                                                      device=grad.device))
    return grad
