"""The capture stage: the teacher's top-k log-probs over the recipe's training set, cached once for training (on
the teacher's own tokenization of each text when the student's tokenizer differs: docs/cross_tokenizer.md)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from distill.recipe import Recipe
from distill.runtime import process_rank
from distill.signals.capture import SHARD_EXAMPLES, CaptureJob, CaptureStats, capture_cache
from distill.signals.from_generation import kept_topk_files
from distill.stages.cross_tokenizer import cross_capture
from distill.stages.data import training_set
from distill.stages.facts import (
    cache_path,
    device,
    load_teacher,
    run_files,
    teacher_files,
    teacher_id,
    teacher_tokenizer,
)


def capture(
    recipe: Recipe, *, out: Optional[Path] = None, progress: bool = True, batch_size: Optional[int] = None,
    stop_after_shards: Optional[int] = None, shard_examples: int = SHARD_EXAMPLES,
) -> CaptureStats:
    """Write (or complete) the recipe's teacher cache (teacher.cache, or <run>/teacher_cache; `out` overrides).

    Answers whose top-k log-probs were kept at generation reuse them; the teacher is loaded only for the rest.
    `stop_after_shards` ends early, as a kill would. Under torchrun or accelerate launch the processes share the
    shards out and every one returns the stats of all of them.
    """
    tokenizer = teacher_tokenizer(recipe)
    job = CaptureJob(
        path=Path(out) if out is not None else cache_path(recipe), teacher=teacher_id(recipe),
        k=recipe.teacher.cache_k, step=None if recipe.teacher.cache_exact else 1 / 16,
        batch_size=batch_size or recipe.train.batch_size, chunk_size=recipe.method.chunk_size,
        shard_examples=shard_examples, teacher_files=teacher_files(recipe),
    )
    cross = cross_capture(recipe, tokenizer)  # a student on a tokenizer of its own (uld, align); before any model
    if cross is not None:
        # The teacher reads each text as the student's template renders it, not as it answered at generation.
        job = replace(job, head_rows=len(tokenizer), keep_labels=True, aligned_to=cross.aligned_to)
        encoded, kept = cross.examples, {}
    else:
        encoded = training_set(recipe, tokenizer).encoded
        teacher_data = run_files(recipe).teacher_data if recipe.data.prompts is not None else None
        kept = kept_topk_files(teacher_data, encoded)
    return capture_cache(job, encoded, tokenizer, lambda: load_teacher(recipe), kept, device(recipe),
                         progress=progress, stop_after_shards=stop_after_shards, ranks=process_rank())
