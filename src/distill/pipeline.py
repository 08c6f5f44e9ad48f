"""The stages of a run, in order, each also callable on its own: generate -> student -> train -> export -> eval."""
from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import yaml

from distill.errors import DistillError
from distill.recipe import Recipe
from distill.runtime import atomic_write_text
# Planning the generate stage from a recipe lives with the teachers; its names stay importable from here.
from distill.teachers.from_recipe import (
    captures_at_generation,
    generation_settings,
    recipe_prompts,
    teacher_assignments,
)

__all__ = [
    "prepare_run_dir", "teacher_backend", "recipe_prompts", "teacher_assignments", "captures_at_generation",
    "generation_settings", "generate", "filter_data", "capture", "build_student", "train", "export_targets",
    "export", "evaluate", "report", "run",
]

log = logging.getLogger("distill")

# Sections whose change makes a run directory's checkpoints meaningless.
_TRAINING_KEYS = ("seed", "teacher", "student", "data", "method", "train")


def _first_difference(old: object, new: object, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return prefix.rstrip(".") if old != new else None


def prepare_run_dir(recipe: Recipe, *, restart: bool = False) -> Path:
    """Create the run directory and keep the resolved recipe in it; refuse to mix two recipes' checkpoints."""
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_path = run_dir / "recipe.yaml"
    current = recipe.model_dump(mode="json")
    if restart:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    elif saved_path.is_file() and (run_dir / "checkpoints").is_dir():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        for key in _TRAINING_KEYS:
            diff = _first_difference(saved.get(key), current.get(key), f"{key}.")
            # More steps on the same recipe is a legitimate continuation.
            if diff and diff != "train.steps":
                raise DistillError(
                    f"{saved_path}: this run directory was made by a different recipe ({diff} differs); "
                    "choose a new output_dir, or pass --restart to discard its checkpoints"
                )
    atomic_write_text(saved_path, recipe.dump())
    return run_dir


def teacher_backend(recipe: Recipe, spec=None, *, tokenizer_needed: bool = False):
    """A teacher as a text generator: an OpenAI-compatible server (spec.endpoint), vLLM, or local weights.

    `spec` is recipe.teacher (the default) or one of generate.teachers; `tokenizer_needed` gives a served teacher
    the recipe teacher's tokenizer, to turn returned top_logprobs back into token ids.
    """
    t = spec or recipe.teacher
    if t.endpoint is not None:
        from distill.models.from_recipe import teacher_tokenizer
        from distill.teachers.openai_client import OpenAIBackend

        return OpenAIBackend(t.endpoint, t.model, api_key_env=t.api_key_env, concurrency=t.concurrency,
                             timeout_s=t.timeout_s, max_retries=t.max_retries, name=t.model,
                             tokenizer=teacher_tokenizer(recipe) if tokenizer_needed else None)
    if getattr(t, "engine", "transformers") == "vllm":  # generate.teachers have no engine key
        return _vllm_backend(recipe, t)
    from distill.models import load_model, load_tokenizer
    from distill.models.from_recipe import load_teacher, teacher_tokenizer
    from distill.runtime import resolve_device, resolve_dtype
    from distill.teachers.backend import LocalBackend

    device = resolve_device(recipe.train.device)
    dtype = resolve_dtype(t.dtype, device)
    if spec is None or spec is recipe.teacher:
        model, tokenizer = load_teacher(recipe, device, dtype), teacher_tokenizer(recipe)
    else:
        model = load_model(t.model, t.gguf_file, dtype=dtype, device=device, trust_remote_code=t.trust_remote_code)
        tokenizer = load_tokenizer(t.model, t.gguf_file, trust_remote_code=t.trust_remote_code)
    return LocalBackend(model, tokenizer, name=t.model, batch_size=recipe.generate.batch_size)


def _vllm_backend(recipe: Recipe, t):
    """A local teacher on vLLM's offline engine; a GGUF teacher is given to it as its .gguf file."""
    from distill.models.from_recipe import model_source
    from distill.teachers.vllm_backend import VLLMBackend

    path, gguf = model_source(recipe, t)  # resolves relative paths (model_ref) and pkg://
    if gguf is not None:
        path = str(Path(path) / gguf) if Path(path).is_dir() else _hub_file(path, gguf)
    # vLLM refuses requests for more log-probs than the engine allows (20 by default); a cache keeps cache_k.
    return VLLMBackend(path, name=t.model, batch_size=recipe.generate.batch_size, dtype=t.dtype, seed=recipe.seed,
                       trust_remote_code=t.trust_remote_code, max_logprobs=max(20, recipe.teacher.cache_k))


def _hub_file(repo: str, filename: str) -> str:
    """A .gguf file of a hub repo, downloaded (or found in the cache): vLLM loads GGUF only from a local file."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename)
    except Exception as err:  # offline, no such repo or file: one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DistillError(f"teacher.gguf_file: could not fetch {filename} from {repo} ({reason})") from None


def generate(recipe: Recipe, *, progress: bool = True):
    """Stage 1: the teacher(s) answer data.prompts into <run>/teacher_data/ shards (resumable)."""
    from distill.data.splits import teacher_data_path
    from distill.teachers.generate import generate_responses

    if recipe.data.prompts is None:
        log.info("generate: no data.prompts in the recipe; nothing to do")
        return None
    params, reasoning = generation_settings(recipe)
    out, all_stats = teacher_data_path(recipe), []
    for spec, prompts in teacher_assignments(recipe):
        # Only the recipe's own teacher's log-probs belong in its cache; other teachers' answers are teacher-forced.
        keep = recipe.teacher.cache_k if spec is recipe.teacher and captures_at_generation(recipe) else 0
        backend = _LazyBackend(spec.model, lambda spec=spec, keep=keep: teacher_backend(
            recipe, spec, tokenizer_needed=bool(keep)))
        stats = generate_responses(
            backend, prompts, out,
            params=replace(params, top_logprobs=keep), samples=recipe.generate.samples,
            system_prompt=recipe.data.system_prompt, reasoning=reasoning,
            shard_records=recipe.generate.shard_records, progress=progress, on_long_prompt=recipe.data.on_error,
        )
        log.info("generate (%s): %d new answers (%d already there), %d failed, %d prompt + %d new tokens, %.0f s "
                 "-> %s", spec.model, stats.done, stats.skipped_existing, stats.failed, stats.prompt_tokens,
                 stats.new_tokens, stats.seconds, out)
        for error, count in sorted(stats.errors.items(), key=lambda item: -item[1])[:3]:
            log.warning("generate: %d request(s) failed: %s (re-run to retry them)", count, error)
        all_stats.append(stats)
    return all_stats[0] if len(all_stats) == 1 else all_stats


class _LazyBackend:
    """A teacher backend built on first use: a re-run with every answer on disk never loads the teacher."""

    def __init__(self, name: str, build):
        self.name, self._build, self._backend = name, build, None

    def __getattr__(self, key: str):  # batch_size, generate: reached only when something is left to answer
        if self._backend is None:
            self._backend = self._build()
        return getattr(self._backend, key)


def filter_data(recipe: Recipe):
    """Stage 1b: keep the teacher answers that pass recipe.filter -> <run>/teacher_data.filtered.jsonl (+ report)."""
    from distill.data.filters import filter_to_file, format_filter_report
    from distill.data.splits import filtered_data_path, planned_ids, teacher_data_path
    from distill.teachers.generate import latest_records

    if recipe.filter is None or recipe.data.prompts is None:
        return None
    data_dir = teacher_data_path(recipe)
    if not data_dir.is_dir():
        raise DistillError(f"{data_dir}: no teacher data yet; run `distill generate` first")
    latest = latest_records(data_dir)
    located = [(f"{data_dir}/{i}", latest[i]) for i in planned_ids(recipe) if i in latest]
    judge = _filter_judge(recipe) if recipe.filter.judge.enabled else None
    result = filter_to_file(located, filtered_data_path(recipe), recipe.filter, source=str(data_dir), judge=judge,
                            base_dir=recipe.base_dir)
    log.info("filter: kept %d of %d teacher answers (%d failed requests) -> %s\n%s", result.total_out,
             result.total_in, result.failed, filtered_data_path(recipe), format_filter_report(result))
    return result


def _filter_judge(recipe: Recipe):
    """The filter's LLM judge: filter.judge.model, else the recipe's teacher (served or local)."""
    from distill.teachers.backend import LocalBackend, SamplingParams, as_judge

    spec = recipe.filter.judge
    if spec.model is None:
        backend = teacher_backend(recipe)
    else:
        from distill.models import load_model, load_tokenizer

        backend = LocalBackend(load_model(spec.model), load_tokenizer(spec.model), name=spec.model,
                               batch_size=spec.batch_size)
    return as_judge(backend, SamplingParams(max_new_tokens=spec.max_new_tokens))


def capture(recipe: Recipe, *, progress: bool = True):
    """Teacher forcing over the training examples into a top-k cache (teacher.cache or <run>/teacher_cache)."""
    from distill.signals.capture import capture as capture_cache

    return capture_cache(recipe, progress=progress)


def build_student(recipe: Recipe, *, out_dir: Path | None = None) -> Path:
    """Stage 2: build the recipe's student (cut from the teacher, or new) and save it, without training."""
    from distill.models.from_recipe import built_student, load_teacher, student_init_dir, teacher_tokenizer
    from distill.runtime import resolve_device, resolve_dtype

    if recipe.student.model is not None:
        raise DistillError("student.model: this recipe trains an existing model; there is no student to build")
    if out_dir is None:
        prepare_run_dir(recipe)
    device = resolve_device(recipe.train.device)
    teacher = load_teacher(recipe, device, resolve_dtype(recipe.teacher.dtype, device))
    return built_student(recipe, teacher, teacher_tokenizer(recipe), out_dir or student_init_dir(recipe))


def train(recipe: Recipe, *, progress: bool = True):
    """Stage 3: distil the student (resumes from the newest checkpoint of the same recipe)."""
    from distill.train.trainer import train as train_student

    return train_student(recipe, resume=True, progress=progress)


def export_targets(recipe: Recipe) -> list[tuple[str, str | None]]:
    """(format, quantization) of every export.formats entry; a bad one fails before anything runs."""
    from distill.export import parse_target

    targets = []
    for i, target in enumerate(recipe.export.formats):
        try:
            targets.append(parse_target(target))
        except DistillError as err:
            raise DistillError(f"export.formats[{i}]: {err}") from None
    return targets


def export(recipe: Recipe) -> list[Path]:
    """Stage 3b: the trained student in each export.formats, under <run>/exports/ (kept while newer than it)."""
    from distill.export import default_export_dir, export_model, older_than

    student, written = recipe.run_dir / "student", []
    for fmt, quant in export_targets(recipe):
        target = default_export_dir(recipe.run_dir, fmt, quant)
        if target.exists() and student.is_dir() and not older_than(target, student):
            log.info("export: %s is newer than the student; kept", target)
            continue
        written.append(export_model(recipe.run_dir, None, fmt, quant))
    return written


def evaluate(recipe: Recipe, *, progress: bool = True) -> dict:
    """Stage 4: measure teacher and student on held-out data; write <run>/report.json."""
    from distill.eval.stage import evaluate_run

    return evaluate_run(recipe, progress=progress)


def report(recipe: Recipe) -> Path:
    """Stage 5: <run>/report.html (self-contained, with plots) and report.md from the run's files."""
    from distill.report.html import write_report

    return write_report(recipe.run_dir)


def run(recipe: Recipe, *, restart: bool = False, progress: bool = True) -> dict:
    """All stages in order; re-running after a kill resumes where it stopped."""
    prepare_run_dir(recipe, restart=restart)
    export_targets(recipe)
    generate(recipe, progress=progress)
    filter_data(recipe)
    if recipe.teacher.cache is not None and recipe.method.kind == "kd":  # resumable: done shards are kept
        capture(recipe, progress=progress)
    if recipe.student.model is None:
        build_student(recipe)
    train(recipe, progress=progress)
    export(recipe)
    result = evaluate(recipe, progress=progress)
    report(recipe)
    return result
