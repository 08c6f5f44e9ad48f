"""Batched generation with an in-process transformers model (teacher answers, eval answers)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.data.tokenize import cut_messages, padding_id
from distill.teachers.backend import Completion, Failure, Messages, Result, SamplingParams, TokenScores


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[int]:
    """Token ids of a conversation up to the start of the assistant's answer."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    # No chat template: a plain instruction format, so base models still produce an answer.
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    return tokenizer(text)["input_ids"]


def count_prompt_tokens(tokenizer: PreTrainedTokenizerBase, messages: Messages, at_most: int | None = None) -> int:
    """len(prompt_ids(...)), or at_most + 1 when it is longer than at_most: the conversation is cut by characters
    first (distill.data.tokenize.cut_messages), so a 20 MB prompt costs no more to count than a long one."""
    if at_most is None:
        return len(prompt_ids(tokenizer, messages))
    return min(len(prompt_ids(tokenizer, cut_messages(messages, at_most + 1))), at_most + 1)


# Where configs keep their context length, by model family (Llama/Qwen/Mistral, GPT-2, Falcon/MPT, ChatGLM).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len", "seq_length")


def model_context(model: PreTrainedModel) -> int | None:
    """The number of positions the model reads, from its config; None when the config does not say."""
    config = getattr(model, "config", None)
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The token ids that end an answer: the tokenizer's end-of-sequence and the model's generation_config eos."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    return input_ids, attention


def _cut_at_stop_string(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def _top_logprobs(
    logits: tuple[torch.Tensor, ...], row: int, length: int, k: int
) -> tuple[list[list[tuple[int, float]]], list[float]]:
    """The model's own top-k log-probs (before any sampling warper) at each of a row's generated tokens, and the
    log of the mass outside them (summed directly, so it stays exact when tiny)."""
    if length == 0:
        return [], []
    log_probs = torch.log_softmax(torch.stack([step[row].float() for step in logits[:length]]), dim=-1)
    values, ids = log_probs.topk(k, dim=-1)
    tails = log_probs.scatter(1, ids, float("-inf")).logsumexp(dim=-1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())], tails.tolist()


@torch.inference_mode()
def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Messages],
    *,
    params: SamplingParams | None = None,
    max_new_tokens: int | None = None,
) -> list[Completion]:
    """Answer a batch of conversations at once (left-padded, KV cache); temperature 0 is greedy."""
    params = params or SamplingParams()
    if max_new_tokens is not None:
        params = replace(params, max_new_tokens=max_new_tokens)
    model.eval()
    device = next(model.parameters()).device
    pad_id = padding_id(tokenizer)
    prompts = [prompt_ids(tokenizer, m) for m in conversations]
    input_ids, attention = _left_padded(prompts, pad_id)
    stop = stop_ids(model, tokenizer)
    options: dict = {"do_sample": False}
    if params.temperature > 0:
        torch.manual_seed(params.seed)
        options = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
    if params.stop:
        options.update(stop_strings=list(params.stop), tokenizer=tokenizer)
    if params.top_logprobs:
        options.update(output_logits=True, return_dict_in_generate=True)
    # With log-probs wanted, one step more: an answer cut at max_new_tokens then also gets the teacher's
    # distribution after its last token (a training example appends an end-of-turn token there).
    limit = params.max_new_tokens
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention.to(device),
        max_new_tokens=limit + bool(params.top_logprobs), pad_token_id=pad_id, eos_token_id=sorted(stop), top_k=None,
        **options,
    )
    sequences = out.sequences if params.top_logprobs else out
    results = []
    for row, generated in enumerate(sequences[:, input_ids.shape[1]:input_ids.shape[1] + limit].tolist()):
        end = next((i for i, t in enumerate(generated) if t in stop), None)
        tokens = generated if end is None else generated[:end]
        text, stopped = _cut_at_stop_string(tokenizer.decode(tokens, skip_special_tokens=True), params.stop)
        new_tokens = len(tokens) + (0 if end is None else 1)
        cut = end is None and not stopped and new_tokens == limit and len(out.logits) > limit if params.top_logprobs \
            else False
        tops, tails = _top_logprobs(out.logits, row, new_tokens + cut, params.top_logprobs) if params.top_logprobs \
            else (None, None)
        results.append(Completion(
            text=text.strip(),
            finish_reason="stop" if end is not None or stopped else "length",
            prompt_tokens=len(prompts[row]),
            new_tokens=new_tokens,
            token_ids=generated[:new_tokens],
            top_logprobs=tops,
            tail_logprobs=tails,
            prompt_ids=prompts[row],
            vocab_size=out.logits[0].size(-1) if params.top_logprobs else None,
        ))
    return results


@torch.inference_mode()
def score_token_ids(model: PreTrainedModel, rows: list[list[int]], k: int, pad_id: int = 0) -> list[TokenScores]:
    """Each row's per-token log-probs and top-k under the model (one right-padded forward; nothing generated)."""
    model.eval()
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    log_probs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    out = []
    for row, tokens in enumerate(rows):
        scores = log_probs[row, :len(tokens) - 1]  # position i predicts token i + 1
        picked = scores.gather(1, torch.tensor(tokens[1:], device=device)[:, None]).squeeze(1).tolist()
        values, top_ids = scores.topk(min(k, scores.size(-1)), dim=-1) if k else (scores[:, :0], scores[:, :0])
        tops = [list(zip(i, v)) for i, v in zip(top_ids.long().tolist(), values.tolist())]
        out.append(TokenScores(list(tokens), [None, *picked], [None, *tops]))
    return out


@dataclass
class LocalBackend:
    """An in-process transformers model: batched, left-padded, KV cache."""

    model: object
    tokenizer: object
    name: str
    batch_size: int = 8

    @property
    def context_length(self) -> int | None:
        """How many positions the model reads (prompt and answer together), when its config says."""
        return model_context(self.model)

    def prompt_tokens(self, conversation: Messages, at_most: int | None = None) -> int:
        """Tokens of the conversation's prompt, counted up to at_most + 1 (a huge prompt is never tokenised whole)."""
        return count_prompt_tokens(self.tokenizer, conversation, at_most)

    def score(self, rows: list[list[int]], k: int) -> list[TokenScores]:
        """Each token sequence's per-token log-probs and top-k, batch_size rows per forward."""
        pad = padding_id(self.tokenizer)
        return [s for first in range(0, len(rows), self.batch_size)
                for s in score_token_ids(self.model, rows[first:first + self.batch_size], k, pad)]

    def generate(self, conversations: list[Messages], params: SamplingParams) -> list[Result]:
        """Answer conversations in batches of batch_size; an out-of-memory batch fails its rows, not the run."""
        results: list[Result] = []
        for first in range(0, len(conversations), self.batch_size):
            batch = conversations[first:first + self.batch_size]
            try:
                results.extend(generate_texts(self.model, self.tokenizer, batch, params=params))
            except RuntimeError as err:  # e.g. CUDA OOM on a long batch: count it, retry next run
                results.extend(Failure(error=f"{type(err).__name__}: {str(err).splitlines()[0]}") for _ in batch)
        return results
