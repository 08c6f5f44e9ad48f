"""Tokenising examples with loss only on the assistant's tokens, padding batches, and the stateless batch order.

Labels here are aligned with input_ids (labels[i] is input_ids[i] where trained, -100 elsewhere); the trainer
shifts them for next-token prediction.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from distill.data.layouts import Example, Messages
from distill.errors import DistillError

log = logging.getLogger(__name__)

IGNORE = -100
# Text is cut at max_length * this many characters before it is tokenised: no tokenizer's tokens average this
# long, so the first max_length tokens are unchanged, while a 20 MB line costs no more than a normal one.
MAX_CHARS_PER_TOKEN = 64


@dataclass
class EncodedExample:
    """Token ids and aligned labels (-100 where no loss)."""

    input_ids: list[int]
    labels: list[int]
    id: str = ""  # the example's id (a teacher answer's record id), when it came from an Example


# ---------------------------------------------------------------- rendering

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)



def _render(tokenizer: PreTrainedTokenizerBase, messages: Messages, generation_prompt: bool) -> str:
    """The conversation as text: the chat template, or the plain format of distill.teachers.local.prompt_ids."""
    if tokenizer.chat_template:
        if not messages:
            return ""  # apply_chat_template refuses an empty conversation
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja raises its own types (e.g. "roles must alternate")
            raise DistillError(f"the tokenizer's chat template rejected a conversation: {err}") from None
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return text + ("Assistant:" if generation_prompt else "")


def _assistant_char_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Messages
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant answer in it.

    A span starts where the generation prompt ends. With a template it runs to the end of that turn as the
    template renders it (end-of-turn marker included); in the plain format it is " " + the answer.
    Turns whose incremental rendering is not a prefix of the whole (templates that rewrite history) are skipped.
    """
    full = _render(tokenizer, messages, generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:k], generation_prompt=True)
        if tokenizer.chat_template:
            upto = _render(tokenizer, messages[: k + 1], generation_prompt=False)
        else:
            upto = head + " " + message["content"]
        in_order = not spans or spans[-1][1] <= len(head)
        if full.startswith(head) and full.startswith(upto) and len(head) < len(upto) and in_order:
            spans.append((len(head), len(upto)))
    if len(spans) < sum(m["role"] == "assistant" for m in messages):
        _warn_once("the chat template re-renders earlier turns differently; those assistant turns are not trained")
    return full, spans


# ---------------------------------------------------------------- characters -> tokens


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str, add_special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"]) if text else []


def _tokenize_at_cuts(
    tokenizer: PreTrainedTokenizerBase, text: str, cuts: list[int], add_special: bool
) -> tuple[list[int], list[int]]:
    """Token ids of text and the token index of each character cut.

    Tokenising the whole text is preferred (the ids the model sees at inference); if a cut falls inside a
    token merge, each piece is tokenised on its own instead, so cuts always land on token boundaries.
    """
    ids = _tokens(tokenizer, text, add_special)
    token_cuts = []
    for cut in cuts:
        head = _tokens(tokenizer, text[:cut], add_special)
        if ids[: len(head)] != head:
            return _tokenize_pieces(tokenizer, text, cuts, add_special)
        token_cuts.append(len(head))
    return ids, token_cuts


def _tokenize_pieces(
    tokenizer: PreTrainedTokenizerBase, text: str, cuts: list[int], add_special: bool
) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    token_cuts = []
    start = 0
    for cut in [*cuts, len(text)]:
        ids += _tokens(tokenizer, text[start:cut], add_special and start == 0)
        token_cuts.append(len(ids))
        start = cut
    return ids, token_cuts[:-1]


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if getattr(token, "special", False))
    return ids


def _turn_end(ids: list[int], start: int, end: int, specials: set[int]) -> int:
    """End (exclusive) of the trained part of an assistant turn: up to and including its end-of-turn token.

    The end-of-turn token is the first special token after some answer text; what the template adds after it
    (a newline before the next turn) is not trained. With no such token the whole turn is trained.
    """
    seen_text = False
    for i in range(start, end):
        if ids[i] in specials and seen_text:
            return i + 1
        seen_text = seen_text or ids[i] not in specials
    return end


# ---------------------------------------------------------------- examples


def _encode_chat(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> tuple[list[int], list[int]]:
    full, spans = _assistant_char_spans(tokenizer, messages)
    templated = bool(tokenizer.chat_template)
    # The template writes bos itself; the plain format relies on the tokenizer adding it, as prompt_ids does.
    ids, cuts = _tokenize_at_cuts(tokenizer, full, [c for span in spans for c in span], add_special=not templated)
    specials = _special_ids(tokenizer)
    eos = tokenizer.eos_token_id
    out_ids: list[int] = []
    labels: list[int] = []
    done = 0
    for start, end in zip(cuts[0::2], cuts[1::2]):
        stop = _turn_end(ids, start, end, specials) if templated else end
        out_ids += ids[done:start] + ids[start:stop]
        labels += [IGNORE] * (start - done) + ids[start:stop]
        if not templated and eos is not None:
            # The plain format has no end-of-turn marker: eos after each answer teaches the student to stop.
            out_ids.append(eos)
            labels.append(eos)
        done = stop
    out_ids += ids[done:]
    labels += [IGNORE] * (len(ids) - done)
    return out_ids, labels


def _encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[int]]:
    ids = _tokens(tokenizer, text, add_special=True)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids, list(ids)


