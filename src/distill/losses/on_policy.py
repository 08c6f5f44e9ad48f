"""The sampled-token loss of on-policy distillation: each sampled token's reverse-KL estimate as a policy gradient.

On a response y sampled from the student, `log p_s(y_t) - log p_t(y_t)` is an unbiased per-token estimate of
KL(student || teacher); its gradient is estimated by `(log p_s - log p_t) * grad log p_s` (the score-function
estimator; the samples come from the current student, so the importance ratio is 1). The loss is therefore
`mean_t stopgrad(log p_s(y_t) - log p_t(y_t)) * log p_s(y_t)`: it needs only the teacher's log-prob of each
sampled token, which any server that scores text gives.
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
    check_labels,
    empty_output,
    fused_chunked_loss,
    wide,
    write_chunk_grads,
)


@dataclass
class TokenLogProbs:
    """The teacher's log-prob of each trained label [N] (aligned with the shifted labels)."""

    values: Tensor

    def rows(self, index: slice) -> "TokenLogProbs":
        return TokenLogProbs(self.values[index])


def sampled_token_loss(student_logits: Tensor, teacher_token_log_probs: Tensor, labels: Tensor) -> LossOutput:
    """The estimator on full `[N, V]` student logits (simple path; the reference for the chunked one).

    `kd` is the mean reverse-KL estimate, `ce` the student's mean NLL of its own samples.
    """
    check_labels(labels, student_logits.size(-1))
    valid = labels != IGNORE_INDEX
    n = int(valid.sum())
    if n == 0:
        return empty_output(student_logits)
    log_s = log_probs(wide(student_logits[valid])).gather(1, labels[valid][:, None]).squeeze(1)
    gap = (log_s - teacher_token_log_probs[valid].to(log_s.dtype)).detach()
    return LossOutput(loss=(gap * log_s).sum() / n, kd=gap.sum() / n, ce=-log_s.detach().sum() / n, n_tokens=n)


def sampled_token_loss_chunked(
    hidden: Tensor, head: Tensor, labels: Tensor, teacher_token_log_probs: Tensor, chunk_size: int = 192
) -> LossOutput:
    """The same loss from the student's hidden states [N, D] and head [V, D], `chunk_size` positions at a time."""
    if chunk_size <= 0:
        raise DistillError(f"method.chunk_size: must be > 0, got {chunk_size}")
    if not (hidden.dim() == 2 and labels.shape == hidden.shape[:1] == teacher_token_log_probs.shape):
        raise DistillError(f"sampled_token_loss_chunked: expected hidden [N, D], labels [N], teacher [N]; got "
                           f"{tuple(hidden.shape)}, {tuple(labels.shape)}, {tuple(teacher_token_log_probs.shape)}")
    check_labels(labels, head.size(0))
    valid = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    if valid.numel() == 0:
        return empty_output(hidden, head)
    teacher = TokenLogProbs(teacher_token_log_probs.detach()[valid])
    loss, ce, kd = fused_chunked_loss(hidden[valid], head, teacher, labels[valid], None, chunk_size,
                                      _sampled_token_chunk)
    return LossOutput(loss=loss, kd=kd, ce=ce, n_tokens=valid.numel())


def _sampled_token_chunk(
    hidden: Tensor, head: Tensor, teacher: TokenLogProbs, labels: Tensor, _objective: None, scale: float,
    grad_hidden_out: Optional[Tensor], grad_head_acc: Optional[Tensor],
) -> Tensor:
    """One chunk's summed (loss, nll, reverse-KL estimate); writes its grads like the KD loss's chunks."""
    logits = wide(hidden @ head.t())
    wants_grad = grad_hidden_out is not None or grad_head_acc is not None
    logits.requires_grad_(wants_grad)
    with torch.set_grad_enabled(wants_grad):
        log_s = log_probs(logits).gather(1, labels[:, None]).squeeze(1)
        gap = (log_s - teacher.values.to(log_s.dtype)).detach()
        loss = (gap * log_s).sum()
        sums = torch.stack([loss.detach(), -log_s.detach().sum(), gap.sum()]).double()
        if not wants_grad:
            return sums
        (grad_logits,) = torch.autograd.grad(loss * scale, logits)
    del logits, log_s, loss
    write_chunk_grads(grad_logits.to(hidden.dtype), hidden, head, grad_hidden_out, grad_head_acc)
    return sums
