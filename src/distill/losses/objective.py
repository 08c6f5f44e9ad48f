"""What the dense (live teacher) and sparse (cache) KD losses share: the objective's terms, the label checks and
the fused chunk runner that computes the loss and the student's grads `chunk_size` rows at a time.

Objective: `alpha * CE(labels) + (1 - alpha) * T^2 * mean D(teacher/T, student/T)`, both terms means over
the positions whose label is not -100 (labels are already shifted). Without a teacher the loss is plain CE.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from distill.errors import DistillError
from distill.losses.divergences import Divergence, divergence_on_log_probs, log_probs
from distill.losses.weighting import weighted_sum

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """`loss` is differentiable; `kd` (T^2 * mean divergence) and `ce` are detached values for logging."""

    loss: Tensor
    kd: Tensor
    ce: Tensor
    n_tokens: int


@dataclass(frozen=True)
class LossSettings:
    """The method's logit loss, decided once: divergence and its parameters, temperature, CE weight, chunk size."""

    divergence: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.5  # weight of CE on the labels; 1 - alpha weighs T^2 * divergence
    beta: float = 0.5  # JSD's mixture weight
    skew: float = 0.1  # skew KL's mixture weight
    chunk_size: int = 192  # positions per chunk of the fused loss
    weighting: str = "none"  # the KD term per position: none, teacher_confidence, teacher_entropy (losses.weighting)
    weighting_floor: float = 0.1
    weighting_temperature: float = 1.0

    def keywords(self) -> dict:
        """The settings as the keyword arguments of the chunked losses."""
        return asdict(self)

    def divergence_keywords(self) -> dict:
        """The divergence, temperature, CE weight and chunk size alone (for losses without confidence weighting)."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("weighting")}


@dataclass(frozen=True)
class Objective:
    """Summed loss terms over a set of valid rows; shared by the naive and the chunked path."""

    divergence: Divergence  # on (student_log_probs, teacher_log_probs)
    temperature: float
    alpha: float

    def teacher_log_probs(self, teacher_logits: Tensor, shared_vocab: int) -> Tensor:
        """Teacher log-probs at temperature T over the vocabulary both heads share (padded rows dropped)."""
        return log_probs(tempered(teacher_logits.detach()[:, :shared_vocab], self.temperature))

    def sums(
        self, student_logits: Tensor, teacher_log_probs: Optional[Tensor], labels: Tensor,
        weights: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, ce, kd) summed over rows; kd already carries the T^2 factor and each row's weight when given."""
        student, t = wide(student_logits), self.temperature
        if teacher_log_probs is None:
            ce = cross_entropy_sum(student, labels)
            return ce, ce, torch.zeros_like(ce)
        shared = teacher_log_probs.size(1)
        # One expression, so the scaled copy of the student logits is freed as soon as log_softmax is done.
        student_log_probs = log_probs(tempered(student[:, :shared], t))
        if t == 1.0 and shared == student.size(1):
            # Same distribution as CE's: reuse it (saves a logsumexp and its backward's [rows, V] temporaries).
            ce = -student_log_probs.gather(1, labels[:, None]).sum()
        else:
            ce = cross_entropy_sum(student, labels)
        kd = t * t * weighted_sum(self.divergence(student_log_probs, teacher_log_probs), weights)
        return self.alpha * ce + (1.0 - self.alpha) * kd, ce, kd


def cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed CE as logsumexp - target logit: unlike F.cross_entropy, saves no [rows, V] tensor for backward."""
    return (torch.logsumexp(logits, dim=-1) - logits.gather(1, labels[:, None]).squeeze(1)).sum()


def tempered(logits: Tensor, temperature: float) -> Tensor:
    """Logits (or the hidden states that make them) divided by the temperature; T = 1 passes through."""
    return logits if temperature == 1.0 else logits / temperature


def wide(x: Tensor) -> Tensor:
    """Upcast half precision to float32 for the loss math; float32/float64 pass through."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def build_objective(divergence: str, temperature: float, alpha: float, beta: float, skew: float) -> Objective:
    """The objective of the recipe's method keys; refuses a temperature <= 0 or an alpha outside [0, 1]."""
    if temperature <= 0:
        raise DistillError(f"method.temperature: must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise DistillError(f"method.alpha: must be in [0, 1], got {alpha}")
    divergence_fn = divergence_on_log_probs(divergence, beta=beta, skew=skew)
    return Objective(divergence_fn, float(temperature), float(alpha))


def check_labels(labels: Tensor, student_vocab: int) -> None:
    """Refuses a trained label outside the student's vocabulary (one line naming the id)."""
    valid = labels[labels != IGNORE_INDEX]
    if valid.numel() == 0:
        return
    low, high = int(valid.min()), int(valid.max())
    if low < 0 or high >= student_vocab:
        bad = low if low < 0 else high
        raise DistillError(f"label id {bad} is outside the student's vocabulary of {student_vocab} tokens")


def empty_output(*tracked: Tensor) -> LossOutput:
    """Loss 0 for a batch with no valid position; empty sums keep the graph so backward still works."""
    zero = torch.zeros((), dtype=wide(tracked[0]).dtype, device=tracked[0].device)
    loss = zero
    for t in tracked:
        loss = loss + t[:0].sum()
    return LossOutput(loss=loss, kd=zero, ce=zero.clone(), n_tokens=0)


# A chunk's work: (hidden, head, teacher signal rows or None, labels, objective, 1/n, hidden-grad slot or None,
# head-grad accumulator or None) -> summed (loss, ce, kd) as a float64 [3] tensor.
ChunkFn = Callable[..., Tensor]


def fused_chunked_loss(
    hidden: Tensor, head: Tensor, signal, labels: Tensor, objective: Objective, chunk_size: int,
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
    objective: Objective,
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
    grad_head = torch.zeros(head.shape, dtype=wide(head).dtype, device=head.device) if want_head_grad else None
    totals = torch.zeros(3, dtype=torch.float64, device=hidden.device)
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        totals += chunk_fn(
            hidden[rows], head, None if signal is None else signal.rows(rows), labels[rows], objective, 1.0 / n,
            None if grad_hidden is None else grad_hidden[rows], grad_head,
        )
    loss, ce, kd = (totals / n).to(wide(hidden).dtype).unbind()
    if grad_head is not None:
        grad_head = grad_head.to(head.dtype)
    return loss, ce, kd, grad_hidden, grad_head


def write_chunk_grads(
    grad_logits: Tensor, hidden: Tensor, head: Tensor, grad_hidden_out: Optional[Tensor],
    grad_head_acc: Optional[Tensor],
) -> None:
    """A chunk's logit grads through its head matmul by hand: the hidden grad lands in its slot, the head grad
    accumulates with addmm_ (no [V, D] temporary per chunk)."""
    if grad_hidden_out is not None:
        torch.mm(grad_logits, head, out=grad_hidden_out)
    if grad_head_acc is not None:
        if grad_head_acc.dtype == grad_logits.dtype:
            grad_head_acc.addmm_(grad_logits.t(), hidden)
        else:  # half-precision head: matmul in its dtype, accumulate in float32
            grad_head_acc.add_(grad_logits.t() @ hidden)
