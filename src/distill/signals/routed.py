"""Several scoring teachers routed by tag (method.teachers): each row of a micro-batch is scored by its example's
teacher, and the loss sees one signal for the batch.

Each teacher runs (or, when served, is asked) only on its own rows; their signals stay apart, each a view of the
batch's positions, and the loss is each part's chunked loss on those positions weighted by its share of the trained
tokens: exactly the mean over the batch. No teacher's logits are formed beyond one chunk at a time, as with one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from distill.errors import DistillError
from distill.losses.objective import LossOutput, LossSettings, empty_output
from distill.signals.teacher_signal import LogitSignal, TeacherSignal

HIDDEN_WITH_TEACHERS = ("method.hidden: hidden-state KD matches one teacher's blocks; remove method.hidden or "
                        "method.teachers")


@dataclass
class RoutedScores:
    """One micro-batch's teacher signal from several teachers: `parts` pairs each teacher's signal on its own rows
    with the flat positions ([n] into the batch's B * (T - 1) shifted positions) those rows cover."""

    parts: list[tuple[Tensor, LogitSignal]]

    def chunked_loss(self, hidden: Tensor, head: Tensor, labels: Tensor, settings: LossSettings) -> LossOutput:
        """The objective over the batch: each part's chunked loss on its positions, weighted by its trained tokens."""
        outs = [signal.chunked_loss(hidden[at], head, labels[at], settings) for at, signal in self.parts]
        n = sum(out.n_tokens for out in outs)
        if n == 0:
            return empty_output(hidden, head)
        loss, kd, ce = (sum(getattr(out, key) * (out.n_tokens / n) for out in outs) for key in ("loss", "kd", "ce"))
        return LossOutput(loss=loss, kd=kd, ce=ce, n_tokens=n)

    def token_log_probs(self, labels: Tensor, chunk_size: int) -> Tensor:
        """Each label's log-prob under its row's teacher [N] (0 where the label is -100)."""
        values = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        for at, signal in self.parts:
            values[at] = signal.token_log_probs(labels[at], chunk_size).to(values.dtype)
        return values

    def top1_matches(self, hidden: Tensor, head: Tensor, labels: Tensor, chunk_size: int) -> int:
        """Trained positions where the student's top-1 token is its row's teacher's."""
        return sum(signal.top1_matches(hidden[at], head, labels[at], chunk_size) for at, signal in self.parts)


@dataclass
class RoutedTeacher:
    """Scoring teachers and, per example index, which one scores its rows (`route[i]` indexes `teachers`)."""

    teachers: Sequence[TeacherSignal]
    route: Sequence[int]

    def for_batch(
        self, batch: dict[str, Tensor], indices: Optional[Sequence[int]] = None, layers: Sequence[int] = ()
    ) -> tuple[LogitSignal, dict[int, Tensor]]:
        """Each teacher on the rows of the batch's examples `indices` routed to it; one teacher's signal unchanged
        when every row is its."""
        if layers:
            raise DistillError(HIDDEN_WITH_TEACHERS)
        if "position_ids" in batch:
            raise DistillError("train.packing: method.teachers routes whole examples; set train.packing: false")
        if indices is None or len(indices) != batch["input_ids"].size(0):
            raise DistillError("method.teachers: routing needs the example index of every row of the batch")
        owners = [self.route[i] for i in indices]
        if len(set(owners)) == 1:
            return self.teachers[owners[0]].for_batch(batch, indices)
        width = batch["input_ids"].size(1) - 1  # shifted positions per row
        device = batch["input_ids"].device
        parts = []
        for owner in sorted(set(owners)):
            rows = [r for r, o in enumerate(owners) if o == owner]
            picked = torch.tensor(rows, device=device)
            sub = {key: value[picked] for key, value in batch.items()}
            signal, _ = self.teachers[owner].for_batch(sub, [indices[r] for r in rows])
            at = (picked[:, None] * width + torch.arange(width, device=device)).reshape(-1)
            parts.append((at, signal))
        return RoutedScores(parts), {}
