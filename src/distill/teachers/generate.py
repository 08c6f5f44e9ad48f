"""The teacher-data stage: every (prompt, sample) answered once into append-only JSONL shards, resumably.

Each record's id is a content address: a hash of the conversation, the teacher and the generation parameters
(and the sample number), so changing any of them makes new records instead of mixing old and new answers.
A failed request is written as a `status: failed` record, counted, and retried by the next run; a kill leaves at
most a partial last line, which the next run cuts off.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from distill.data.layouts import Messages, Prompt
from distill.data.teacher_records import (
    GeneratedTopK,
    ShardWriter,
    latest_records,
    tail_from_top,
    topk_path,
    write_topk,
)
from distill.errors import DistillError
from distill.runtime import barrier, gather_from_ranks
from distill.teachers.backend import Completion, Failure, Result, SamplingParams, TeacherBackend

log = logging.getLogger("distill")


@dataclass
class Reasoning:
    """Chain-of-thought mode: `keep` trains on the reasoning too, `strip` on the final answer only."""

    mode: str = "off"  # off | keep | strip
    prompt: str = ""
    marker: str = "Answer:"


@dataclass
class GenerationStats:
    """What one run of the stage did."""

    teacher: str = ""  # the backend's name
    done: int = 0  # records answered in this run
    failed: int = 0  # requests that failed in this run (retried by the next)
    skipped_existing: int = 0  # (prompt, sample) pairs already answered
    retried: int = 0  # of this run's requests, how many had failed in an earlier run
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    empty: int = 0  # answers with no text (kept in the file; load_teacher_data skips them)
    errors: dict[str, int] = field(default_factory=dict)  # failure message -> count
    topk: int = 0  # answers whose top-k log-probs were kept (generate.capture_topk)
    too_long: int = 0  # prompts not sent: longer than the prompt limit (generate.max_prompt_tokens)


# ---------------------------------------------------------------- top-k log-probs kept at generation


def save_topk(path: Path, completion: Completion, k: int) -> bool:
    """Write one answer's top-k rows atomically; False (nothing written) when the backend gave too little."""
    tops, ids = completion.top_logprobs, completion.token_ids
    if not tops or ids is None or len(tops) not in (len(ids), len(ids) + 1) or any(len(top) < k for top in tops):
        return False
    top_values = np.array([[v for _, v in top[:k]] for top in tops], dtype=np.float32)
    tail = (np.asarray(completion.tail_logprobs, dtype=np.float32) if completion.tail_logprobs is not None
            else tail_from_top(top_values).astype(np.float32))
    write_topk(path, GeneratedTopK(
        prompt_ids=np.asarray(completion.prompt_ids or [], dtype=np.int32), prompt_tokens=completion.prompt_tokens,
        token_ids=np.asarray(ids, dtype=np.int32), ids=np.array([[i for i, _ in top[:k]] for top in tops],
                                                                 dtype=np.int32),
        log_probs=top_values, tail=tail, vocab_size=completion.vocab_size or 0))
    return True


# ---------------------------------------------------------------- requests and records


@dataclass
class Request:
    """One (prompt, sample) to answer."""

    prompt: Prompt
    sample: int
    conversation: Messages
    id: str


def record_id(conversation: Messages, teacher: str, params: SamplingParams, sample: int) -> str:
    """The content address of one answer: what was asked, of whom, how, and which sample."""
    key = {"messages": conversation, "teacher": teacher, "params": params.identity(), "sample": sample}
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:20]


def conversation_for(prompt: Prompt, system_prompt: str | None, reasoning: Reasoning) -> Messages:
    """What the teacher is asked: the prompt, with the system prompt and any reasoning instruction added."""
    messages = [dict(m) for m in prompt.messages]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    if reasoning.mode != "off":
        messages[-1]["content"] = f"{messages[-1]['content']}\n\n{reasoning.prompt}"
    return messages


def split_reasoning(text: str, marker: str) -> tuple[str | None, str | None]:
    """(reasoning, final answer) of a chain-of-thought answer; (None, None) when the marker is missing."""
    matches = list(re.finditer(re.escape(marker), text, flags=re.IGNORECASE))
    if not matches:
        return None, None
    last = matches[-1]
    return text[:last.start()].strip(), text[last.end():].strip()


def _record(request: Request, result: Result, teacher: str, reasoning: Reasoning) -> dict:
    prompt = request.prompt
    base = {
        "id": request.id, "prompt_id": prompt.id, "sample": request.sample, "teacher": teacher,
        "prompt": prompt.user_text, "tags": prompt.tags, "reference": prompt.reference,
    }
    if isinstance(result, Failure):
        return {**base, "status": "failed", "error": result.error, "attempts": result.attempts}
    response, thinking = result.text, None
    if reasoning.mode != "off":
        thinking, answer = split_reasoning(result.text, reasoning.marker)
        if reasoning.mode == "strip" and answer is not None:
            response = answer
    # The training conversation is the original prompt (no reasoning instruction) plus the kept answer.
    training = conversation_for(prompt, _system_of(request.conversation, prompt), Reasoning())
    return {
        **base, "status": "ok",
        "messages": training + [{"role": "assistant", "content": response}],
        "response": response, "reasoning": thinking, "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens, "new_tokens": result.new_tokens,
    }


