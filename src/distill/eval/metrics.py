"""Evaluation metrics on plain HF models, tokenizers and tensors: quality, agreement, speed, memory, size."""
from __future__ import annotations

import math
import os
import re
import resource
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.data.filters import duplicate_ngram_ratio, word_ngrams
from distill.errors import DistillError
from distill.models import bytes_on_disk, count_params

Batch = dict[str, torch.Tensor]
T = TypeVar("T")

IGNORE_INDEX = -100
CHUNK_POSITIONS = 1024  # rows of [N, V] logits converted to fp32 at once, to bound memory on large vocabularies
SPEED_TEXT = (
    "Once upon a time, in a small village by the sea, there lived a curious girl who loved to ask "
    "questions about the stars, the tides and the birds that flew over the water every morning."
)


# ---------------------------------------------------------------- ROUGE-L


def _rouge_tokens(text: str) -> list[str]:
    """Lowercase, non-alphanumerics to spaces, split: rouge-score's default tokeniser without stemming."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row kept)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of candidate against reference; two empty texts score 1.0, one empty text 0.0."""
    cand, ref = _rouge_tokens(candidate), _rouge_tokens(reference)
    if not cand and not ref:
        return 1.0  # identical (empty) outputs agree fully; rouge-score would say 0.0
    lcs = _lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- logits on labelled positions


# ---------------------------------------------------------------- repetition (exposure bias shows up as loops)

LOOP_NGRAM = 3  # the repetition filter's defaults: a text loops when over 30% of its word 3-grams are repeats
LOOP_RATIO = 0.3


