"""Tokenizer compatibility: logit KD compares distributions id by id, so both sides must mean the same ids."""
from __future__ import annotations

from typing import Optional

from transformers import PreTrainedTokenizerBase

from distill.errors import DistillError

SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")

# Digits, punctuation, accents, CJK, emoji and a ChatML turn: where tokenizers with equal vocabs still disagree
# (normalisers, pre-tokenisers, added-token handling).
PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 2024, 3.14159 * 42 = 131.95!\n"
    "Café, naïve, Zürich; \u4f60\u597d\u4e16\u754c \U0001f600 -- \"quotes\" & (brackets) [x] {y} <z> 1,000,000.\n"
    "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n7 + 5 = 12.<|im_end|>\n"
)


def check_tokenizers(
    teacher_tok: PreTrainedTokenizerBase,
    student_tok: PreTrainedTokenizerBase,
    teacher_vocab: int,
    student_vocab: int,
) -> int:
    """Refuse tokenizers that map ids differently; return the vocab size both output heads share."""
    _compare_vocabs(teacher_tok, student_tok)
    _compare_special_tokens(teacher_tok, student_tok)
    _compare_probe(teacher_tok, student_tok)
    size = len(teacher_tok)
    for who, rows in (("teacher", teacher_vocab), ("student", student_vocab)):
        if rows < size:
            raise DistillError(f"the {who}'s output head has {rows} rows but the tokenizer has {size} tokens")
    # Extra rows beyond the tokenizer are padding (e.g. 49152 vs 49216): the losses slice both heads to this.
    return min(teacher_vocab, student_vocab)


def tokenizer_difference(
    teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase
) -> Optional[str]:
    """The first way the tokenizers map ids differently, in words; None when they are the same."""
    try:
        _compare_vocabs(teacher_tok, student_tok)
        _compare_special_tokens(teacher_tok, student_tok)
        _compare_probe(teacher_tok, student_tok)
    except DistillError as err:
        return str(err)
    return None


def _compare_vocabs(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase) -> None:
    teacher = {i: t for t, i in teacher_tok.get_vocab().items()}
    student = {i: t for t, i in student_tok.get_vocab().items()}
    for i in sorted(teacher.keys() | student.keys()):
        if teacher.get(i) != student.get(i):
            raise DistillError(
                f"tokenizers differ at id {i}: teacher {_shown(teacher.get(i))} vs student {_shown(student.get(i))}"
            )


def _compare_special_tokens(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase) -> None:
    for name in SPECIAL_TOKENS:
        teacher, student = getattr(teacher_tok, name), getattr(student_tok, name)
        if teacher != student:
            raise DistillError(f"tokenizers differ in {name}: teacher {_shown(teacher)} vs student {_shown(student)}")


def _compare_probe(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase) -> None:
    teacher = teacher_tok(PROBE_TEXT)["input_ids"]
    student = student_tok(PROBE_TEXT)["input_ids"]
    for pos in range(max(len(teacher), len(student))):
        t = teacher[pos] if pos < len(teacher) else None
        s = student[pos] if pos < len(student) else None
        if t != s:
            raise DistillError(
                f"tokenizers split the probe text differently at token {pos}: "
                f"teacher {_shown_id(teacher_tok, t)} vs student {_shown_id(student_tok, s)}"
            )


def _shown(token: str | None) -> str:
    return "(none)" if token is None else repr(str(token))


def _shown_id(tokenizer: PreTrainedTokenizerBase, token_id: int | None) -> str:
    if token_id is None:
        return "(end of text)"
    return f"{_shown(tokenizer.convert_ids_to_tokens(token_id))} (id {token_id})"
