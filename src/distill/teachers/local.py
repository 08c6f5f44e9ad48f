"""Batched generation with an in-process transformers model (teacher answers, eval answers)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.data.tokenize import padding_id

Messages = list[dict[str, str]]


@dataclass
class Generation:
    """One generated answer."""

    text: str
    finish_reason: str  # "stop" (hit EOS) or "length" (hit max_new_tokens)
    new_tokens: int


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[int]:
    """Token ids of a conversation up to the start of the assistant's answer."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    # No chat template: a plain instruction format, so base models still produce an answer.
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    return tokenizer(text)["input_ids"]


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = {tokenizer.eos_token_id}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


@torch.inference_mode()
def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Messages],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[Generation]:
    """Answer a batch of conversations at once (left-padded, KV cache); temperature 0 is greedy."""
    model.eval()
    device = next(model.parameters()).device
    pad_id = padding_id(tokenizer)
    prompts = [prompt_ids(tokenizer, m) for m in conversations]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    stop = _stop_ids(model, tokenizer)
    sampling = {"do_sample": False}
    if temperature > 0:
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=sorted(stop),
        top_k=None,
        **sampling,
    )
    results = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stop), None)
        tokens = row if end is None else row[:end]
        results.append(
            Generation(
                text=tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                finish_reason="length" if end is None else "stop",
                new_tokens=len(tokens) + (0 if end is None else 1),
            )
        )
    return results
