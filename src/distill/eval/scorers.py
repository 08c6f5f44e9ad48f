"""Task scorers: exact match (answers read by distill.answers), and multiple choice by log-likelihood of each choice."""
from __future__ import annotations

from decimal import Decimal
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.answers import normalize_number
from distill.data.tokenize import padding_id
from distill.data.layouts import Messages
from distill.teachers.local import prompt_ids

Prompt = Union[str, Messages]


# ---------------------------------------------------------------- answers


def _normalize_text(text: str) -> str:
    """Case, surrounding whitespace and punctuation, and runs of spaces do not count."""
    return " ".join(text.casefold().split()).strip(" .,;:!?\"'`*")


def exact_match(prediction: str | None, reference: str | None) -> bool:
    """Whether two answers are the same: as numbers when both are numbers, else as normalised text."""
    if prediction is None or reference is None:
        return False
    pred_number, ref_number = normalize_number(prediction), normalize_number(reference)
    if pred_number is not None and ref_number is not None:
        return Decimal(pred_number) == Decimal(ref_number)
    return _normalize_text(prediction) == _normalize_text(reference)


# ---------------------------------------------------------------- multiple choice


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str, add_special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"]) if text else []


def _text_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, choice: str) -> tuple[list[int], list[int]]:
    """Prompt ids and the choice's ids, split where the prompt ends in the tokenisation of both together."""
    # Trailing spaces belong to the choice: "is " + "Paris" tokenises like "is" + " Paris".
    stripped = prompt.rstrip(" ")
    choice = prompt[len(stripped):] + choice
    head = _tokens(tokenizer, stripped, True)
    whole = _tokens(tokenizer, stripped + choice, True)
    if whole[: len(head)] == head and len(whole) > len(head):
        return head, whole[len(head):]
    return head, _tokens(tokenizer, choice, False)  # the choice merged into the prompt's last token


def choice_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, choice: str
) -> tuple[list[int], list[int]]:
    """(prompt ids, choice ids): the choice as the model would continue this prompt."""
    if isinstance(prompt, str):
        return _text_pair(tokenizer, prompt, choice)
    # A conversation: the prompt ends with the generation prompt, as in generation. The plain format
    # (no chat template) puts " " + answer after "Assistant:", as training data is encoded.
    continuation = choice if tokenizer.chat_template else " " + choice
    return prompt_ids(tokenizer, prompt), _tokens(tokenizer, continuation, False)


@torch.inference_mode()
def continuation_logprobs(
    model: PreTrainedModel, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8
) -> list[float]:
    """Sum of log p(continuation tokens | prompt) for each (prompt ids, continuation ids), batched."""
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        width = max(len(p) + len(c) for p, c in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (p, c) in enumerate(chunk):
            input_ids[row, : len(p) + len(c)] = torch.tensor(p + c)
            attention[row, : len(p) + len(c)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
        for row, (p, c) in enumerate(chunk):
            # logits at position i predict token i + 1: the choice's tokens are predicted from len(p) - 1 on
            logp = F.log_softmax(logits[row, len(p) - 1: len(p) + len(c) - 1].float(), dim=-1)
            out.append(float(logp.gather(-1, torch.tensor(c, device=logp.device)[:, None]).double().sum()))
    return out


def batch_choice_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[tuple[Prompt, Sequence[str]]],
    *,
    batch_size: int = 8,
) -> list[list[float]]:
    """choice_logprobs for many (prompt, choices) questions, their choices batched together."""
    pairs = [choice_token_ids(tokenizer, prompt, c) for prompt, choices in questions for c in choices]
    for prompt_part, choice_part in pairs:
        if not prompt_part:
            raise ValueError("multiple choice: a prompt has no tokens to predict its choices from")
        if not choice_part:
            raise ValueError("multiple choice: a choice has no tokens")
    flat = continuation_logprobs(model, pairs, padding_id(tokenizer), batch_size)
    out, start = [], 0
    for _, choices in questions:
        out.append(flat[start:start + len(choices)])
        start += len(choices)
    return out


def per_character(scores: Sequence[float], choices: Sequence[str]) -> list[float]:
    """Log-probabilities divided by each choice's length in characters (lm-evaluation-harness's acc_norm)."""
    return [s / max(1, len(choice)) for s, choice in zip(scores, choices)]


def choice_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    choices: Sequence[str],
    *,
    length_normalized: bool = False,
    batch_size: int = 8,
) -> list[float]:
    """Summed log-probability of each choice's tokens given the prompt (text or conversation), batched.

    With length_normalized, each sum is divided by the choice's length in characters, so long choices are
    not penalised for having more tokens (character counts compare across tokenisers; token counts do not).
    """
    scores = batch_choice_logprobs(model, tokenizer, [(prompt, choices)], batch_size=batch_size)[0]
    return per_character(scores, choices) if length_normalized else scores


def mc_accuracy(scores: Sequence[Sequence[float]], answers: Sequence[int]) -> float | None:
    """Fraction of items whose highest-scoring choice (the first, on a tie) is the answer; None for no items."""
    if len(scores) != len(answers):
        raise ValueError(f"mc_accuracy: {len(scores)} score rows but {len(answers)} answers")
    if not answers:
        return None
    return sum(best_choice(row) == answer for row, answer in zip(scores, answers)) / len(answers)


def best_choice(scores: Sequence[float]) -> int:
    """Index of the highest score; the first one on a tie."""
    return max(range(len(scores)), key=scores.__getitem__)
