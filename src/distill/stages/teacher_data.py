"""The generate and filter stages: the teacher(s) answer the recipe's prompts, then the answers are filtered."""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable, Optional

from distill.data.filters import FilterResult, filter_to_file, format_filter_report
from distill.data.teacher_records import latest_records
from distill.errors import DistillError
from distill.recipe import Recipe
from distill.runtime import is_main_process, process_rank
from distill.stages.data import generation_settings, planned_ids, teacher_assignments
from distill.stages.facts import captures_at_generation, judge_backend, run_files, teacher_backend
from distill.teachers.backend import SamplingParams, TeacherBackend, as_judge
from distill.teachers.generate import GenerationStats, generate_responses, raise_if_all_failed

log = logging.getLogger("distill")


def generate(recipe: Recipe, *, progress: bool = True):
    """The teacher(s) answer data.prompts into <run>/teacher_data/ shards (resumable)."""
    if recipe.data.prompts is None:
        log.info("generate: no data.prompts in the recipe; nothing to do")
        return None
    ranks = process_rank()
    assignments = teacher_assignments(recipe)
    if ranks[1] > 1:
        _check_data_parallel(recipe, [spec for spec, _ in assignments], ranks[1])
    params, reasoning = generation_settings(recipe)
    out, all_stats = run_files(recipe).teacher_data, []
    for spec, prompts in assignments:
        # Only the recipe's own teacher's log-probs belong in its cache; other teachers' answers are teacher-forced.
        keep = recipe.teacher.cache_k if spec is recipe.teacher and captures_at_generation(recipe) else 0
        backend = LazyBackend(spec.model, lambda spec=spec, keep=keep: teacher_backend(
            recipe, spec, tokenizer_needed=bool(keep)))
        stats = generate_responses(
            backend, prompts, out,
            params=replace(params, top_logprobs=keep), samples=recipe.generate.samples,
            system_prompt=recipe.data.system_prompt, reasoning=reasoning,
            shard_records=recipe.generate.shard_records, progress=progress,
            on_long_prompt=recipe.data.on_error, ranks=ranks,
        )
        if is_main_process():  # every rank holds the stats of all of them
            _log_stats(spec.model, stats, out)
        all_stats.append(stats)
    for stats in all_stats:  # the failures are on disk as `failed` records: a re-run retries them
        raise_if_all_failed(stats)
    return all_stats[0] if len(all_stats) == 1 else all_stats


def _check_data_parallel(recipe: Recipe, teachers: list, world: int) -> None:
    """Refuse what several processes cannot share; every rank raises the same error before any waits for another."""
    for spec in teachers:
        if getattr(spec, "engine", "transformers") == "vllm":
            raise DistillError(f"teacher.engine: vllm spreads {spec.model} over the GPUs itself (tensor "
                               f"parallel); run `distill generate` as one process, not as {world} (torchrun, "
                               "accelerate launch)")


def _log_stats(teacher: str, stats: GenerationStats, out) -> None:
    log.info("generate (%s): %d new answers (%d already there), %d failed, %d prompt + %d new tokens, %.0f s "
             "-> %s", teacher, stats.done, stats.skipped_existing, stats.failed, stats.prompt_tokens,
             stats.new_tokens, stats.seconds, out)
    for error, count in sorted(stats.errors.items(), key=lambda item: -item[1])[:3]:
        log.warning("generate: %d request(s) failed: %s (re-run to retry them)", count, error)


class LazyBackend:
    """A teacher backend built on first use: a re-run with every answer on disk never loads the teacher."""

    def __init__(self, name: str, build: Callable[[], TeacherBackend]):
        self.name, self._build, self._backend = name, build, None

    def __getattr__(self, key: str):  # batch_size, generate: reached only when something is left to answer
        if self._backend is None:
            self._backend = self._build()
        return getattr(self._backend, key)


def filter_data(recipe: Recipe) -> Optional[FilterResult]:
    """Keep the teacher answers that pass recipe.filter -> <run>/teacher_data.filtered.jsonl (+ report)."""
    if recipe.filter is None or recipe.data.prompts is None:
        return None
    files = run_files(recipe)
    data_dir = files.teacher_data
    if not data_dir.is_dir():
        raise DistillError(f"{data_dir}: no teacher data yet; run `distill generate` first")
    latest = latest_records(data_dir)
    located = [(f"{data_dir}/{i}", latest[i]) for i in planned_ids(recipe) if i in latest]
    spec = recipe.filter.judge
    judge = None
    if spec.enabled:
        backend = judge_backend(recipe, model=spec.model, batch_size=spec.batch_size)
        judge = as_judge(backend, SamplingParams(max_new_tokens=spec.max_new_tokens))
    result = filter_to_file(located, files.filtered_data, recipe.filter, source=str(data_dir), judge=judge,
                            base_dir=recipe.base_dir)
    log.info("filter: kept %d of %d teacher answers (%d failed requests) -> %s\n%s", result.total_out,
             result.total_in, result.failed, files.filtered_data, format_filter_report(result))
    return result
