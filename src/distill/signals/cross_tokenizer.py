"""A live teacher whose tokenizer differs from the student's: it reads each training example's text through its
own tokenizer, runs on its own ids, and gives the groups of tokens both tokenizations share (by characters).

Views are built once per training set: for each encoded student example, the teacher's ids of the same text (cut
where the student's tokens end) and the aligned groups whose student tokens are all trained.

A cached teacher (`CachedCrossTokenizerTeacher`) reads instead the top-k rows `distill capture` wrote for each view
(`teacher_examples`: the view's ids, labelled at the teacher tokens of its groups), and runs no model.

On-policy (`CrossTokenizerSamples`): each of the student's sampled responses becomes an example again (its prompt's
messages, the sample's text as the answer), encoded and viewed as a training example is; the live teacher then
scores those views, so one path computes the loss on the data's responses and on the student's samples.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from distill.data.layouts import Example
from distill.data.tokenize import (
    IGNORE,
    EncodedExample,
    encode_example,
    example_text,
    example_token_ids,
    without_turn_end,
)
from distill.errors import DistillError
from distill.losses.cross_tokenizer import (
    AlignedGroups,
    CachedCrossTokenizerTargets,
    CrossTokenizerTargets,
    SparseTeacherRows,
    VocabSplit,
)
from distill.models import output_head
from distill.models.alignment import Group, align_spans, spans_of_ids
from distill.models.heads import decoder_layer_outputs
from distill.signals.reader import TeacherCacheReader

log = logging.getLogger(__name__)

HIDDEN_ACROSS_TOKENIZERS = ("method.hidden: hidden-state KD matches positions one to one, which tokenizers that "
                            "differ do not have; remove method.hidden or use one tokenizer")
PACKING_ACROSS_TOKENIZERS = ("train.packing does not work across tokenizers yet (the teacher reads each example on "
                             "its own); set train.packing: false")


@dataclass(frozen=True)
class TeacherView:
    """One training example as the teacher reads it: its ids, and the aligned groups (student token indices,
    teacher token indices) where the student is trained."""

    ids: list[int]
    groups: list[Group]


def teacher_views(
    student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase, texts: Sequence[str],
    encoded: Sequence[EncodedExample],
) -> list[TeacherView]:
    """The teacher's view of each encoded example, whose text (as rendered for the student) is `texts[i]`."""
    views = [_view(student_tok, teacher_tok, text, example) for text, example in zip(texts, encoded)]
    trained = sum(sum(label != IGNORE for label in e.labels[1:]) for e in encoded)
    aligned = sum(len(g.student) for v in views for g in v.groups)
    log.info("cross-tokenizer alignment: %d of %d trained student tokens in %d aligned groups (%.0f%%)", aligned,
             trained, sum(len(v.groups) for v in views), 100 * aligned / max(trained, 1))
    return views


