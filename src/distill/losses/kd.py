"""The KD/SFT training objective: a naive path on full logits and a chunked path that never builds them.

Objective: `alpha * CE(labels) + (1 - alpha) * T^2 * mean D(teacher/T, student/T)`, both terms means over
the positions whose label is not -100 (labels are already shifted). Without a teacher the loss is plain CE.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from distill.errors import DistillError
from distill.losses.divergences import Divergence, divergence_on_log_probs, log_probs

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """`loss` is differentiable; `kd` (T^2 * mean divergence) and `ce` are detached values for logging."""

    loss: Tensor
    kd: Tensor
    ce: Tensor
    n_tokens: int


@dataclass(frozen=True)
class _Objective:
    """Summed loss terms over a set of valid rows; shared by the naive and the chunked path."""

    divergence: Divergence  # on (student_log_probs, teacher_log_probs)
    temperature: float
    alpha: float

    def teacher_log_probs(self, teacher_logits: Tensor, shared_vocab: int) -> Tensor:
        """Teacher log-probs at temperature T over the vocabulary both heads share (padded rows dropped)."""
        return log_probs(_scaled(teacher_logits.detach()[:, :shared_vocab], self.temperature))

    def sums(
        self, student_logits: Tensor, teacher_log_probs: Optional[Tensor], labels: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, ce, kd) summed over rows; kd already carries the T^2 factor."""
        student, t = _wide(student_logits), self.temperature
        if teacher_log_probs is None:
            ce = _cross_entropy_sum(student, labels)
            return ce, ce, torch.zeros_like(ce)
        shared = teacher_log_probs.size(1)
        # One expression, so the scaled copy of the student logits is freed as soon as log_softmax is done.
        student_log_probs = log_probs(_scaled(student[:, :shared], t))
        if t == 1.0 and shared == student.size(1):
            # Same distribution as CE's: reuse it (saves a logsumexp and its backward's [rows, V] temporaries).
            ce = -student_log_probs.gather(1, labels[:, None]).sum()
        else:
            ce = _cross_entropy_sum(student, labels)
        kd = t * t * self.divergence(student_log_probs, teacher_log_probs).sum()
        return self.alpha * ce + (1.0 - self.alpha) * kd, ce, kd


def _cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed CE as logsumexp - target logit: unlike F.cross_entropy, saves no [rows, V] tensor for backward."""
    return (torch.logsumexp(logits, dim=-1) - logits.gather(1, labels[:, None]).squeeze(1)).sum()


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    return logits if temperature == 1.0 else logits / temperature


def _wide(x: Tensor) -> Tensor:
    """Upcast half precision to float32 for the loss math; float32/float64 pass through."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _objective(divergence: str, temperature: float, alpha: float, beta: float, skew: float) -> _Objective:
    if temperature <= 0:
        raise DistillError(f"method.temperature: must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise DistillError(f"method.alpha: must be in [0, 1], got {alpha}")
    divergence_fn = divergence_on_log_probs(divergence, beta=beta, skew=skew)
    return _Objective(divergence_fn, float(temperature), float(alpha))


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


def _check_labels(labels: Tensor, student_vocab: int) -> None:
    valid = labels[labels != IGNORE_INDEX]
    if valid.numel() == 0:
        return
    low, high = int(valid.min()), int(valid.max())
    if low < 0 or high >= student_vocab:
        bad = low if low < 0 else high
        raise DistillError(f"label id {bad} is outside the student's vocabulary of {student_vocab} tokens")


def _empty_output(*tracked: Tensor) -> LossOutput:
    """Loss 0 for a batch with no valid position; empty sums keep the graph so backward still works."""
    zero = torch.zeros((), dtype=_wide(tracked[0]).dtype, device=tracked[0].device)
    loss = zero
    for t in tracked:
        loss = loss + t[:0].sum()
    return LossOutput(loss=loss, kd=zero, ce=zero.clone(), n_tokens=0)


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
) -> LossOutput:
    """The objective on full `[N, V]` logits (simple path; the reference for `kd_loss_chunked`)."""
    objective = _objective(divergence, temperature, alpha, beta, skew)
    _check_labels(labels, student_logits.size(-1))
    valid = labels != IGNORE_INDEX
    n = int(valid.sum())
    if n == 0:
        return _empty_output(student_logits)
    student = student_logits[valid]
    teacher = None
    if teacher_logits is not None:
        shared = min(student.size(1), teacher_logits.size(-1))
        teacher = objective.teacher_log_probs(teacher_logits.detach()[valid], shared)
    loss, ce, kd = objective.sums(student, teacher, labels[valid])
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
) -> LossOutput:
    """The same objective from hidden states and output heads, `chunk_size` positions at a time.

    Peak extra memory is O(chunk_size * V) instead of O(N * V); gradients for the student hidden states
    and head are computed during the forward pass, so backward is a scale.
    """
    objective = _objective(divergence, temperature, alpha, beta, skew)
    if (teacher_hidden is None) != (teacher_head is None):
        raise DistillError("kd_loss_chunked: give both teacher_hidden and teacher_head, or neither (SFT)")
    if chunk_size <= 0:
        raise DistillError(f"method.chunk_size: must be > 0, got {chunk_size}")
    _check_shapes(student_hidden, student_head, teacher_hidden, teacher_head, labels)
    _check_labels(labels, student_head.size(0))
    valid = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    n = valid.numel()
    if n == 0:
        return _empty_output(student_hidden, student_head)
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
    loss, ce, kd = fused_chunked_loss(student_hidden, student_head, teacher, labels, objective, chunk_size,
                                      _process_chunk)
    return LossOutput(loss=loss, kd=kd, ce=ce, n_tokens=n)