def _system_of(conversation: Messages, prompt: Prompt) -> str | None:
    added = conversation[0]["role"] == "system" and prompt.messages[0]["role"] != "system"
    return conversation[0]["content"] if added else None


# ---------------------------------------------------------------- the stage


def plan_requests(
    prompts: list[Prompt], teacher: str, params: SamplingParams, samples: int,
    system_prompt: str | None = None, reasoning: Reasoning | None = None,
) -> list[Request]:
    """Every (prompt, sample) pair with its content address."""
    reasoning = reasoning or Reasoning()
    if len({p.id for p in prompts}) != len(prompts):
        raise DistillError("prompts have repeated ids; every prompt needs its own id")
    requests = []
    for prompt in prompts:
        conversation = conversation_for(prompt, system_prompt, reasoning)
        for sample in range(samples):
            requests.append(Request(prompt, sample, conversation, record_id(conversation, teacher, params, sample)))
    return requests


def _sample_params(params: SamplingParams, sample: int) -> SamplingParams:
    """Each sample number draws with its own seed, so the samples of one prompt differ from each other."""
    return params if params.temperature == 0 else replace(params, seed=params.seed + sample)


def generate_responses(
    backend: TeacherBackend,
    prompts: list[Prompt],
    data_dir: Path,
    *,
    params: SamplingParams | None = None,
    samples: int = 1,
    system_prompt: str | None = None,
    reasoning: Reasoning | None = None,
    shard_records: int = 5000,
    progress: bool = True,
    on_long_prompt: str = "skip",
    ranks: tuple[int, int] = (0, 1),
) -> GenerationStats:
    """Answer the (prompt, sample) pairs not yet answered in data_dir; killing and re-running loses nothing.

    Prompts longer than the prompt limit (params.max_prompt_tokens, else the teacher's context less
    max_new_tokens) are skipped and counted, or refused with one error when on_long_prompt is "stop".
    With ranks = (rank, world) of several processes, each answers every world-th batch of the one-process plan
    (the same batches, so the same answers) into its own shards; all return the stats of all of them.
    """
    params, reasoning = params or SamplingParams(), reasoning or Reasoning()
    rank, world = ranks
    requests = plan_requests(prompts, backend.name, params, samples, system_prompt, reasoning)
    existing = latest_records(data_dir)
    todo = [r for r in requests if existing.get(r.id, {}).get("status") != "ok"]
    stats = GenerationStats(teacher=backend.name, skipped_existing=len(requests) - len(todo))
    # Counting prompt tokens needs the teacher (its tokenizer): only when something is left to answer. Every rank
    # counts every prompt, so a prompt refused as too long stops all of them with the same error.
    fitting, lengths = _within_prompt_limit(backend, todo, params, on_long_prompt, stats) if todo else (todo, {})
    batches = list(_chunks(fitting, backend.batch_size, lengths))[rank::world] if fitting else []
    stats.retried = sum(r.id in existing for _, chunk in batches for r in chunk)
    writer = ShardWriter(data_dir, shard_records, rank if world > 1 else None)
    if world > 1:  # no rank appends a line before every rank has read the shards (reading cuts a partial line)
        barrier()
    bar = tqdm(total=stats.skipped_existing + sum(len(chunk) for _, chunk in batches),
               initial=stats.skipped_existing, desc=f"teacher answers ({backend.name})", unit="answer",
               disable=not progress or rank != 0)
    start = time.perf_counter()
    for sample, chunk in batches:
        results = backend.generate([r.conversation for r in chunk], _sample_params(params, sample))
        if len(results) != len(chunk):
            raise DistillError(f"teacher {backend.name}: {len(results)} results for {len(chunk)} requests")
        records = [_record(r, res, backend.name, reasoning) for r, res in zip(chunk, results)]
        if params.top_logprobs:  # the rows go to disk before their record, so a record never points at nothing
            for request, result, record in zip(chunk, results, records):
                if isinstance(result, Completion) and save_topk(topk_path(data_dir, request.id), result,
                                                                params.top_logprobs):
                    record["topk"] = params.top_logprobs
                    stats.topk += 1
        writer.append(records)
        _count(stats, results)
        stats.seconds = time.perf_counter() - start
        bar.update(len(chunk))
        bar.set_postfix(failed=stats.failed, too_long=stats.too_long, tokens=stats.new_tokens,
                        tok_per_s=f"{stats.new_tokens / max(stats.seconds, 1e-9):.1f}")
    bar.close()
    stats.seconds = time.perf_counter() - start
    return merge_rank_stats(gather_from_ranks(stats)) if world > 1 else stats