def _view(
    student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase, text: str, example: EncodedExample
) -> TeacherView:
    student_spans = spans_of_ids(student_tok, text, example.input_ids)
    covered = max((span[1] for span in student_spans if span is not None), default=0)
    encoded = teacher_tok(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, spans = [], []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        if end > covered or (end == start and ids and spans[-1] is not None):
            break  # past the student's text, or special tokens after the text (an added eos)
        ids.append(token)
        spans.append((start, end) if end > start else None)
    groups = [g for g in align_spans(student_spans, spans) if _trained(g, example.labels)]
    return TeacherView(ids, groups)


def _trained(group: Group, labels: list[int]) -> bool:
    """Every student token of the group is predicted and trained, and the teacher predicts all of its tokens."""
    return (bool(group.student) and bool(group.teacher) and group.student[0] >= 1 and group.teacher[0] >= 1
            and all(labels[j] != IGNORE for j in group.student))


def teacher_examples(views: Sequence[TeacherView]) -> list[EncodedExample]:
    """Each view as the teacher's own training example: its ids, labelled where a group's teacher token is (the
    positions a cache keeps rows for; the example hash then covers the ids and the alignment)."""
    out = []
    for view in views:
        aligned = {k for group in view.groups for k in group.teacher}
        out.append(EncodedExample(list(view.ids), [t if k in aligned else IGNORE for k, t in enumerate(view.ids)]))
    return out


@dataclass
class CrossTokenizerTeacher:
    """A frozen teacher model on its own tokenization of each example (dense logits, chunk by chunk)."""

    model: torch.nn.Module
    views: list[TeacherView]
    pad_id: int
    vocab: int  # teacher tokenizer's size: the head's rows beyond it are padding
    split: VocabSplit
    top_k: Optional[int] = None

    def for_batch(
        self, batch: dict[str, Tensor], indices: Optional[Sequence[int]] = None, layers: Sequence[int] = ()
    ) -> tuple[CrossTokenizerTargets, dict[int, Tensor]]:
        """The teacher's forward on its own ids of the batch's examples `indices`, and the aligned groups."""
        if layers:
            raise DistillError(HIDDEN_ACROSS_TOKENIZERS)
        if "position_ids" in batch:
            raise DistillError(PACKING_ACROSS_TOKENIZERS)
        if indices is None:
            raise DistillError("cross-tokenizer teacher: needs the batch's example indices")
        where = batch["input_ids"].device
        views = [self.views[i] for i in indices]
        width = max(len(v.ids) for v in views)
        ids = torch.full((len(views), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(views), width), dtype=torch.long)
        for row, view in enumerate(views):
            ids[row, :len(view.ids)] = torch.tensor(view.ids, dtype=torch.long)
            mask[row, :len(view.ids)] = 1
        with torch.no_grad():
            final, _ = decoder_layer_outputs(self.model, ids.to(where), mask.to(where), [], None)
            final = final[:, :-1]  # position i predicts token i + 1
        groups = batch_groups(views, batch["input_ids"].size(1) - 1, width - 1)
        head = output_head(self.model).detach()[: self.vocab]
        return CrossTokenizerTargets(final.reshape(-1, final.shape[-1]), head, groups.to(where), self.split.to(where),
                                     self.top_k), {}

    def on_views(self, views: Sequence[TeacherView]) -> "CrossTokenizerTeacher":
        """The same teacher on other examples' views (a batch's rebuilt samples: `for_batch` indices 0..n-1)."""
        return replace(self, views=list(views))


def batch_groups(
    views: Sequence[TeacherView], student_width: int, teacher_width: Optional[int] = None
) -> AlignedGroups:
    """The views' groups as flat rows of the batch: student token j of row b is predicted at b * width + j - 1;
    teacher token k at b * teacher_width + k - 1, or without a teacher width at its row among the batch's cached
    rows (the rows of `teacher_examples`, view after view, in position order)."""
    s_rows, t_rows, t_tokens = [], [], []
    cached = 0
    for b, view in enumerate(views):
        if teacher_width is None:
            positions = sorted({k for group in view.groups for k in group.teacher})
            row_of = {k: cached + r for r, k in enumerate(positions)}
            cached += len(positions)
        else:
            row_of = {k: b * teacher_width + k - 1 for group in view.groups for k in group.teacher}
        for group in view.groups:
            s_rows.append([b * student_width + j - 1 for j in group.student])
            t_rows.append([row_of[k] for k in group.teacher])
            t_tokens.append([view.ids[k] for k in group.teacher])
    return AlignedGroups(_padded(s_rows), _padded(t_rows), _padded(t_tokens))


@dataclass
class CachedCrossTokenizerTeacher:
    """The teacher's top-k rows on its own tokenization of each example, read from a verified cache (distill
    capture); no model is run or held."""

    reader: TeacherCacheReader
    views: list[TeacherView]
    split: VocabSplit
    top_k: Optional[int] = None

    def for_batch(
        self, batch: dict[str, Tensor], indices: Optional[Sequence[int]] = None, layers: Sequence[int] = ()
    ) -> tuple[CachedCrossTokenizerTargets, dict[int, Tensor]]:
        """The cached rows of the batch's examples `indices` and their aligned groups."""
        if layers:
            raise DistillError(HIDDEN_ACROSS_TOKENIZERS)
        if "position_ids" in batch:
            raise DistillError(PACKING_ACROSS_TOKENIZERS)
        if indices is None:
            raise DistillError("teacher.cache: the cached teacher needs the batch's example indices")
        where = batch["input_ids"].device
        sparse = self.reader.targets(indices, where)
        rows = SparseTeacherRows(sparse.ids, sparse.log_probs, sparse.tail, sparse.vocab_size)
        groups = batch_groups([self.views[i] for i in indices], batch["input_ids"].size(1) - 1)
        return CachedCrossTokenizerTargets(rows, groups.to(where), self.split.to(where), self.top_k), {}


@dataclass
class CrossTokenizerSamples:
    """The student's sampled responses as training examples across tokenizers: each drawn example's prompt with the
    sample's text as its answer, encoded for the student and read by the teacher exactly as a data example is."""

    examples: list[Example]  # the training examples, at the indices of their encodings
    student_tokenizer: PreTrainedTokenizerBase
    teacher_tokenizer: PreTrainedTokenizerBase
    teacher: CrossTokenizerTeacher
    max_length: int
    system_prompt: Optional[str] = None

    def rebuild(
        self, indices: Sequence[int], responses: Sequence[str], ended: Sequence[bool]
    ) -> tuple[list[EncodedExample], CrossTokenizerTeacher]:
        """(the student's encoding of each answered example, the teacher on their views) for the examples
        `indices` answered with `responses`; an answer that did not end (`ended` False) leaves its end-of-turn
        marker untrained."""
        answered = [_answered(self.examples[i], text) for i, text in zip(indices, responses)]
        encoded = [self._encoded(example, done) for example, done in zip(answered, ended)]
        texts = [example_text(e, self.student_tokenizer, self.max_length, self.system_prompt) for e in answered]
        views = [_view(self.student_tokenizer, self.teacher_tokenizer, text, e) for text, e in zip(texts, encoded)]
        return encoded, self.teacher.on_views(views)

    def _encoded(self, example: Example, ended: bool) -> EncodedExample:
        tok, length, system = self.student_tokenizer, self.max_length, self.system_prompt
        encoded = encode_example(example, tok, length, system)
        if encoded is None:  # nothing left to predict: a row that trains nothing
            ids = example_token_ids(example, tok, length, system)
            return EncodedExample(ids, [IGNORE] * len(ids), example.id)
        return encoded if ended else without_turn_end(encoded, tok)


def _answered(example: Example, response: str) -> Example:
    """The example's prompt (its messages before the first answer) answered with `response`; a plain-text
    example (no prompt) becomes the response's text."""
    if example.messages is None:
        return Example(id=example.id, text=response)
    first = next((i for i, m in enumerate(example.messages) if m["role"] == "assistant"), len(example.messages))
    return Example(id=example.id, messages=[*example.messages[:first], {"role": "assistant", "content": response}])


def _padded(rows: list[list[int]]) -> Tensor:
    width = max((len(r) for r in rows), default=1)
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out