def repetition(texts: list[str]) -> dict[str, float | None]:
    """loop_share: the share of texts that loop (the repetition filter's rule); distinct_2: distinct word bigrams
    over all bigrams of all texts (1 = never repeats itself). None for no texts (or no bigrams)."""
    if not texts:
        return {"loop_share": None, "distinct_2": None}
    loops = sum(duplicate_ngram_ratio(t, LOOP_NGRAM) > LOOP_RATIO for t in texts)
    bigrams = [g for t in texts for g in word_ngrams(t, 2)]
    distinct = len(set(bigrams)) / len(bigrams) if bigrams else None
    return {"loop_share": loops / len(texts), "distinct_2": distinct}


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def scored_logits(model: PreTrainedModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, V] (model dtype) and targets [N] at the positions whose next-token label is not -100."""
    device = _device_of(model)
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    # labels are aligned with input_ids: the logits at position i predict the token at i + 1
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return logits[:, :-1][keep], targets[keep]


@torch.inference_mode()
def perplexity(
    model: PreTrainedModel, batches: Iterable[Batch], byte_lengths: torch.Tensor | None = None
) -> dict[str, float | int | None]:
    """Token-weighted mean next-token NLL over labelled positions, and its exp; None when nothing is labelled.

    With `byte_lengths` (the UTF-8 bytes each id stands for, distill.eval.cross_tokenizer.token_byte_lengths) also
    bits per byte: the summed NLL in nats over the bytes of the scored tokens, / ln 2 (comparable across tokenizers).
    """
    model.eval()
    total_nll, tokens, n_bytes = 0.0, 0, 0
    for batch in batches:
        logits, targets = scored_logits(model, batch)
        for start in range(0, len(targets), CHUNK_POSITIONS):
            rows = slice(start, start + CHUNK_POSITIONS)
            nll = F.cross_entropy(logits[rows].float(), targets[rows], reduction="sum")
            total_nll += float(nll.double())
        tokens += len(targets)
        if byte_lengths is not None:
            n_bytes += int(byte_lengths.to(targets.device)[targets].sum())
    per_byte = {} if byte_lengths is None else {
        "bytes": n_bytes, "bits_per_byte": total_nll / n_bytes / math.log(2) if n_bytes else None}
    if tokens == 0:
        return {"perplexity": None, "nll": None, "tokens": 0, **per_byte}
    mean_nll = total_nll / tokens
    return {"perplexity": math.exp(mean_nll), "nll": mean_nll, "tokens": tokens, **per_byte}


@torch.inference_mode()
def agreement(
    student: PreTrainedModel, teacher: PreTrainedModel, batches: Iterable[Batch], shared_vocab: int
) -> dict[str, float | int | None]:
    """Top-1 agreement and mean KL(teacher || student) per labelled position, over the first shared_vocab ids."""
    student.eval()
    teacher.eval()
    matches, kl_sum, tokens = 0, 0.0, 0
    for batch in batches:
        student_logits, _ = scored_logits(student, batch)
        teacher_logits, _ = scored_logits(teacher, batch)
        teacher_logits = teacher_logits.to(student_logits.device)
        for start in range(0, len(student_logits), CHUNK_POSITIONS):
            rows = slice(start, start + CHUNK_POSITIONS)
            # both distributions are renormalised over the shared ids (a padded vocabulary adds no mass)
            s = F.log_softmax(student_logits[rows, :shared_vocab].float(), dim=-1)
            t = F.log_softmax(teacher_logits[rows, :shared_vocab].float(), dim=-1)
            matches += int((s.argmax(-1) == t.argmax(-1)).sum())
            kl_sum += float((t.exp() * (t - s)).sum(-1).double().sum())
        tokens += len(student_logits)
    if tokens == 0:
        return {"top1_agreement": None, "kl_to_teacher": None, "tokens": 0}
    return {"top1_agreement": matches / tokens, "kl_to_teacher": kl_sum / tokens, "tokens": tokens}


# ---------------------------------------------------------------- speed


def speed_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt_tokens: int) -> list[int]:
    """prompt_tokens ids of real text, the fixed passage tiled as needed: the prompt every speed row decodes after."""
    ids = tokenizer(SPEED_TEXT, add_special_tokens=False)["input_ids"]
    return (ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]


def _speed_prompt(tokenizer: PreTrainedTokenizerBase, prompt_tokens: int, batch_size: int) -> torch.Tensor:
    """A [batch_size, prompt_tokens] prompt of real text ids, the fixed passage tiled as needed."""
    return torch.tensor([speed_prompt_ids(tokenizer, prompt_tokens)] * batch_size, dtype=torch.long)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_generation(model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds for the prefill (up to the first greedy token) and for new_tokens cached one-token steps."""
    device = prompt.device
    mask = torch.ones_like(prompt)
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, attention_mask=mask, use_cache=True)
    next_token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    prefill_s = time.perf_counter() - start
    cache = out.past_key_values
    start = time.perf_counter()
    for _ in range(new_tokens):
        mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
        out = model(input_ids=next_token, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return prefill_s, time.perf_counter() - start


@torch.inference_mode()
def decode_speed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    prompt_tokens: int = 64,
    new_tokens: int = 32,
    batch_size: int = 1,
    repeats: int = 3,
) -> dict[str, float]:
    """Prefill and greedy KV-cached decode throughput (median of repeats after one warm-up run)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prompt_tokens + new_tokens > limit:
        raise DistillError(
            f"eval.speed_prompt_tokens + eval.speed_new_tokens = {prompt_tokens + new_tokens} "
            f"exceeds the model's max_position_embeddings ({limit})"
        )
    model.eval()
    prompt = _speed_prompt(tokenizer, prompt_tokens, batch_size).to(_device_of(model))
    _timed_generation(model, prompt, new_tokens)  # warm-up: kernels, allocator, lazy init
    runs = [_timed_generation(model, prompt, new_tokens) for _ in range(max(1, repeats))]
    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    return {
        "prefill_tokens_per_s": batch_size * prompt_tokens / prefill_s,
        "decode_tokens_per_s": batch_size * new_tokens / decode_s,
        "time_to_first_token_s": prefill_s,
    }


# ---------------------------------------------------------------- memory


def _rss_bytes() -> int | None:
    """Resident set size of this process from /proc/self/statm (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _RssSampler(threading.Thread):
    """Samples the process RSS every few milliseconds and keeps the highest value seen."""

    def __init__(self, interval_s: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak = _rss_bytes() or 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            self.peak = max(self.peak, _rss_bytes() or 0)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, _rss_bytes() or 0)
        return self.peak


def _cpu_peak_mb(fn: Callable[[], T]) -> tuple[T, float]:
    start = _rss_bytes()
    if start is None:
        # No /proc: ru_maxrss (KiB on Linux, bytes on macOS) only moves when the process sets a new peak,
        # so this is a lower bound.
        scale = 1 if os.uname().sysname == "Darwin" else 1024
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return result, (after - before) * scale / 2**20
    sampler = _RssSampler()
    sampler.start()
    try:
        result = fn()
    finally:
        peak = sampler.stop()
    return result, max(0, peak - start) / 2**20


def _cuda_peak_mb(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, max(0, torch.cuda.max_memory_allocated(device) - start) / 2**20


def peak_memory_mb(fn: Callable[[], T], device: torch.device | str | None = None) -> tuple[T, float]:
    """Run fn and return (its result, peak memory above the level at the start, in MiB)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return _cuda_peak_mb(fn, device)
    return _cpu_peak_mb(fn)


# ---------------------------------------------------------------- size


def model_size(model: torch.nn.Module, model_dir: Path | None = None) -> dict[str, Any]:
    """Parameter count (tied weights once), weight bytes in memory, and weight-file bytes in model_dir."""
    if model_dir is not None and not Path(model_dir).exists():
        raise DistillError(f"model size: {model_dir} not found")
    return {
        "params": count_params(model),
        # parameters() yields a tied Parameter once, so shared weights are not counted twice
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "bytes_on_disk": None if model_dir is None else bytes_on_disk(model_dir),
    }
