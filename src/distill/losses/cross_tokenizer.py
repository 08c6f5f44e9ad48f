"""Logit distillation between a teacher and a student whose tokenizers differ.

The two tokenizations of one text are matched in groups (distill.models.alignment): tokens that cover the same
characters on both sides, read after the same text. At each group both sides' distributions are merged
GOLD-style ("observed" merge): the log-probs at the group's first position plus the log-probs of the group's
later tokens as they actually follow (an unnormalised distribution over "first token, then this span").

- `uld` (Universal Logit Distillation, Boizard et al. 2024): the Wasserstein-1 distance between the two merged
  probability vectors sorted in decreasing order (the top-k of each, the shorter padded with zeros): the sum of
  |p_student_(i) - p_teacher_(i)|. It needs no shared vocabulary.
- `align`: the recipe's divergence on the vocabulary entries whose strings both tokenizers share (each side's
  merged log-probs renormalised over those entries), plus ULD on the entries that are not shared.

Objective: `alpha * CE(labels) + (1 - alpha) * T^2 * mean over groups of that distance`, CE a mean over the
trained student positions. With identical tokenizers every group is one token on each side and every entry is
shared, so `align` is ordinary KD exactly. The chunked path computes `chunk_size` student rows (whole groups) at
a time under activation checkpointing, so neither model's full [N, V] logits ever exist at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from distill.errors import DistillError
from distill.losses.divergences import log_probs
from distill.losses.sparse import FLOOR
from distill.losses.objective import (
    IGNORE_INDEX,
    LossOutput,
    LossSettings,
    Objective,
    build_objective,
    check_labels,
    cross_entropy_sum,
    empty_output,
    tempered,
    wide,
)


@dataclass(frozen=True)
class VocabSplit:
    """Which student and teacher ids the divergence compares pairwise (`shared_*`, same order) and which go to
    ULD (`rest_*`). `uld` shares nothing; `align` shares the entries whose strings both vocabularies hold."""

    shared_student: Tensor
    shared_teacher: Tensor
    rest_student: Tensor
    rest_teacher: Tensor

    @property
    def whole(self) -> bool:
        """Every entry shared, in the same order on both sides (identical vocabularies): no gather needed."""
        n = self.shared_student.numel()
        return (self.rest_student.numel() == 0 and self.rest_teacher.numel() == 0
                and torch.equal(self.shared_student, self.shared_teacher)
                and torch.equal(self.shared_student.cpu(), torch.arange(n)))

    def to(self, device: torch.device) -> "VocabSplit":
        """The same split on `device`."""
        return VocabSplit(*(t.to(device) for t in (self.shared_student, self.shared_teacher, self.rest_student,
                                                    self.rest_teacher)))


def vocab_split(
    student_vocab: int, teacher_vocab: int, shared_student: Optional[list[int]] = None,
    shared_teacher: Optional[list[int]] = None,
) -> VocabSplit:
    """The split for vocabularies of these sizes: the given pairs shared (none for ULD), every other id to ULD."""
    shared_student, shared_teacher = list(shared_student or []), list(shared_teacher or [])
    if len(shared_student) != len(shared_teacher):
        raise DistillError("vocab_split: shared_student and shared_teacher must pair up one to one")
    rest_student = sorted(set(range(student_vocab)) - set(shared_student))
    rest_teacher = sorted(set(range(teacher_vocab)) - set(shared_teacher))
    as_ids = lambda ids: torch.tensor(ids, dtype=torch.long)  # noqa: E731
    return VocabSplit(as_ids(shared_student), as_ids(shared_teacher), as_ids(rest_student), as_ids(rest_teacher))


@dataclass(frozen=True)
class AlignedGroups:
    """G aligned groups as padded [G, L] tensors (-1 pads): flat student rows (row i predicts labels[i]), flat
    teacher rows, and the teacher token each teacher row predicts. Groups are ordered by their first student row."""

    student_rows: Tensor
    teacher_rows: Tensor
    teacher_tokens: Tensor

    @property
    def count(self) -> int:
        """How many groups."""
        return self.student_rows.size(0)

    def to(self, device: torch.device) -> "AlignedGroups":
        """The same groups on `device`."""
        return AlignedGroups(*(t.to(device) for t in (self.student_rows, self.teacher_rows, self.teacher_tokens)))


def uld_distance(student_probs: Tensor, teacher_probs: Tensor, top_k: Optional[int] = None) -> Tensor:
    """Per row, sum_i |sorted(student)_i - sorted(teacher)_i| over the top-k of each (all with top_k None),
    the shorter side padded with zeros: ULD's Wasserstein-1 distance between sorted probability vectors."""
    width = max(student_probs.size(-1), teacher_probs.size(-1))
    k = width if top_k is None else min(top_k, width)
    return (_top_padded(student_probs, k) - _top_padded(teacher_probs, k)).abs().sum(-1)


