"""The recipe's loss on one micro-batch: the student's chunked KD/SFT loss against a teacher signal, plus hidden KD."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from transformers import PreTrainedModel

from distill.errors import DistillError
from distill.losses import kd_loss_chunked, kd_loss_sparse_chunked
from distill.losses.hidden import HiddenStateMatcher
from distill.losses.objective import LossOutput
from distill.losses.sparse import SparseTargets
from distill.models import output_head
from distill.models.heads import decoder_layer_outputs
from distill.signals.teacher_signal import TeacherSignal, attention_inputs

if TYPE_CHECKING:
    from distill.recipe import MethodSpec


@dataclass
class BatchLoss(LossOutput):
    """LossOutput plus the hidden-state term: detached and unweighted, None when method.hidden is off."""

    hidden: Optional[torch.Tensor] = None


def loss_on_batch(
    student: PreTrainedModel, signal: Optional[TeacherSignal], batch: dict[str, torch.Tensor],
    method: "MethodSpec", compute_dtype: torch.dtype = torch.float32,
    matcher: Optional[HiddenStateMatcher] = None, *, indices: Optional[Sequence[int]] = None,
) -> BatchLoss:
    """The recipe's loss on one micro-batch, without ever holding [batch, seq, vocab] logits.

    `signal` is the teacher: a LiveTeacher (dense logits, chunk by chunk) or a CachedTeacher (the sparse top-k
    rows of the batch's examples, `indices`: the rows of the training examples the batch was drawn from);
    None, or method.kind: sft, trains on the labels alone.
    With a matcher (method.hidden), `method.hidden.weight` times its loss on the block outputs of every real
    token (prompt included, padding not) is added to the logit loss.
    """
    if matcher is not None and (signal is None or method.kind != "kd" or method.hidden is None):
        raise DistillError("method.hidden: hidden-state KD needs method.hidden set, method.kind: kd and a teacher")
    ids, real = batch["input_ids"], batch["attention_mask"]
    mask, positions = attention_inputs(batch)
    labels = batch["labels"][:, 1:].reshape(-1)  # position i predicts token i+1
    student_layers = matcher.student_layers if matcher is not None else []
    teacher_layers = matcher.teacher_layers if matcher is not None else []
    # Master weights stay fp32; a bf16 compute dtype runs the student's body under autocast.
    with torch.autocast(ids.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        hidden, student_states = decoder_layer_outputs(student, ids, mask, student_layers, positions)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    teacher, teacher_states = None, {}
    if signal is not None and method.kind == "kd":
        teacher, teacher_states = signal.for_batch(batch, indices, teacher_layers)
    loss_keys = dict(divergence=method.divergence, temperature=method.temperature, alpha=method.alpha,
                     beta=method.beta, skew=method.skew, chunk_size=method.chunk_size)
    if isinstance(teacher, SparseTargets):
        out = kd_loss_sparse_chunked(hidden, output_head(student), teacher, labels, **loss_keys)
    else:
        teacher_hidden, teacher_head = (teacher.hidden, teacher.head) if teacher is not None else (None, None)
        out = kd_loss_chunked(hidden, output_head(student), teacher_hidden, teacher_head, labels, **loss_keys)
    if matcher is None:
        return BatchLoss(**vars(out))
    hidden_loss = matcher(student_states, teacher_states, real)
    return BatchLoss(loss=out.loss + method.hidden.weight * hidden_loss, kd=out.kd, ce=out.ce,
                     n_tokens=out.n_tokens, hidden=hidden_loss.detach())