def merge_rank_stats(parts: list[GenerationStats]) -> GenerationStats:
    """The stats of one generation split over several processes: counts add up, the time is the slowest's."""
    merged = replace(parts[0], errors={})  # what every rank decided alike: skipped_existing, too_long
    for name in ("done", "failed", "retried", "prompt_tokens", "new_tokens", "empty", "topk"):
        setattr(merged, name, sum(getattr(part, name) for part in parts))
    merged.seconds = max(part.seconds for part in parts)
    for part in parts:
        for error, count in part.errors.items():
            merged.errors[error] = merged.errors.get(error, 0) + count
    return merged


def raise_if_all_failed(stats: GenerationStats) -> None:
    """Refuse a run that answered nothing: every request failed and no answer was on disk before."""
    if stats.failed and not stats.done and not stats.skipped_existing:
        first = (next(iter(stats.errors), "").strip().splitlines() or ["no message"])[0]  # errors keeps arrival order
        raise DistillError(f"generate: all {stats.failed} requests to teacher {stats.teacher} failed, nothing was "
                           f"answered; first error: {first}")


def prompt_limit(params: SamplingParams, context: int | None) -> tuple[int | None, str]:
    """(the longest prompt to send, where that number comes from): generate.max_prompt_tokens, else the teacher's
    context less max_new_tokens (so prompt and answer fit), else no limit (a served teacher's context is unknown)."""
    if params.max_prompt_tokens is not None:
        return params.max_prompt_tokens, f"generate.max_prompt_tokens={params.max_prompt_tokens}"
    if context is None:
        return None, "no limit"
    if context <= params.max_new_tokens:
        raise DistillError(f"generate.max_new_tokens={params.max_new_tokens} leaves no room for a prompt in the "
                           f"teacher's context of {context} tokens")
    return context - params.max_new_tokens, (f"the teacher's context of {context} tokens less "
                                             f"generate.max_new_tokens={params.max_new_tokens}")


def _token_counter(backend: TeacherBackend) -> Callable[[Messages, int | None], int] | None:
    """How to count a conversation's prompt tokens as the teacher reads them, when the backend can tell."""
    counter = getattr(backend, "prompt_tokens", None)  # a local teacher
    if callable(counter):
        return counter
    tokenizer = getattr(backend, "tokenizer", None)  # a served teacher that was given the teacher's tokenizer
    if tokenizer is None:
        return None
    from distill.teachers.local import count_prompt_tokens  # torch and transformers: only when there is a tokenizer

    return lambda conversation, at_most: count_prompt_tokens(tokenizer, conversation, at_most)


def _within_prompt_limit(
    backend: TeacherBackend, todo: list[Request], params: SamplingParams, on_long_prompt: str, stats: GenerationStats
) -> tuple[list[Request], dict[str, int]]:
    """The requests whose prompt fits the prompt limit, and each one's prompt tokens (to batch by length)."""
    limit, why = prompt_limit(params, getattr(backend, "context_length", None))
    count = _token_counter(backend) if limit is not None else None
    if count is None:
        if limit is not None:
            log.warning("generate.max_prompt_tokens: no tokenizer to count %s's prompt tokens with; prompts are "
                        "sent unchecked", backend.name)
        return todo, {}
    by_prompt: dict[str, int] = {}  # the samples of one prompt share its conversation
    for request in todo:
        if request.prompt.id not in by_prompt:
            by_prompt[request.prompt.id] = count(request.conversation, limit)
    too_long = [prompt_id for prompt_id, tokens in by_prompt.items() if tokens > limit]
    if too_long and on_long_prompt == "stop":
        more = f" (and {len(too_long) - 1} more)" if len(too_long) > 1 else ""
        raise DistillError(f"prompt {too_long[0]!r}: longer than {limit} tokens ({why}){more}; shorten it, raise "
                           "generate.max_prompt_tokens, or set data.on_error: skip to skip such prompts")
    if too_long:
        stats.too_long = len(too_long)
        log.warning("generate (%s): skipped %d prompt(s) longer than %d tokens (%s), e.g. %r",
                    backend.name, len(too_long), limit, why, too_long[0])
    skipped = set(too_long)
    fitting = [r for r in todo if r.prompt.id not in skipped]
    return fitting, {r.id: by_prompt[r.prompt.id] for r in fitting}


def _chunks(todo: list[Request], size: int, lengths: dict[str, int]) -> Iterator[tuple[int, list[Request]]]:
    """Batches of one sample number each; longest prompts first (in tokens when counted, then in characters) so
    similar lengths share a batch and one long prompt does not pad many short ones."""
    by_sample: dict[int, list[Request]] = {}
    for request in todo:
        by_sample.setdefault(request.sample, []).append(request)
    for sample in sorted(by_sample):
        group = sorted(by_sample[sample],
                       key=lambda r: (-lengths.get(r.id, 0), -len(json.dumps(r.conversation)), r.id))
        for first in range(0, len(group), size):
            yield sample, group[first:first + size]


def _count(stats: GenerationStats, results: list[Result]) -> None:
    for result in results:
        if isinstance(result, Completion):
            stats.done += 1
            stats.prompt_tokens += result.prompt_tokens
            stats.new_tokens += result.new_tokens
            stats.empty += not result.text
        else:
            stats.failed += 1
            stats.errors[result.error] = stats.errors.get(result.error, 0) + 1
