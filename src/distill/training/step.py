"""The recipe's loss on one micro-batch: the student's chunked KD/SFT loss against a teacher signal, plus hidden KD."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from transformers import PreTrainedModel

from distill.errors import DistillError
from distill.losses.hidden import HiddenStateMatcher
from distill.losses.kd import sft_loss_chunked
from distill.losses.objective import LossOutput, LossSettings
from distill.losses.on_policy import sampled_token_loss_chunked
from distill.models import output_head
from distill.models.heads import decoder_layer_outputs
from distill.signals.teacher_signal import TeacherSignal, attention_inputs


@dataclass
class BatchLoss(LossOutput):
    """LossOutput plus the hidden-state term: detached and unweighted, None when method.hidden is off."""

    hidden: Optional[torch.Tensor] = None
    top1_matches: Optional[int] = None  # trained positions where the student's top-1 is the teacher's (when asked)


@dataclass(frozen=True)
class BatchObjective:
    """What a micro-batch's loss is, built once from the recipe's method section."""

    loss: LossSettings
    kd: bool  # learn from the teacher signal (method.kind: kd or on_policy); False trains on the labels alone
    hidden_weight: Optional[float] = None  # method.hidden.weight; None when hidden-state KD is off
    estimator: str = "full"  # on the student's own samples: the full divergence, or "sampled_token"
    on_samples: bool = False  # this batch's responses are the student's own samples

    def for_student_samples(self) -> "BatchObjective":
        """The loss on the student's own samples: the teacher signal alone (CE would reinforce its own tokens)."""
        return replace(self, loss=replace(self.loss, alpha=0.0), on_samples=True)


def loss_on_batch(
    student: PreTrainedModel, signal: Optional[TeacherSignal], batch: dict[str, torch.Tensor],
    objective: BatchObjective, compute_dtype: torch.dtype = torch.float32,
    matcher: Optional[HiddenStateMatcher] = None, *, indices: Optional[Sequence[int]] = None,
    count_agreement: bool = False,
) -> BatchLoss:
    """The recipe's loss on one micro-batch, without ever holding [batch, seq, vocab] logits.

    `signal` is the teacher: a LiveTeacher (dense logits, chunk by chunk) or a CachedTeacher (the sparse top-k
    rows of the batch's examples, `indices`: the rows of the training examples the batch was drawn from);
    None, or an objective without KD, trains on the labels alone. Either signal's rows bring their own chunked
    loss. With a matcher, `hidden_weight` times its loss on the block outputs of every real token (prompt
    included, padding not) is added to the logit loss. `count_agreement` also counts the trained positions where
    the student's top-1 token is the teacher's (held-out evaluation; needs a teacher signal).
    """
    if matcher is not None and (signal is None or not objective.kd or objective.hidden_weight is None):
        raise DistillError("method.hidden: hidden-state KD needs method.hidden set, method.kind: kd and a teacher")
    ids, real = batch["input_ids"], batch["attention_mask"]
    mask, positions = attention_inputs(batch)
    labels = batch["labels"][:, 1:].reshape(-1)  # position i predicts token i+1
    student_layers = matcher.student_layers if matcher is not None else []
    teacher_layers = matcher.teacher_layers if matcher is not None else []
    # Master weights stay fp32; a bf16 compute dtype runs the student's body under autocast.
    with torch.autocast(ids.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        hidden, student_states = decoder_layer_outputs(student, ids, mask, student_layers, positions)
    hidden, head = hidden[:, :-1].reshape(-1, hidden.shape[-1]), output_head(student)
    teacher, teacher_states = None, {}
    if signal is not None and objective.kd:
        teacher, teacher_states = signal.for_batch(batch, indices, teacher_layers)
    if teacher is not None and objective.on_samples and objective.estimator == "sampled_token":
        chunk = objective.loss.chunk_size
        out = sampled_token_loss_chunked(hidden, head, labels, teacher.token_log_probs(labels, chunk), chunk)
    elif teacher is not None:
        out = teacher.chunked_loss(hidden, head, labels, objective.loss)
    else:
        out = sft_loss_chunked(hidden, head, labels, objective.loss)
    matches = None
    if count_agreement and teacher is not None:
        matches = teacher.top1_matches(hidden.detach(), head.detach(), labels, objective.loss.chunk_size)
    if matcher is None:
        return BatchLoss(**vars(out), top1_matches=matches)
    hidden_loss = matcher(student_states, teacher_states, real)
    return BatchLoss(loss=out.loss + objective.hidden_weight * hidden_loss, kd=out.kd, ce=out.ce,
                     n_tokens=out.n_tokens, hidden=hidden_loss.detach(), top1_matches=matches)
