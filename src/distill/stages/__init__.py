"""The stages of a run: generate -> filter -> capture -> student -> pairs (dpo) -> train -> export -> eval -> report.

With `stages:` in the recipe, capture -> student -> pairs -> train run once per training stage, in order (chain.py).

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
from distill.runtime import atomic_write_text, barrier, continue_alone, is_main_process
from distill.stages.cache import capture
from distill.stages.chain import build_preference_data, check_stages, stage_recipes, train_stages
from distill.stages.data import recipe_examples
from distill.stages.evaluation import evaluate
from distill.stages.exports import export, export_targets
from distill.stages.facts import run_files
from distill.stages.pairs import build_pairs, check_pairs
from distill.stages.reporting import report
from distill.stages.student import build_student
from distill.stages.teacher_data import filter_data, generate
from distill.stages.training import train

__all__ = ["prepare_run_dir", "generate", "filter_data", "capture", "build_student", "check_pairs", "build_pairs",
           "build_preference_data", "train", "stage_recipes", "train_stages", "export_targets", "export", "evaluate",
           "report", "run"]

log = logging.getLogger("distill")

# Sections whose change makes a run directory's checkpoints meaningless.
_TRAINING_KEYS = ("seed", "teacher", "student", "data", "method", "train", "stages")
# Changes a run continues through: more steps on the same recipe, other experiment trackers.
_RESUMABLE_CHANGES = frozenset({"train.steps", "train.report_to"})


def _first_difference(old: object, new: object, prefix: str = "") -> str | None:
    """The first key path whose value differs; keys the saved recipe lacks (added by a newer distill, at their
    defaults) are not differences, so an older run directory still resumes; nor are _RESUMABLE_CHANGES."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old:
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    path = prefix.rstrip(".")
    return path if old != new and path not in _RESUMABLE_CHANGES else None


def prepare_run_dir(recipe: Recipe, *, restart: bool = False) -> Path:
    """Create the run directory and keep the resolved recipe in it; refuse to mix two recipes' checkpoints."""
    if recipe.stages is None:
        check_pairs(recipe)  # method.kind: dpo without pairs: refused before anything is written
    else:
        check_stages(recipe)  # each stage's, naming the stage
    files = run_files(recipe)
    checkpoints = [run_files(stage).checkpoints for stage in stage_recipes(recipe)]
    current = recipe.model_dump(mode="json")
    if not restart and files.recipe.is_file() and any(directory.is_dir() for directory in checkpoints):
        saved = yaml.safe_load(files.recipe.read_text()) or {}
        for key in _TRAINING_KEYS:
            diff = _first_difference(saved.get(key), current.get(key), f"{key}.")
            if diff:
                raise DistillError(
                    f"{files.recipe}: this run directory was made by a different recipe ({diff} differs); "
                    "choose a new output_dir, or pass --restart to discard its checkpoints"
                )
    if is_main_process():  # under torchrun every process checks the recipe above, rank 0 alone writes
        files.root.mkdir(parents=True, exist_ok=True)
        if restart:
            for directory in checkpoints:
                shutil.rmtree(directory, ignore_errors=True)
        atomic_write_text(files.recipe, recipe.dump())
    barrier()
    return files.root


def run(recipe: Recipe, *, restart: bool = False, progress: bool = True) -> dict:
    """All stages in order; re-running after a kill resumes where it stopped."""
    check_stages(recipe)  # method/train combinations the trainer cannot run: refused before any stage
    prepare_run_dir(recipe, restart=restart)
    export_targets(recipe)
    generate(recipe, progress=progress)
    if is_main_process():  # under torchrun, rank 0 writes what every process then reads
        filter_data(recipe)
    barrier()
    recipe_examples(recipe)  # a malformed data file fails here, before any model is built or trained
    train_stages(recipe, progress=progress)  # per stage: its teacher cache, student and pairs, then training
    continue_alone()
    if not is_main_process():
        return {}  # under torchrun the other processes help train; rank 0 exports, evaluates and reports
    export(recipe)
    result = evaluate(recipe, progress=progress)
    report(recipe)
    return result
