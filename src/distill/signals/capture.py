"""Teacher forcing over encoded training examples into a top-k cache (the building block of `distill capture`).

Teacher forcing over the recipe's encoded training examples (the same examples, in the same order, that
training indexes), only at positions whose next token is trained. Shard by shard, each written atomically:
memory stays flat in the dataset size, and a killed capture resumes at the first missing shard.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.data.tokenize import collate, padding_id
from distill.errors import DistillError
from distill.losses.divergences import log_probs
from distill.models import decoder_hidden_states, output_head
from distill.runtime import barrier, gather_from_ranks
from distill.signals.cache import (
    CacheHeader,
    TopKCacheWriter,
    dataset_hash,
    example_hash,
    next_tokens,
    trained_positions,
)
from distill.signals.encoding import TopKRows
from distill.signals.from_generation import FROM_GENERATION, kept_vocab_size, reused_rows
from distill.signals.provenance import chat_template_hash, tokenizer_hash, weights_hash

log = logging.getLogger("distill")

SHARD_EXAMPLES = 256


@dataclass
class CaptureStats:
    path: Path
    examples: int
    positions: int  # captured by this call
    new_shards: int
    skipped_shards: int  # already complete
    seconds: float  # the whole call: loading the teacher, hashing its weights, tokenizing, capturing
    capture_seconds: float  # the teacher-forcing loop alone (forward, top-k, encoding, writing)
    bytes: int  # of all shards
    reused: int = 0  # examples whose rows came from the log-probs kept at generation
    forced_reasons: dict = field(default_factory=dict)  # why kept log-probs did not fit an example -> count
    forced: int = 0  # examples of the new shards that were teacher-forced


def top_k_rows(
    hidden: torch.Tensor, head: torch.Tensor, k: int, chunk_size: int = 192, labels: Optional[torch.Tensor] = None,
) -> TopKRows:
    """Top-k ids and log-probs (log-softmax over the whole head first) and the log tail mass of [n, D] states.

    With `labels` [n] every row keeps its label: one outside the top-k takes the k-th place (its log-prob is below
    every kept one, so the row stays sorted), which a cross-tokenizer group needs for its later tokens.
    """
    ids, values, tails = [], [], []
    for start in range(0, hidden.size(0), chunk_size):
        lp = log_probs(hidden[start:start + chunk_size] @ head.t()).float()
        top, idx = lp.topk(k, dim=1)
        if labels is not None:
            label = labels[start:start + chunk_size].to(idx.device)
            missing = ~(idx == label[:, None]).any(dim=1)
            idx[missing, -1] = label[missing]
            top[missing, -1] = lp[missing, label[missing]]
        # Summing the rest directly (not 1 - sum(top)) keeps the tail exact when it is tiny.
        tails.append(lp.scatter(1, idx, float("-inf")).logsumexp(dim=1))
        ids.append(idx)
        values.append(top)
    cat = lambda parts: torch.cat(parts).cpu().numpy()  # noqa: E731
    return TopKRows(ids=cat(ids), log_probs=cat(values), tail=cat(tails))


@dataclass
class CaptureJob:
    """What a capture writes and how: the cache's place and provenance, k and the log-prob grid, batch sizes."""

    path: Path
    teacher: str  # the teacher's reference (path or hub id, plus #file.gguf), kept in the header
    k: int
    step: Optional[float]  # the log-prob grid (1/16 nat), None for exact values
    batch_size: int
    chunk_size: int
    shard_examples: int = SHARD_EXAMPLES
    teacher_files: str = ""  # the teacher's weight files' fingerprint (provenance.files_fingerprint)
    # Across tokenizers (docs/cross_tokenizer.md): log-softmax over the head's first `head_rows` rows (the
    # teacher tokenizer's entries), every row keeps its label, and the header names the student's tokenizer.
    head_rows: Optional[int] = None
    keep_labels: bool = False
    aligned_to: str = ""


