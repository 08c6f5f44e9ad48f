"""The stages of a run, in order, each also callable on its own: generate -> student -> train -> eval."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from distill.errors import DistillError
from distill.recipe import Recipe
from distill.runtime import atomic_write_text

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


def generate(recipe: Recipe, *, progress: bool = True):
    """Stage 1: the teacher answers data.prompts into <run>/teacher_data.jsonl (resumable)."""
    from distill.data.examples import read_prompts
    from distill.data.splits import teacher_data_path
    from distill.models.from_recipe import load_teacher, teacher_tokenizer
    from distill.runtime import resolve_device, resolve_dtype
    from distill.teachers.generate import generate_responses

    if recipe.data.prompts is None:
        log.info("generate: no data.prompts in the recipe; nothing to do")
        return None
    prompts = read_prompts(recipe.path(recipe.data.prompts))
    if recipe.generate.max_prompts:
        prompts = prompts[: recipe.generate.max_prompts]
    device = resolve_device(recipe.train.device)
    teacher = load_teacher(recipe, device, resolve_dtype(recipe.teacher.dtype, device))
    g = recipe.generate
    stats = generate_responses(
        teacher, teacher_tokenizer(recipe), prompts, teacher_data_path(recipe),
        teacher_name=recipe.teacher.model, batch_size=g.batch_size, max_new_tokens=g.max_new_tokens,
        temperature=g.temperature, top_p=g.top_p, seed=recipe.seed, system_prompt=recipe.data.system_prompt,
        progress=progress,
    )
    log.info("generate: %d new answers (%d already there), %d tokens, %.0f s -> %s", stats.done,
             stats.skipped_existing, stats.new_tokens, stats.seconds, teacher_data_path(recipe))
    return stats


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


def evaluate(recipe: Recipe, *, progress: bool = True) -> dict:
    """Stage 4: measure teacher and student on held-out data; write <run>/report.json."""
    from distill.eval.stage import evaluate_run

    return evaluate_run(recipe, progress=progress)


def run(recipe: Recipe, *, restart: bool = False, progress: bool = True) -> dict:
    """All stages in order; re-running after a kill resumes where it stopped."""
    prepare_run_dir(recipe, restart=restart)
    generate(recipe, progress=progress)
    if recipe.teacher.cache is not None and recipe.method.kind == "kd":  # resumable: done shards are kept
        capture(recipe, progress=progress)
    if recipe.student.model is None:
        build_student(recipe)
    train(recipe, progress=progress)
    return evaluate(recipe, progress=progress)
