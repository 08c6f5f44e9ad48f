"""What training does when the teacher's and the student's tokenizers differ (method.cross_tokenizer), decided
before the teacher loads: `text` trains on the teacher's text alone, `uld` and `align` distil logits across the two
vocabularies through a teacher that reads each example with its own tokenizer, live or from its top-k cache
(`distill capture` writes the rows of those same teacher views; docs/cross_tokenizer.md). On-policy (method.kind:
on_policy) takes uld or align: the student's samples are rebuilt as text and read by both sides the same way. The
eval stage aligns the held-out examples the same way for agreement and KL on aligned spans."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.data.layouts import Example
from distill.data.tokenize import EncodedExample, encode_example, example_text, padding_id
from distill.errors import DistillError
from distill.eval.measure import SpanAlignment
from distill.losses.cross_tokenizer import vocab_split
from distill.models import load_tokenizer
from distill.models.alignment import has_offsets, shared_vocabulary
from distill.models.compat import tokenizer_difference
from distill.recipe import Recipe
from distill.signals.cross_tokenizer import (
    HIDDEN_ACROSS_TOKENIZERS,
    PACKING_ACROSS_TOKENIZERS,
    CachedCrossTokenizerTeacher,
    CrossTokenizerSamples,
    CrossTokenizerTeacher,
    TeacherView,
    teacher_examples,
    teacher_views,
)
from distill.signals.provenance import alignment_hash
from distill.signals.reader import open_teacher_cache
from distill.signals.teacher_signal import TeacherSignal
from distill.stages.data import TrainingSet, training_set
from distill.stages.facts import (
    cache_path,
    model_source,
    named_by,
    scores_on_server,
    teacher_files,
    teacher_id,
    uses_teacher_cache,
)
from distill.stages.student import own_tokenizer

log = logging.getLogger("distill")

TEXT_WITH_CACHE = ("method.cross_tokenizer: text trains on the teacher's text alone, so teacher.cache (the teacher's "
                   "log-probs) would go unused; set method.cross_tokenizer: uld or align to distil them across the "
                   "tokenizers, or remove teacher.cache")
ON_POLICY_TEXT = ("method.cross_tokenizer: text trains on the teacher's text alone, and method.kind: on_policy needs "
                  "the teacher's distribution on the student's samples; set method.cross_tokenizer: uld or align "
                  "(or method.kind: sft)")
ON_POLICY_SERVED = ("teacher.endpoint: a served teacher scores the student's token ids as its own, and the two "
                    "tokenizers differ; on-policy across tokenizers needs a local teacher (remove teacher.endpoint)")
ON_POLICY_SEQ_KD = ("method.seq_kd: the teacher's samples would answer prompts in the student's tokens, which the "
                    "teacher's tokenizer does not read; set method.seq_kd: false across tokenizers")
ON_POLICY_SAMPLED_TOKEN = ("method.estimator: sampled_token needs the teacher's log-prob of each student token, "
                           "which tokenizers that differ do not give; use method.estimator: full (uld or align)")


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
    if recipe.method.kind not in ("kd", "on_policy"):
        return None
    difference = tokenizer_difference(teacher_tok, student_tok)
    wanted = recipe.method.cross_tokenizer
    if difference is None:
        if wanted is not None:
            log.info("method.cross_tokenizer: %s is not needed: teacher and student share one tokenizer, so "
                     "logit KD runs as usual", wanted)
        return None
    mode = wanted or "text"
    if recipe.method.kind == "on_policy":
        _check_on_policy_crossing(recipe, mode)
    if mode == "text" and uses_teacher_cache(recipe):
        raise DistillError(TEXT_WITH_CACHE)
    if mode == "text":
        log.info("teacher and student tokenizers differ (%s): logit KD is off, the student learns the teacher's "
                 "text (method.cross_tokenizer: text; uld or align distil logits across vocabularies)", difference)
        return Crossing(mode, teacher_tok, student_tok)
    _check_logit_crossing(recipe, mode, teacher_tok, student_tok)
    log.info("teacher and student tokenizers differ (%s): logit KD across vocabularies (method.cross_tokenizer: "
             "%s)", difference, mode)
    return Crossing(mode, teacher_tok, student_tok)


def _check_on_policy_crossing(recipe: Recipe, mode: str) -> None:
    """What on-policy distillation across tokenizers cannot do, refused before the teacher loads."""
    m = recipe.method
    refusals = [(mode == "text", ON_POLICY_TEXT), (scores_on_server(recipe), ON_POLICY_SERVED),
                (m.seq_kd, ON_POLICY_SEQ_KD), (m.estimator == "sampled_token", ON_POLICY_SAMPLED_TOKEN)]
    for refused, line in refusals:
        if refused:
            raise DistillError(line)


def _check_logit_crossing(
    recipe: Recipe, mode: str, teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase
) -> None:
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
) -> Optional[TeacherSignal]:
    """The teacher on its own tokenization for uld/align (live, or its top-k cache with teacher.cache); None for
    text (the student trains on labels). `student_rows` is the student head's size (rows past its tokenizer are
    padding, compared by ULD)."""
    cached = uses_teacher_cache(recipe)
    if not cross.logits or (teacher is None and not cached):
        return None
    student_tok, teacher_tok = cross.student_tokenizer, cross.teacher_tokenizer
    views = cross_views(recipe, cross, data)
    shared_student, shared_teacher = shared_vocabulary(student_tok, teacher_tok) if cross.mode == "align" else ([], [])
    split = vocab_split(student_rows, len(teacher_tok), shared_student, shared_teacher)
    log.info("cross-tokenizer %s: %d vocabulary entries shared (divergence), %d student and %d teacher entries "
             "compared by ULD", cross.mode, len(shared_student), split.rest_student.numel(),
             split.rest_teacher.numel())
    if cached:
        reader = open_teacher_cache(cache_path(recipe), teacher_id(recipe), teacher_tok, teacher_examples(views),
                                    teacher_files(recipe), alignment_hash(student_tok))
        k = reader.cache.header.k
        log.info("teacher: top-%d cache %s on its own tokenization (the teacher is not run)", k, reader.cache.path)
        if recipe.method.uld_top_k is None or recipe.method.uld_top_k > k:
            log.warning("method.uld_top_k (%s) compares more teacher entries than teacher.cache_k (%d) keeps; the "
                        "rest are the tail spread evenly (set uld_top_k <= cache_k to compare kept entries only)",
                        recipe.method.uld_top_k or "all", k)
        return CachedCrossTokenizerTeacher(reader, views, split, recipe.method.uld_top_k)
    pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else teacher_tok.eos_token_id
    return CrossTokenizerTeacher(teacher, views, pad, len(teacher_tok), split, recipe.method.uld_top_k)


def cross_views(recipe: Recipe, cross: Crossing, data: TrainingSet) -> list[TeacherView]:
    """The teacher's view of each encoded training example: the same text as the student's template renders it,
    through the teacher's tokenizer, and the aligned groups."""
    student_tok, d = cross.student_tokenizer, recipe.data
    texts = [example_text(e, student_tok, d.max_length, d.system_prompt)
             for e in encoded_examples(recipe, cross, data.examples)]
    return teacher_views(student_tok, cross.teacher_tokenizer, texts, data.encoded)