@dataclass
class DenseTeacher:
    """The live teacher's signal: its final hidden states [N, Dt] and head [V, Dt]; logits are formed per chunk."""

    hidden: Tensor
    head: Tensor

    def rows(self, index: slice) -> "DenseTeacher":
        return DenseTeacher(self.hidden[index], self.head)


# A chunk's work: (hidden, head, teacher signal rows or None, labels, objective, 1/n, hidden-grad slot or None,
# head-grad accumulator or None) -> summed (loss, ce, kd) as a float64 [3] tensor.
ChunkFn = Callable[..., Tensor]


def fused_chunked_loss(
    hidden: Tensor, head: Tensor, signal, labels: Tensor, objective: _Objective, chunk_size: int,
    chunk_fn: ChunkFn,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean (loss, ce, kd) over the rows, `chunk_size` at a time, for any teacher signal with `.rows(slice)`.

    The dense (live teacher) and sparse (cache) losses differ only in `chunk_fn` and `signal`.
    """
    args = (hidden, head, signal, labels, objective, chunk_size, chunk_fn)
    if torch.is_grad_enabled() and (hidden.requires_grad or head.requires_grad):
        return _FusedLinearKD.apply(*args)
    loss, ce, kd, _, _ = _chunked_pass(*args, want_hidden_grad=False, want_head_grad=False)
    return loss, ce, kd


class _FusedLinearKD(torch.autograd.Function):
    """Loss and student grads in one chunked forward pass; backward scales the stored grads."""

    @staticmethod
    def forward(ctx, hidden, head, signal, labels, objective, chunk_size, chunk_fn):  # type: ignore[override]
        loss, ce, kd, grad_hidden, grad_head = _chunked_pass(
            hidden, head, signal, labels, objective, chunk_size, chunk_fn,
            want_hidden_grad=ctx.needs_input_grad[0], want_head_grad=ctx.needs_input_grad[1],
        )
        # Kept on ctx (not save_for_backward) so backward can hand them over without a copy: a [V, D] head
        # grad held here while autograd clones it for .grad would double the head's share of peak memory.
        ctx.grads = [grad_hidden, grad_head]
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("chunked KD loss: backward through the same loss can run only once")
        grads, ctx.grads = ctx.grads, None
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        return grads[0], grads[1], None, None, None, None, None


def _chunked_pass(
    hidden: Tensor,
    head: Tensor,
    signal,
    labels: Tensor,
    objective: _Objective,
    chunk_size: int,
    chunk_fn: ChunkFn,
    *,
    want_hidden_grad: bool,
    want_head_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Mean (loss, ce, kd) over the valid rows, plus d(loss)/d(hidden) and d(loss)/d(head) when wanted."""
    hidden, head = hidden.detach(), head.detach()
    n = hidden.size(0)
    grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
    grad_head = torch.zeros(head.shape, dtype=_wide(head).dtype, device=head.device) if want_head_grad else None
    totals = torch.zeros(3, dtype=torch.float64, device=hidden.device)
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        totals += chunk_fn(
            hidden[rows], head, None if signal is None else signal.rows(rows), labels[rows], objective, 1.0 / n,
            None if grad_hidden is None else grad_hidden[rows], grad_head,
        )
    loss, ce, kd = (totals / n).to(_wide(hidden).dtype).unbind()
    if grad_head is not None:
        grad_head = grad_head.to(head.dtype)
    return loss, ce, kd, grad_hidden, grad_head


def _process_chunk(
    hidden: Tensor,
    head: Tensor,
    teacher: Optional[DenseTeacher],
    labels: Tensor,
    objective: _Objective,
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
        teacher_log_probs = log_probs(_scaled(teacher.hidden, objective.temperature) @ teacher.head.t())
    if grad_hidden_out is None and grad_head_acc is None:
        with torch.no_grad():
            return torch.stack(objective.sums(student_logits, teacher_log_probs, labels)).double()
    # Autograd only through the loss math, down to the logits; the two head matmuls are done by hand so the
    # hidden grad lands in its slot and the head grad accumulates with addmm_ (no [V, D] temporary per chunk).
    student_logits.requires_grad_(True)
    with torch.enable_grad():
        loss, ce, kd = objective.sums(student_logits, teacher_log_probs, labels)
        del teacher_log_probs  # the graph keeps what backward needs; drop the rest before backward's peak
        (grad_logits,) = torch.autograd.grad(loss * scale, student_logits)
    sums = torch.stack([loss.detach(), ce.detach(), kd.detach()]).double()
    del student_logits, loss, ce, kd
    if grad_hidden_out is not None:
        torch.mm(grad_logits, head, out=grad_hidden_out)
    if grad_head_acc is not None:
        if grad_head_acc.dtype == grad_logits.dtype:
            grad_head_acc.addmm_(grad_logits.t(), hidden)
        else:  # half-precision head: matmul in its dtype, accumulate in float32
            grad_head_acc.add_(grad_logits.t() @ hidden)
    return sums
