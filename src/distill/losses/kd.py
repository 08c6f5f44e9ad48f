"""The KD/SFT objective (see distill.losses.objective) against a live teacher's dense logits, or none (SFT):
a naive path on full logits and a chunked path that never builds them.
"""
from __future__ import annotations

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
    empty_output,
    fused_chunked_loss,
    tempered,
    write_chunk_grads,
)
from distill.losses.weighting import Weighting


def _check_shapes(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Optional[Tensor],
    teacher_head: Optional[Tensor],
    labels: Tensor,
) -> None:
    ok = student_hidden.dim() == 2 and labels.shape == student_hidden.shape[:1]
    ok = ok and student_head.dim() == 2 and student_head.size(1) == student_hidden.size(1)
    if teacher_hidden is not None and teacher_head is not None:
        ok = ok and teacher_hidden.shape[:1] == labels.shape and teacher_head.size(1) == teacher_hidden.size(-1)
    if not ok:
        given = (student_hidden, student_head, teacher_hidden, teacher_head, labels)
        shapes = [None if t is None else tuple(t.shape) for t in given]
        raise DistillError(
            "kd_loss_chunked: expected student_hidden [N, Ds], student_head [V, Ds], teacher_hidden [N, Dt], "
            f"teacher_head [V', Dt], labels [N]; got {shapes}"
        )


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Optional[Tensor],
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    skew: float = 0.1,
    weighting: str = "none",
    weighting_floor: float = 0.1,
    weighting_temperature: float = 1.0,
) -> LossOutput:
    """The objective on full `[N, V]` logits (simple path; the reference for `kd_loss_chunked`)."""
    objective = build_objective(divergence, temperature, alpha, beta, skew)
    weigh = Weighting(weighting, weighting_floor, weighting_temperature)
    check_labels(labels, student_logits.size(-1))
    valid = labels != IGNORE_INDEX
    n = int(valid.sum())
    if n == 0:
        return empty_output(student_logits)
    student = student_logits[valid]
    teacher, weights = None, None
    if teacher_logits is not None:
        shared = min(student.size(1), teacher_logits.size(-1))
        teacher = objective.teacher_log_probs(teacher_logits.detach()[valid], shared)
        if weigh.on:
            weights = weigh.weights(weigh.confidence(log_probs(teacher_logits.detach()[valid][:, :shared])))
    loss, ce, kd = objective.sums(student, teacher, labels[valid], weights)
    return LossOutput(loss=loss / n, kd=kd.detach() / n, ce=ce.detach() / n, n_tokens=n)


def kd_loss_chunked(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Optional[Tensor],
    teacher_head: Optional[Tensor],
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    skew: float = 0.1,
    chunk_size: int = 192,
    weighting: str = "none",
    weighting_floor: float = 0.1,
    weighting_temperature: float = 1.0,
) -> LossOutput:
    """The same objective from hidden states and output heads, `chunk_size` positions at a time.

    Peak extra memory is O(chunk_size * V) instead of O(N * V); gradients for the student hidden states
    and head are computed during the forward pass, so backward is a scale.
    """
    objective = build_objective(divergence, temperature, alpha, beta, skew)
    weigh = Weighting(weighting, weighting_floor, weighting_temperature)
    if (teacher_hidden is None) != (teacher_head is None):
        raise DistillError("kd_loss_chunked: give both teacher_hidden and teacher_head, or neither (SFT)")
    if chunk_size <= 0:
        raise DistillError(f"method.chunk_size: must be > 0, got {chunk_size}")
    _check_shapes(student_hidden, student_head, teacher_hidden, teacher_head, labels)
    check_labels(labels, student_head.size(0))
    valid = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    n = valid.numel()
    if n == 0:
        return empty_output(student_hidden, student_head)
    teacher_hidden = None if teacher_hidden is None else teacher_hidden.detach()
    # Gather the valid rows once (indexing is an autograd op: its backward scatters the grads back to
    # [N, Ds]); masked rows then cost nothing. With no masked row the copies are skipped.
    if n < labels.numel():
        student_hidden, labels = student_hidden[valid], labels[valid]
        teacher_hidden = None if teacher_hidden is None else teacher_hidden[valid]
    teacher = None
    if teacher_hidden is not None:
        # Only the shared vocabulary enters the divergence, so the teacher's padded rows are never multiplied.
        shared = min(student_head.size(0), teacher_head.size(0))
        teacher = DenseTeacher(teacher_hidden, teacher_head.detach()[:shared])
        if weigh.on:
            teacher.weights = weigh.weights(teacher.confidence(weigh, chunk_size))
    loss, ce, kd = fused_chunked_loss(student_hidden, student_head, teacher, labels, objective, chunk_size,
                                      _process_chunk)
    return LossOutput(loss=loss, kd=kd, ce=ce, n_tokens=n)