def encoded_examples(recipe: Recipe, cross: Crossing, examples: list[Example]) -> list[Example]:
    """The training examples the student's tokenizer encodes (those at the indices of the encoded training set)."""
    tok, d = cross.student_tokenizer, recipe.data
    return [e for e in examples if encode_example(e, tok, d.max_length, d.system_prompt) is not None]


def cross_samples(
    recipe: Recipe, cross: Optional[Crossing], signal: Optional[TeacherSignal], examples: list[Example]
) -> Optional[CrossTokenizerSamples]:
    """On-policy across tokenizers: how the student's samples to the training `examples`' prompts become examples
    that the live teacher (`signal`) scores as it scores the data's; None for a same-tokenizer pair or another
    method."""
    if recipe.method.kind != "on_policy" or cross is None or not isinstance(signal, CrossTokenizerTeacher):
        return None
    d = recipe.data
    return CrossTokenizerSamples(encoded_examples(recipe, cross, examples), cross.student_tokenizer,
                                 cross.teacher_tokenizer, signal, d.max_length, d.system_prompt)


@dataclass(frozen=True)
class CrossCapture:
    """What `distill capture` caches across tokenizers: the teacher's own examples (its ids of each training text,
    labelled at the aligned tokens) and the student tokenizer they are aligned to."""

    examples: list[EncodedExample]
    aligned_to: str


def cross_capture(recipe: Recipe, teacher_tok: PreTrainedTokenizerBase) -> Optional[CrossCapture]:
    """The capture of a uld/align recipe whose student has a tokenizer of its own; None when the student reads the
    teacher's tokenizer (an ordinary cache); refused with one line where the crossing cannot apply."""
    student_tok = student_tokenizer(recipe, teacher_tok)
    cross = crossing(recipe, teacher_tok, student_tok) if student_tok is not None else None
    if cross is None:
        return None
    data = training_set(recipe, student_tok)
    views = cross_views(recipe, cross, data)
    return CrossCapture(teacher_examples(views), alignment_hash(student_tok))


def student_tokenizer(
    recipe: Recipe, teacher_tok: PreTrainedTokenizerBase
) -> Optional[PreTrainedTokenizerBase]:
    """The student's own tokenizer (student.model's, or student.tokenizer); None for a new student on the
    teacher's."""
    if recipe.student.model is not None:
        with named_by("student.model"):
            return load_tokenizer(*model_source(recipe, recipe.student))
    return own_tokenizer(recipe, teacher_tok)


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