def _top_padded(probs: Tensor, k: int) -> Tensor:
    top = probs.topk(min(k, probs.size(-1)), dim=-1, sorted=True).values
    return torch.nn.functional.pad(top, (0, k - top.size(-1)))


def merged_log_probs(row_log_probs: Tensor, rows: Tensor, tokens: Tensor) -> Tensor:
    """[G, V]: each group's first row's log-probs plus the log-probs of its later rows' tokens (-1 pads skipped)."""
    first = row_log_probs[rows[:, 0]]
    if rows.size(1) == 1:
        return first
    later, later_tokens = rows[:, 1:], tokens[:, 1:]
    present = later >= 0
    picked = row_log_probs[later.clamp(min=0), later_tokens.clamp(min=0)]
    return first + torch.where(present, picked, torch.zeros_like(picked)).sum(1, keepdim=True)


def group_distance(
    student: Tensor, teacher: Tensor, split: VocabSplit, objective: Objective, top_k: Optional[int]
) -> Tensor:
    """[G]: the divergence on the shared entries (renormalised) plus ULD on the rest, from merged log-probs."""
    if split.whole:
        return objective.divergence(student, teacher)
    out = student.new_zeros(student.size(0))
    if split.shared_student.numel():
        shared_student = log_probs(student[:, split.shared_student])
        shared_teacher = log_probs(teacher[:, split.shared_teacher])
        out = out + objective.divergence(shared_student, shared_teacher)
    if split.rest_student.numel() or split.rest_teacher.numel():
        out = out + uld_distance(student[:, split.rest_student].exp(), teacher[:, split.rest_teacher].exp(), top_k)
    return out


@dataclass(frozen=True)
class DenseTeacherRows:
    """A live teacher's final hidden states [Nt, Dt] on its own tokens and its head [Vt, Dt]."""

    hidden: Tensor
    head: Tensor

    def rows(self, index: Tensor) -> "DenseTeacherRows":
        """The rows `index` (the head is shared)."""
        return DenseTeacherRows(self.hidden[index], self.head)

    def tempered_log_probs(self, temperature: float) -> Tensor:
        """[n, Vt] log-softmax of the logits divided by the temperature."""
        return log_probs(wide(tempered(self.hidden, temperature) @ self.head.t()))


@dataclass(frozen=True)
class SparseTeacherRows:
    """A teacher's cached rows at its aligned positions: top-k ids and log-probs [Nt, k] (log-softmax over `vocab`
    entries at T = 1) and the log mass outside them [Nt]."""

    ids: Tensor
    log_probs: Tensor
    tail: Tensor
    vocab: int

    def rows(self, index: Tensor) -> "SparseTeacherRows":
        """The rows `index`."""
        return SparseTeacherRows(self.ids[index], self.log_probs[index], self.tail[index], self.vocab)

    def whole(self) -> Tensor:
        """[n, vocab] log-probs: the kept ids' values, every other id an equal share of the tail."""
        n, k = self.ids.shape
        values = wide(self.log_probs)
        rest = self.vocab - k
        share = wide(self.tail) - math.log(rest) if rest > 0 else torch.full_like(values[:, 0], FLOOR)
        out = share[:, None].expand(n, self.vocab).clone()
        return out.scatter_(1, self.ids.long(), values).clamp(min=FLOOR)

    def tempered_log_probs(self, temperature: float) -> Tensor:
        """[n, vocab] log-softmax of the whole rows divided by the temperature (at T = 1: the whole rows)."""
        return log_probs(tempered(self.whole(), temperature))


TeacherRows = Union[DenseTeacherRows, SparseTeacherRows]


def _student_tokens(labels: Tensor, rows: Tensor) -> Tensor:
    return torch.where(rows >= 0, labels[rows.clamp(min=0)], rows)