@dataclass
class DenseTeacher:
    """The live teacher's signal: its final hidden states [N, Dt] and head [V, Dt]; logits are formed per chunk."""

    hidden: Tensor
    head: Tensor
    weights: Optional[Tensor] = None  # [N] per-position weights of the KD term (method.weighting), or None

    def rows(self, index: slice) -> "DenseTeacher":
        return DenseTeacher(self.hidden[index], self.head, None if self.weights is None else self.weights[index])

    def confidence(self, weighting: Weighting, chunk_size: int) -> Tensor:
        """[N] confidences of the teacher at T = 1, its logits formed `chunk_size` rows at a time."""
        with torch.no_grad():
            parts = [weighting.confidence(log_probs(self.hidden[start:start + chunk_size] @ self.head.t()))
                     for start in range(0, self.hidden.size(0), chunk_size)]
        return torch.cat(parts)

    def top1_matches(self, hidden: Tensor, head: Tensor, labels: Tensor, chunk_size: int) -> int:
        """How many trained positions' student top-1 token is the teacher's, over the vocabulary both share."""
        valid = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        shared = min(head.size(0), self.head.size(0))
        matches = 0
        with torch.no_grad():
            for start in range(0, valid.numel(), chunk_size):
                rows = valid[start:start + chunk_size]
                student = (hidden[rows].to(head.dtype) @ head[:shared].t()).argmax(dim=1)
                teacher = (self.hidden[rows] @ self.head[:shared].t()).argmax(dim=1)
                matches += int((student == teacher).sum())
        return matches

    def chunked_loss(self, hidden: Tensor, head: Tensor, labels: Tensor, settings: LossSettings) -> LossOutput:
        """The objective against this live teacher, `settings.chunk_size` positions at a time."""
        return kd_loss_chunked(hidden, head, self.hidden, self.head, labels, **settings.keywords())

    @torch.no_grad()
    def token_log_probs(self, labels: Tensor, chunk_size: int) -> Tensor:
        """The teacher's log-prob of each label [N] (0 where the label is -100), `chunk_size` rows at a time."""
        values = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        for start in range(0, labels.numel(), chunk_size):
            rows = slice(start, start + chunk_size)
            picked = labels[rows].clamp(min=0)[:, None]
            values[rows] = log_probs(self.hidden[rows] @ self.head.t()).gather(1, picked).squeeze(1).float()
        return values.masked_fill(labels == IGNORE_INDEX, 0.0)


def sft_loss_chunked(hidden: Tensor, head: Tensor, labels: Tensor, settings: LossSettings) -> LossOutput:
    """Cross-entropy on the labels alone (no teacher), through the same chunked path."""
    return kd_loss_chunked(hidden, head, None, None, labels, **settings.keywords())


def _process_chunk(
    hidden: Tensor,
    head: Tensor,
    teacher: Optional[DenseTeacher],
    labels: Tensor,
    objective: Objective,
    scale: float,
    grad_hidden_out: Optional[Tensor],
    grad_head_acc: Optional[Tensor],
) -> Tensor:
    """One chunk: its summed (loss, ce, kd); writes its hidden grads and adds its head grad in place.

    A separate function so the chunk's [rows, V] tensors are freed on return, before the next chunk.
    """
    student_logits = hidden @ head.t()
    teacher_log_probs = None
    if teacher is not None:
        # Dividing the chunk's [rows, Dt] hidden states (not the logits or the head) by T is the cheapest way
        # to get teacher logits at temperature T.
        teacher_log_probs = log_probs(tempered(teacher.hidden, objective.temperature) @ teacher.head.t())
    weights = None if teacher is None else teacher.weights
    if grad_hidden_out is None and grad_head_acc is None:
        with torch.no_grad():
            return torch.stack(objective.sums(student_logits, teacher_log_probs, labels, weights)).double()
    # Autograd only through the loss math, down to the logits; the two head matmuls are done by hand so the
    # hidden grad lands in its slot and the head grad accumulates with addmm_ (no [V, D] temporary per chunk).
    student_logits.requires_grad_(True)
    with torch.enable_grad():
        loss, ce, kd = objective.sums(student_logits, teacher_log_probs, labels, weights)
        del teacher_log_probs  # the graph keeps what backward needs; drop the rest before backward's peak
        (grad_logits,) = torch.autograd.grad(loss * scale, student_logits)
    sums = torch.stack([loss.detach(), ce.detach(), kd.detach()]).double()
    del student_logits, loss, ce, kd
    write_chunk_grads(grad_logits, hidden, head, grad_hidden_out, grad_head_acc)
    return sums
