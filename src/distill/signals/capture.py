"""`distill capture`: run the teacher over the training examples once and cache its top-k log-probs.

Teacher forcing over the recipe's encoded training examples (the same examples, in the same order, that
training indexes), only at positions whose next token is trained. Shard by shard, each written atomically:
memory stays flat in the dataset size, and a killed capture resumes at the first missing shard.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.errors import DistillError
from distill.recipe import Recipe
from distill.signals.cache import CacheHeader, TopKCacheWriter, dataset_hash, example_hash, trained_positions
from distill.signals.encoding import TopKRows
from distill.signals.from_generation import FROM_GENERATION, kept_topk_files, kept_vocab_size, reused_rows

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


def top_k_rows(hidden: torch.Tensor, head: torch.Tensor, k: int, chunk_size: int = 192) -> TopKRows:
    """Top-k ids and log-probs (log-softmax over the whole head first) and the log tail mass of [n, D] states."""
    from distill.losses.divergences import log_probs

    ids, values, tails = [], [], []
    for start in range(0, hidden.size(0), chunk_size):
        lp = log_probs(hidden[start:start + chunk_size] @ head.t()).float()
        top, idx = lp.topk(k, dim=1)
        # Summing the rest directly (not 1 - sum(top)) keeps the tail exact when it is tiny.
        tails.append(lp.scatter(1, idx, float("-inf")).logsumexp(dim=1))
        ids.append(idx)
        values.append(top)
    cat = lambda parts: torch.cat(parts).cpu().numpy()  # noqa: E731
    return TopKRows(ids=cat(ids), log_probs=cat(values), tail=cat(tails))


def capture(
    recipe: Recipe, *, out: Optional[Path] = None, progress: bool = True, shard_examples: int = SHARD_EXAMPLES,
    batch_size: Optional[int] = None, stop_after_shards: Optional[int] = None,
) -> CaptureStats:
    """Write (or complete) the recipe's teacher cache; `stop_after_shards` ends early, as a kill would.

    Examples whose answers kept their top-k log-probs at generation (generate.capture_topk) take them from there
    once their token ids check; the rest are teacher-forced, and the teacher is loaded only if any are.
    """
    from distill.data.splits import recipe_examples
    from distill.data.tokenize import encode_all, padding_id
    from distill.models.from_recipe import teacher_tokenizer
    from distill.runtime import resolve_device
    from distill.signals.provenance import cache_path, chat_template_hash, teacher_id, tokenizer_hash, weights_hash

    began = time.perf_counter()
    path = Path(out) if out is not None else cache_path(recipe)
    tokenizer = teacher_tokenizer(recipe)
    train_examples, _ = recipe_examples(recipe)
    encoded = encode_all(train_examples, tokenizer, recipe.data.max_length, recipe.data.system_prompt)
    hashes = [example_hash(e.input_ids, e.labels) for e in encoded]
    device = resolve_device(recipe.train.device)
    teacher = _Teacher(recipe, device)
    kept = kept_topk_files(recipe, encoded)
    if kept:  # the header must not depend on whether some example later needs the teacher loaded
        vocab_size, weights = kept_vocab_size(next(iter(kept.values())), tokenizer), FROM_GENERATION
    else:
        vocab_size, weights = teacher.head.size(0), weights_hash(teacher.model)
    k = recipe.teacher.cache_k
    if k > vocab_size:
        raise DistillError(f"teacher.cache_k: {k} is larger than the teacher's vocabulary ({vocab_size})")
    header = CacheHeader(
        teacher=teacher_id(recipe), teacher_weights=weights, tokenizer=tokenizer_hash(tokenizer),
        chat_template=chat_template_hash(tokenizer), vocab_size=vocab_size, k=k,
        step=None if recipe.teacher.cache_exact else 1 / 16, compressor="lzma2", dataset=dataset_hash(hashes),
        n_examples=len(encoded), shard_examples=shard_examples,
    )
    writer = TopKCacheWriter(path, header)
    done = writer.complete_shards()
    todo = [s for s in range(header.n_shards) if s not in done][:stop_after_shards]
    total = sum(len(trained_positions(encoded[i].labels)) for s in todo for i in header.shard_range(s))
    pad_id = padding_id(tokenizer)
    loop_began = time.perf_counter()
    bar = tqdm(total=total, unit="tok", desc="capture", disable=not progress, dynamic_ncols=True)
    size = batch_size or recipe.train.batch_size
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
        for start in range(0, len(forced), size):
            batch = forced[start:start + size]
            rows.update(zip(batch, _batch_rows(teacher.model, teacher.checked_head(vocab_size),
                                               [encoded[i] for i in batch], k, pad_id, recipe.method.chunk_size,
                                               device)))
        for i in header.shard_range(shard):
            writer.add(i, hashes[i], rows[i], encoded[i].labels)
            bar.update(len(rows[i]))
    bar.close()
    stats = CaptureStats(path=path, examples=len(encoded), positions=total, new_shards=len(todo),
                         skipped_shards=len(done), seconds=time.perf_counter() - began,
                         capture_seconds=time.perf_counter() - loop_began,
                         bytes=sum(p.stat().st_size for p in path.glob("shard_*.bin")),
                         reused=reused, forced_reasons=forced_reasons)
    log.info("capture: %d new shard(s), %d already there, %d positions, %.0f s -> %s (%.1f MB)",
             stats.new_shards, stats.skipped_shards, total, stats.seconds, path, stats.bytes / 1e6)
    if kept:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(forced_reasons.items(), key=lambda kv: -kv[1]))
        log.info("capture: %d example(s) took the log-probs kept at generation; %d teacher-forced%s", reused,
                 sum(len(header.shard_range(s)) for s in todo) - reused, f" ({why})" if why else "")
    return stats


class _Teacher:
    """The teacher's weights, loaded on first use: a cache built from generation may never need them."""

    def __init__(self, recipe: Recipe, device: torch.device):
        self.recipe, self.device = recipe, device

    @cached_property
    def model(self) -> torch.nn.Module:
        from distill.models.from_recipe import load_teacher
        from distill.runtime import resolve_dtype

        return load_teacher(self.recipe, self.device, resolve_dtype(self.recipe.teacher.dtype, self.device))

    @cached_property
    def head(self) -> torch.Tensor:
        return _head(self.model)

    def checked_head(self, vocab_size: int) -> torch.Tensor:
        if self.head.size(0) != vocab_size:
            raise DistillError(f"teacher.model: its head has {self.head.size(0)} rows, but the log-probs kept at "
                               f"generation came from one with {vocab_size}; generate again with this teacher")
        return self.head


def _head(teacher: torch.nn.Module) -> torch.Tensor:
    from distill.models import output_head

    return output_head(teacher).detach()


@torch.no_grad()
def _batch_rows(teacher, head, examples, k: int, pad_id: int, chunk_size: int, device) -> list[TopKRows]:
    """Each example's rows: teacher hidden states at its trained positions, turned into top-k in chunks."""
    from distill.data.tokenize import collate
    from distill.models.heads import decoder_hidden_states

    batch = {key: v.to(device) for key, v in collate(examples, pad_id).items()}
    hidden = decoder_hidden_states(teacher, batch["input_ids"], batch["attention_mask"])
    positions = [trained_positions(e.labels) for e in examples]
    states = torch.cat([hidden[b, torch.as_tensor(p, device=device)] for b, p in enumerate(positions)])
    rows = top_k_rows(states, head, k, chunk_size)
    bounds = np.cumsum([0] + [len(p) for p in positions])
    return [TopKRows(rows.ids[a:b], rows.log_probs[a:b], rows.tail[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