def _check_groups(labels: Tensor, groups: AlignedGroups) -> None:
    rows = groups.student_rows[groups.student_rows >= 0]
    if rows.numel() and bool((labels[rows] == IGNORE_INDEX).any()):
        raise DistillError("cross-tokenizer loss: an aligned group includes a position with no label")
    if groups.count and bool((groups.student_rows[:, 0] < 0).any() | (groups.teacher_rows[:, 0] < 0).any()):
        raise DistillError("cross-tokenizer loss: every aligned group needs a token on both sides")


def cross_tokenizer_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, groups: AlignedGroups, split: VocabSplit, *,
    divergence: str = "forward_kl", temperature: float = 1.0, alpha: float = 0.5, beta: float = 0.5,
    skew: float = 0.1, top_k: Optional[int] = None,
) -> LossOutput:
    """The objective on full logits: student [N, Vs], teacher [Nt, Vt] (simple path; the chunked one's reference)."""
    objective = build_objective(divergence, temperature, alpha, beta, skew)
    check_labels(labels, student_logits.size(-1))
    _check_groups(labels, groups)
    valid = labels != IGNORE_INDEX
    n = int(valid.sum())
    if n == 0:
        return empty_output(student_logits)
    student = wide(student_logits)
    ce = cross_entropy_sum(student[valid], labels[valid])
    kd = student.new_zeros(())
    if groups.count:
        t = objective.temperature
        student_lp = log_probs(tempered(student, t))
        teacher_lp = log_probs(tempered(wide(teacher_logits.detach()), t))
        merged_student = merged_log_probs(student_lp, groups.student_rows, _student_tokens(labels, groups.student_rows))
        merged_teacher = merged_log_probs(teacher_lp, groups.teacher_rows, groups.teacher_tokens)
        kd = t * t * group_distance(merged_student, merged_teacher, split.to(student.device), objective, top_k).sum()
    loss = objective.alpha * ce / n + (1.0 - objective.alpha) * kd / max(groups.count, 1)
    return LossOutput(loss=loss, kd=kd.detach() / max(groups.count, 1), ce=ce.detach() / n, n_tokens=n)


def cross_tokenizer_loss_chunked(
    student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor, labels: Tensor,
    groups: AlignedGroups, split: VocabSplit, *, divergence: str = "forward_kl", temperature: float = 1.0,
    alpha: float = 0.5, beta: float = 0.5, skew: float = 0.1, chunk_size: int = 192, top_k: Optional[int] = None,
) -> LossOutput:
    """The same objective from hidden states and heads, about `chunk_size` trained student rows (whole groups) at
    a time; each chunk's logits are recomputed in backward instead of kept (activation checkpointing)."""
    teacher = DenseTeacherRows(teacher_hidden.detach(), teacher_head.detach())
    return cross_tokenizer_loss_on_rows(student_hidden, student_head, teacher, labels, groups, split,
                                        divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
                                        skew=skew, chunk_size=chunk_size, top_k=top_k)


def cross_tokenizer_loss_on_rows(
    student_hidden: Tensor, student_head: Tensor, teacher: TeacherRows, labels: Tensor, groups: AlignedGroups,
    split: VocabSplit, *, divergence: str = "forward_kl", temperature: float = 1.0, alpha: float = 0.5,
    beta: float = 0.5, skew: float = 0.1, chunk_size: int = 192, top_k: Optional[int] = None,
) -> LossOutput:
    """The chunked objective against a live teacher's rows or its cached top-k rows (`groups.teacher_rows`
    index `teacher`'s rows)."""
    objective = build_objective(divergence, temperature, alpha, beta, skew)
    if chunk_size <= 0:
        raise DistillError(f"method.chunk_size: must be > 0, got {chunk_size}")
    check_labels(labels, student_head.size(0))
    _check_groups(labels, groups)
    valid = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    n = valid.numel()
    if n == 0:
        return empty_output(student_hidden, student_head)
    # Group rows as indices into the trained rows, which are gathered once (backward scatters their grads back).
    position = torch.full_like(labels, -1)
    position[valid] = torch.arange(n, device=labels.device)
    student_rows = torch.where(groups.student_rows >= 0, position[groups.student_rows.clamp(min=0)],
                               groups.student_rows)
    hidden, labels = student_hidden[valid], labels[valid]
    split = split.to(hidden.device)
    totals = []
    for rows, group_slice in _chunks(student_rows, n, chunk_size):
        local_student = student_rows[group_slice]
        local_student = torch.where(local_student >= 0, local_student - rows.start, local_student)
        teacher_rows = groups.teacher_rows[group_slice]
        needed = torch.unique(teacher_rows[teacher_rows >= 0])
        local_teacher = torch.where(teacher_rows >= 0, torch.searchsorted(needed, teacher_rows), teacher_rows)
        chunk = _ChunkGroups(local_student, local_teacher, groups.teacher_tokens[group_slice])
        args = (hidden[rows], student_head, teacher.rows(needed), labels[rows], chunk, split, objective, top_k, n,
                max(groups.count, 1))
        if torch.is_grad_enabled() and (hidden.requires_grad or student_head.requires_grad):
            totals.append(checkpoint(_chunk_sums, *args, use_reentrant=False))
        else:
            totals.append(_chunk_sums(*args))
    loss, ce, kd = torch.stack(totals).sum(0).unbind()
    return LossOutput(loss=loss, kd=kd.detach() / max(groups.count, 1), ce=ce.detach() / n, n_tokens=n)