def capture_cache(
    job: CaptureJob, encoded: list, tokenizer, load_teacher: Callable[[], torch.nn.Module],
    kept: dict[int, Path], device: torch.device, *, progress: bool = True,
    stop_after_shards: Optional[int] = None, ranks: tuple[int, int] = (0, 1),
) -> CaptureStats:
    """Write (or complete) a teacher cache over `encoded`; `stop_after_shards` ends early, as a kill would.

    `kept` maps example indices to the top-k log-probs kept at generation: examples whose token ids check take
    their rows from there; the rest are teacher-forced, and `load_teacher` is called only if any are.
    With ranks = (rank, world) of several processes, rank r writes shards r, r + world, ... (each shard's bytes
    depend on its examples alone, so the cache equals one process's); rank 0 writes the header first, and all
    return the stats of all of them once every shard is written.
    """
    rank, world = ranks
    began = time.perf_counter()
    hashes = [example_hash(e.input_ids, e.labels) for e in encoded]
    teacher = _Teacher(load_teacher, job.head_rows)
    if kept:  # the header must not depend on whether some example later needs the teacher loaded
        vocab_size, weights = kept_vocab_size(next(iter(kept.values())), tokenizer), FROM_GENERATION
    else:
        vocab_size, weights = teacher.head.size(0), weights_hash(teacher.model)
    k = job.k
    if k > vocab_size:
        raise DistillError(f"teacher.cache_k: {k} is larger than the teacher's vocabulary ({vocab_size})")
    header = CacheHeader(
        teacher=job.teacher, teacher_weights=weights, tokenizer=tokenizer_hash(tokenizer),
        chat_template=chat_template_hash(tokenizer), vocab_size=vocab_size, k=k, step=job.step,
        compressor="lzma2", dataset=dataset_hash(hashes), n_examples=len(encoded),
        shard_examples=job.shard_examples, teacher_files=job.teacher_files, aligned_to=job.aligned_to,
    )
    writer = TopKCacheWriter(job.path, header, owner=rank == 0)  # every rank refuses a mismatched header alike
    if world > 1:
        barrier()  # the header is on disk before any shard
    mine = range(rank, header.n_shards, world)
    done = writer.complete_shards(mine)
    todo = [s for s in mine if s not in done][:stop_after_shards]
    total = sum(len(trained_positions(encoded[i].labels)) for s in todo for i in header.shard_range(s))
    pad_id = padding_id(tokenizer)
    loop_began = time.perf_counter()
    bar = tqdm(total=total, unit="tok", desc="capture", disable=not progress or rank != 0, dynamic_ncols=True)
    forced_reasons: dict[str, int] = {}
    reused = 0
    for shard in todo:
        rows: dict[int, TopKRows] = {}
        for i in header.shard_range(shard):
            found = reused_rows(kept.get(i), encoded[i], k)
            if isinstance(found, TopKRows):
                rows[i] = found
            elif found is not None:
                forced_reasons[found] = forced_reasons.get(found, 0) + 1
        reused += len(rows)
        forced = [i for i in header.shard_range(shard) if i not in rows]
        for start in range(0, len(forced), job.batch_size):
            batch = forced[start:start + job.batch_size]
            rows.update(zip(batch, batch_rows(teacher.model, teacher.checked_head(vocab_size),
                                              [encoded[i] for i in batch], k, pad_id, job.chunk_size, device,
                                              keep_labels=job.keep_labels)))
        for i in header.shard_range(shard):
            writer.add(i, hashes[i], rows[i], encoded[i].labels)
            bar.update(len(rows[i]))
    bar.close()
    stats = CaptureStats(path=job.path, examples=len(encoded), positions=total, new_shards=len(todo),
                         skipped_shards=len(done), seconds=time.perf_counter() - began,
                         capture_seconds=time.perf_counter() - loop_began, bytes=0, reused=reused,
                         forced_reasons=forced_reasons, forced=sum(len(header.shard_range(s)) for s in todo) - reused)
    if world > 1:
        stats = merge_rank_stats(gather_from_ranks(stats))  # returns once every rank's shards are on disk
    stats.bytes = sum(p.stat().st_size for p in job.path.glob("shard_*.bin"))
    if rank == 0:
        _log_stats(stats, bool(kept))
    return stats


def merge_rank_stats(parts: list[CaptureStats]) -> CaptureStats:
    """The stats of one capture split over several processes: counts add up, the times are the slowest's."""
    merged = replace(parts[0], forced_reasons={})
    for name in ("positions", "new_shards", "skipped_shards", "reused", "forced"):
        setattr(merged, name, sum(getattr(part, name) for part in parts))
    merged.seconds = max(part.seconds for part in parts)
    merged.capture_seconds = max(part.capture_seconds for part in parts)
    for part in parts:
        for reason, count in part.forced_reasons.items():
            merged.forced_reasons[reason] = merged.forced_reasons.get(reason, 0) + count
    return merged


def _log_stats(stats: CaptureStats, from_generation: bool) -> None:
    log.info("capture: %d new shard(s), %d already there, %d positions, %.1f s (%.1f s capturing) -> %s (%.1f MB)",
             stats.new_shards, stats.skipped_shards, stats.positions, stats.seconds, stats.capture_seconds, stats.path,
             stats.bytes / 1e6)
    if from_generation:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(stats.forced_reasons.items(), key=lambda kv: -kv[1]))
        log.info("capture: %d example(s) took the log-probs kept at generation; %d teacher-forced%s", stats.reused,
                 stats.forced, f" ({why})" if why else "")


class _Teacher:
    """The teacher's weights, loaded on first use: a cache built from generation may never need them."""

    def __init__(self, load: Callable[[], torch.nn.Module], rows: Optional[int] = None):
        self.load, self.rows = load, rows

    @cached_property
    def model(self) -> torch.nn.Module:
        return self.load()

    @cached_property
    def head(self) -> torch.Tensor:
        head = output_head(self.model).detach()
        return head if self.rows is None else head[: self.rows]

    def checked_head(self, vocab_size: int) -> torch.Tensor:
        if self.head.size(0) != vocab_size:
            raise DistillError(f"teacher.model: its head has {self.head.size(0)} rows, but the log-probs kept at "
                               f"generation came from one with {vocab_size}; generate again with this teacher")
        return self.head


@torch.no_grad()
def batch_rows(
    teacher, head, examples, k: int, pad_id: int, chunk_size: int, device, *, keep_labels: bool = False
) -> list[TopKRows]:
    """Each example's rows: teacher hidden states at its trained positions, turned into top-k in chunks (with
    `keep_labels`, each row keeps the token that follows)."""
    batch = {key: v.to(device) for key, v in collate(examples, pad_id).items()}
    hidden = decoder_hidden_states(teacher, batch["input_ids"], batch["attention_mask"])
    positions = [trained_positions(e.labels) for e in examples]
    states = torch.cat([hidden[b, torch.as_tensor(p, device=device)] for b, p in enumerate(positions)])
    labels = torch.as_tensor(np.concatenate([next_tokens(e.labels) for e in examples])) if keep_labels else None
    rows = top_k_rows(states, head, k, chunk_size, labels)
    bounds = np.cumsum([0] + [len(p) for p in positions])
    return [TopKRows(rows.ids[a:b], rows.log_probs[a:b], rows.tail[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
