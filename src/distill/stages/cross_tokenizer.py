"""What training does when the teacher's and the student's tokenizers differ (method.cross_tokenizer), decided
before the teacher loads: `text` trains on the teacher's text alone, `uld` and `align` distil logits across the two
vocabularies through a live teacher that reads each example with its own tokenizer (docs/cross_tokenizer.md); the
eval stage aligns the held-out examples the same way for agreement and KL on aligned spans."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.data.layouts import Example
from distill.data.tokenize import encode_example, example_text, padding_id
from distill.errors import DistillError
from distill.eval.measure import SpanAlignment
from distill.losses.cross_tokenizer import vocab_split
from distill.models.alignment import has_offsets, shared_vocabulary
from distill.models.compat import tokenizer_difference
from distill.recipe import Recipe
from distill.signals.cross_tokenizer import (
    HIDDEN_ACROSS_TOKENIZERS,
    PACKING_ACROSS_TOKENIZERS,
    CrossTokenizerTeacher,
    teacher_views,
)
from distill.stages.data import TrainingSet
from distill.stages.facts import uses_teacher_cache

log = logging.getLogger("distill")

CROSS_WITH_CACHE = ("method.cross_tokenizer: {mode} needs a live teacher (the top-k cache keeps the teacher's ids "
                    "for its own tokenization only); remove teacher.cache or use cross_tokenizer: text")


@dataclass(frozen=True)
class Crossing:
    """A teacher/student pair on different tokenizers, and how the student learns from the teacher."""

    mode: str  # text | uld | align
    teacher_tokenizer: PreTrainedTokenizerBase
    student_tokenizer: PreTrainedTokenizerBase

    @property
    def logits(self) -> bool:
        """Whether the teacher's logits are distilled (uld, align) rather than only its text."""
        return self.mode != "text"


def crossing(
    recipe: Recipe, teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase
) -> Optional[Crossing]:
    """None for a same-tokenizer pair or an SFT recipe (a set method.cross_tokenizer is then a log line); else the
    recipe's cross-tokenizer method, refused with one line where it cannot apply."""
    if recipe.method.kind != "kd":
        return None
    difference = tokenizer_difference(teacher_tok, student_tok)
    wanted = recipe.method.cross_tokenizer
    if difference is None:
        if wanted is not None:
            log.info("method.cross_tokenizer: %s is not needed: teacher and student share one tokenizer, so "
                     "logit KD runs as usual", wanted)
        return None
    mode = wanted or "text"
    if mode == "text":
        log.info("teacher and student tokenizers differ (%s): logit KD is off, the student learns the teacher's "
                 "text (method.cross_tokenizer: text; uld or align distil logits across vocabularies)", difference)
        return Crossing(mode, teacher_tok, student_tok)
    _check_logit_crossing(recipe, mode, teacher_tok, student_tok)
    log.info("teacher and student tokenizers differ (%s): logit KD across vocabularies (method.cross_tokenizer: "
             "%s)", difference, mode)
    return Crossing(mode, teacher_tok, student_tok)


def _check_logit_crossing(
    recipe: Recipe, mode: str, teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase
) -> None:
    if uses_teacher_cache(recipe):
        raise DistillError(CROSS_WITH_CACHE.format(mode=mode))
    if recipe.method.weighting != "none":
        raise DistillError(f"method.weighting: {recipe.method.weighting} is not supported with method.cross_tokenizer: "
                           f"{mode} yet; set method.weighting: none")
    if recipe.method.hidden is not None:
        raise DistillError(HIDDEN_ACROSS_TOKENIZERS)
    if recipe.train.packing:
        raise DistillError(PACKING_ACROSS_TOKENIZERS)
    for who, tok in (("teacher", teacher_tok), ("student", student_tok)):
        if not has_offsets(tok):
            raise DistillError(
                f"method.cross_tokenizer: {mode} aligns the two tokenizations by character offsets, which the "
                f"{who}'s tokenizer ({type(tok).__name__}, not a fast tokenizer) does not give; use "
                "cross_tokenizer: text"
            )


def crossing_signal(
    recipe: Recipe, cross: Crossing, teacher: Optional[PreTrainedModel], student_rows: int, data: TrainingSet
) -> Optional[CrossTokenizerTeacher]:
    """The live teacher on its own tokenization for uld/align; None for text (the student trains on labels).
    `student_rows` is the student head's size (rows past its tokenizer are padding, compared by ULD)."""
    if not cross.logits or teacher is None:
        return None
    student_tok, teacher_tok = cross.student_tokenizer, cross.teacher_tokenizer
    d = recipe.data
    texts = [example_text(e, student_tok, d.max_length, d.system_prompt) for e in data.examples
             if encode_example(e, student_tok, d.max_length, d.system_prompt) is not None]
    views = teacher_views(student_tok, teacher_tok, texts, data.encoded)
    shared_student, shared_teacher = shared_vocabulary(student_tok, teacher_tok) if cross.mode == "align" else ([], [])
    split = vocab_split(student_rows, len(teacher_tok), shared_student, shared_teacher)
    log.info("cross-tokenizer %s: %d vocabulary entries shared (divergence), %d student and %d teacher entries "
             "compared by ULD", cross.mode, len(shared_student), split.rest_student.numel(),
             split.rest_teacher.numel())
    pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else teacher_tok.eos_token_id
    return CrossTokenizerTeacher(teacher, views, pad, len(teacher_tok), split, recipe.method.uld_top_k)


def span_alignment(
    recipe: Recipe, teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase, held_out: list[Example]
) -> tuple[Optional[SpanAlignment], dict[str, str]]:
    """The held-out examples as the student reads them and as the teacher reads the same text, aligned by
    characters, for agreement and KL on aligned spans; (None, {metric: why absent}) where they cannot be aligned."""
    unaligned = next((f"the {who}'s tokenizer ({type(tok).__name__}) gives no character offsets to align the two "
                      "tokenizations by" for who, tok in (("teacher", teacher_tok), ("student", student_tok))
                      if not has_offsets(tok)), None)
    shared_student, shared_teacher = ([], []) if unaligned else shared_vocabulary(student_tok, teacher_tok)
    if not unaligned and not shared_student:
        unaligned = "the two vocabularies share no entry (no token stands for the same bytes on both sides)"
    if unaligned:
        log.warning("eval: top-1 agreement and KL to the teacher not measured: %s", unaligned)
        return None, {key: unaligned for key in ("top1_agreement", "kl_to_teacher")}
    d = recipe.data
    pairs = [(e, encode_example(e, student_tok, d.max_length, d.system_prompt)) for e in held_out]
    encoded = [enc for _, enc in pairs if enc is not None]
    texts = [example_text(e, student_tok, d.max_length, d.system_prompt) for e, enc in pairs if enc is not None]
    views = teacher_views(student_tok, teacher_tok, texts, encoded)
    as_ids = lambda ids: torch.tensor(ids, dtype=torch.long)  # noqa: E731
    return SpanAlignment(encoded, views, as_ids(shared_student), as_ids(shared_teacher), padding_id(student_tok),
                         padding_id(teacher_tok)), {}