def cut_text(text: str, max_length: int) -> str:
    """The start of text that holds its first max_length tokens (and more), so that no more is ever tokenised."""
    return text[:max_length * MAX_CHARS_PER_TOKEN]


def cut_messages(messages: Messages, max_length: int) -> Messages:
    """The conversation's start that holds its first max_length tokens: contents cut, in order, at a shared
    character budget, and the turns after it dropped (their tokens would be cut off anyway)."""
    budget, kept = max_length * MAX_CHARS_PER_TOKEN, []
    for message in messages:
        if budget <= 0:
            break
        content = message.get("content")
        if isinstance(content, str) and len(content) > budget:
            message = {**message, "content": content[:budget]}
        budget -= len(content) if isinstance(content, str) else 0
        kept.append(message)
    return kept


def encode_example(
    example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int, system_prompt: str | None = None
) -> EncodedExample | None:
    """Token ids and aligned labels for one example, truncated to max_length (the start is kept).

    Chat examples train only the assistant turns (each with its end-of-turn token); plain text trains every
    token. Text is cut by characters first, so an enormous line is never tokenised whole. Returns None when no
    token is left to predict (the caller drops the example).
    """
    if example.messages is not None:
        messages = example.messages
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        ids, labels = _encode_chat(tokenizer, cut_messages(messages, max_length))
    else:
        ids, labels = _encode_text(tokenizer, cut_text(example.text or "", max_length))
    ids, labels = ids[:max_length], labels[:max_length]
    # Position 0 is never predicted (nothing comes before it), so it does not count as a trained token.
    if all(label == IGNORE for label in labels[1:]):
        return None
    return EncodedExample(input_ids=ids, labels=labels, id=example.id)


def without_turn_end(encoded: EncodedExample, tokenizer: PreTrainedTokenizerBase) -> EncodedExample:
    """The example with its last trained token untrained when that is a special token (the end-of-turn marker of
    an answer that was cut off, not ended: an on-policy sample stopped at the length limit)."""
    trained = [i for i, label in enumerate(encoded.labels) if label != IGNORE]
    if not trained or encoded.input_ids[trained[-1]] not in _special_ids(tokenizer):
        return encoded
    labels = list(encoded.labels)
    labels[trained[-1]] = IGNORE
    return EncodedExample(list(encoded.input_ids), labels, encoded.id)


def example_text(
    example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int, system_prompt: str | None = None
) -> str:
    """The text `encode_example` tokenizes (the rendered conversation, or the plain text), as one string:
    another tokenizer can read the same characters (cross-tokenizer distillation)."""
    if example.messages is None:
        return cut_text(example.text or "", max_length)
    messages = example.messages
    if system_prompt and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return _render(tokenizer, cut_messages(messages, max_length), generation_prompt=False)


def example_token_ids(
    example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int, system_prompt: str | None = None
) -> list[int]:
    """All token ids of an example as the model reads them (a prompt alone ends with the generation prompt)."""
    encoded = encode_example(example, tokenizer, max_length, system_prompt)
    if encoded is not None:
        return encoded.input_ids
    if example.messages is None:
        return _tokens(tokenizer, cut_text(example.text or "", max_length), True)[:max_length]
    messages = example.messages
    if system_prompt and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    messages = cut_messages(messages, max_length)
    ends_with_user = bool(messages) and messages[-1]["role"] == "user"
    return _tokens(tokenizer, _render(tokenizer, messages, ends_with_user), False)[:max_length]


def encode_all(
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    system_prompt: str | None = None,
    source: str = "the data",
) -> list[EncodedExample]:
    """Encode every example, dropping (with a warning) those with nothing left to train on."""
    encoded = [encode_example(e, tokenizer, max_length, system_prompt) for e in examples]
    kept = [e for e in encoded if e is not None]
    if not kept:
        raise DistillError(f"no usable examples in {source} (none has an answer token within max_length={max_length})")
    if len(kept) < len(encoded):
        log.warning("%s: dropped %d example(s) with no answer token within max_length=%d",
                    source, len(encoded) - len(kept), max_length)
    return kept


# ---------------------------------------------------------------- batches


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(batch: list[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids (pad_id), attention_mask (0) and labels (-100) on padding."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed % 2**63, epoch]).permutation(num_examples)


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of micro-batch `step`: a pure function of its arguments, so a resumed run sees the same batches.

    Epoch e is a permutation seeded by (seed, e); each epoch has ceil(n / batch_size) batches and its last batch
    wraps to the start of the same permutation, so every batch is full and every example is seen each epoch.
    """
    if num_examples <= 0 or batch_size <= 0:
        raise ValueError("batch_indices needs at least one example and a positive batch size")
    per_epoch = -(-num_examples // batch_size)
    epoch, batch = divmod(step, per_epoch)
    order = _epoch_order(num_examples, seed, epoch)
    start = batch * batch_size
    return [int(order[(start + j) % num_examples]) for j in range(batch_size)]