@dataclass(frozen=True)
class _ChunkGroups:
    student_rows: Tensor  # rows within the chunk
    teacher_rows: Tensor  # rows within the chunk's gathered teacher rows
    teacher_tokens: Tensor


def _chunks(student_rows: Tensor, n: int, chunk_size: int) -> list[tuple[slice, slice]]:
    """(student rows, groups) per chunk: about chunk_size rows, stretched so that no group is split."""
    firsts = student_rows[:, 0].tolist() if student_rows.numel() else []
    lasts = student_rows.max(dim=1).values.tolist() if student_rows.numel() else []
    out, start, g = [], 0, 0
    while start < n:
        end, first_group = min(start + chunk_size, n), g
        while g < len(firsts) and firsts[g] < end:
            end = max(end, lasts[g] + 1)
            g += 1
        out.append((slice(start, end), slice(first_group, g)))
        start = end
    return out


def _chunk_sums(
    hidden: Tensor, head: Tensor, teacher: TeacherRows, labels: Tensor, groups: _ChunkGroups, split: VocabSplit,
    objective: Objective, top_k: Optional[int], n: int, n_groups: int,
) -> Tensor:
    """[3]: this chunk's share of the mean loss, its summed CE and its summed T^2 * group distance."""
    student = wide(hidden @ head.t())
    ce = cross_entropy_sum(student, labels)
    kd = student.new_zeros(())
    if groups.student_rows.numel():
        t = objective.temperature
        student_lp = log_probs(tempered(student, t))
        teacher_lp = teacher.tempered_log_probs(t)
        merged_student = merged_log_probs(student_lp, groups.student_rows,
                                          _student_tokens(labels, groups.student_rows))
        merged_teacher = merged_log_probs(teacher_lp, groups.teacher_rows, groups.teacher_tokens)
        kd = t * t * group_distance(merged_student, merged_teacher, split, objective, top_k).sum()
    loss = objective.alpha * ce / n + (1.0 - objective.alpha) * kd / n_groups
    return torch.stack([loss, ce.detach(), kd.detach()])


@dataclass
class CrossTokenizerTargets:
    """One micro-batch's teacher signal across tokenizers: the teacher's final hidden states [Nt, Dt] on its own
    tokens, its head, the aligned groups and the vocabulary split; logits are formed a chunk at a time."""

    hidden: Tensor
    head: Tensor
    groups: AlignedGroups
    split: VocabSplit
    top_k: Optional[int] = None

    def chunked_loss(self, hidden: Tensor, head: Tensor, labels: Tensor, settings: LossSettings) -> LossOutput:
        """The cross-tokenizer objective against this teacher, `settings.chunk_size` student rows at a time."""
        return cross_tokenizer_loss_chunked(hidden, head, self.hidden, self.head, labels, self.groups, self.split,
                                            top_k=self.top_k, **settings.divergence_keywords())


@dataclass
class CachedCrossTokenizerTargets:
    """One micro-batch's teacher signal across tokenizers from the top-k cache: the teacher's rows at its aligned
    positions (`groups.teacher_rows` index them), the aligned groups and the vocabulary split."""

    rows: SparseTeacherRows
    groups: AlignedGroups
    split: VocabSplit
    top_k: Optional[int] = None

    def chunked_loss(self, hidden: Tensor, head: Tensor, labels: Tensor, settings: LossSettings) -> LossOutput:
        """The cross-tokenizer objective against the cached rows, `settings.chunk_size` student rows at a time."""
        return cross_tokenizer_loss_on_rows(hidden, head, self.rows, labels, self.groups, self.split,
                                            top_k=self.top_k, **settings.divergence_keywords())
