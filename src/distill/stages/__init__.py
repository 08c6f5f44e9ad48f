"""The stages of a run: generate -> filter -> capture -> student -> pairs (dpo) -> train -> export -> eval -> report.

Below the CLI, only these (and `distill plan`) read a Recipe. Each stage is callable on its own; `run` calls them
in order.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from distill.errors import DistillError
from distill.recipe import Recipe
from distill.runtime import atomic_write_text, is_main_process
from distill.stages.cache import capture
from distill.stages.data import recipe_examples
from distill.stages.evaluation import evaluate
from distill.stages.exports import export, export_targets
from distill.stages.facts import run_files, uses_teacher_cache
from distill.stages.pairs import build_pairs, check_pairs
from distill.stages.reporting import report
from distill.stages.student import build_student
from distill.stages.teacher_data import filter_data, generate
from distill.stages.training import check_recipe, train

__all__ = ["prepare_run_dir", "generate", "filter_data", "capture", "build_student", "check_pairs", "build_pairs",
           "train", "export_targets", "export", "evaluate", "report", "run"]

log = logging.getLogger("distill")

# Sections whose change makes a run directory's checkpoints meaningless.
_TRAINING_KEYS = ("seed", "teacher", "student", "data", "method", "train")


def _first_difference(old: object, new: object, prefix: str = "") -> str | None:
    """The first key path whose value differs; keys the saved recipe lacks (added by a newer distill, at their
    defaults) are not differences, so an older run directory still resumes."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old:
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return prefix.rstrip(".") if old != new else None


def prepare_run_dir(recipe: Recipe, *, restart: bool = False) -> Path:
    """Create the run directory and keep the resolved recipe in it; refuse to mix two recipes' checkpoints."""
    check_pairs(recipe)  # method.kind: dpo without pairs: refused before anything is written
    files = run_files(recipe)
    files.root.mkdir(parents=True, exist_ok=True)
    current = recipe.model_dump(mode="json")
    if restart:
        shutil.rmtree(files.checkpoints, ignore_errors=True)
    elif files.recipe.is_file() and files.checkpoints.is_dir():
        saved = yaml.safe_load(files.recipe.read_text()) or {}
        for key in _TRAINING_KEYS:
            diff = _first_difference(saved.get(key), current.get(key), f"{key}.")
            # More steps on the same recipe is a legitimate continuation.
            if diff and diff != "train.steps":
                raise DistillError(
                    f"{files.recipe}: this run directory was made by a different recipe ({diff} differs); "
                    "choose a new output_dir, or pass --restart to discard its checkpoints"
                )
    if is_main_process():  # the other ranks of torchrun/accelerate launch check it, rank 0 writes it
        atomic_write_text(files.recipe, recipe.dump())
    return files.root


def run(recipe: Recipe, *, restart: bool = False, progress: bool = True) -> dict:
    """All stages in order; re-running after a kill resumes where it stopped."""
    check_recipe(recipe)  # method/train combinations the trainer cannot run: refused before any stage
    prepare_run_dir(recipe, restart=restart)
    export_targets(recipe)
    generate(recipe, progress=progress)
    filter_data(recipe)
    recipe_examples(recipe)  # a malformed data file fails here, before any model is built or trained
    if uses_teacher_cache(recipe):  # resumable: done shards are kept
        capture(recipe, progress=progress)
    if recipe.student.model is None:
        build_student(recipe)
    if recipe.method.kind == "dpo":  # resumable: built pairs are kept
        build_pairs(recipe, progress=progress)
    train(recipe, progress=progress)
    export(recipe)
    result = evaluate(recipe, progress=progress)
    report(recipe)
    return result
