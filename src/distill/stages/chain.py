"""Training stages in one recipe (`stages:`): each stage trains from the one before's student, in order.

A stage is a whole recipe (Recipe.training_stages merges its method/train/data/pairs into the recipe's sections);
its checkpoints, metrics, pairs and student live under <run>/stages/<name>/ (distill.rundir), the final stage's
student is <run>/student. A recipe without `stages:` is its own only stage, so `distill run` takes one path.
"""
from __future__ import annotations

import logging
from typing import Optional

from distill.errors import DistillError
from distill.recipe import Recipe, StageRecipe
from distill.runtime import barrier, is_main_process
from distill.stages.cache import capture
from distill.stages.data import recipe_examples
from distill.stages.facts import uses_teacher_cache
from distill.stages.kto import build_labelled
from distill.stages.pairs import PairStats, build_pairs
from distill.stages.student import build_student
from distill.stages.teacher_data import filter_data, generate
from distill.stages.training import TrainResult, check_recipe, train

log = logging.getLogger("distill")


def stage_recipes(recipe: Recipe) -> list[Recipe]:
    """The recipe's training stages in order, each a whole recipe ([recipe] when it has no `stages:`)."""
    return recipe.training_stages()


def stage_label(stage: Recipe) -> str:
    """How errors and logs name a stage: `stages[1] (dpo)`; "" for a recipe without stages."""
    return f"stages[{stage.stage_index}] ({stage.stage})" if isinstance(stage, StageRecipe) else ""


def check_stages(recipe: Recipe) -> None:
    """Every stage's method/train combination, refused (naming the stage) before any model loads or file is written."""
    for stage in stage_recipes(recipe):
        try:
            check_recipe(stage)
        except DistillError as err:
            label = stage_label(stage)
            raise DistillError(f"{label}: {err}" if label else str(err)) from None


def prepare_stage(stage: Recipe, *, progress: bool = True) -> None:
    """What a stage trains from, made or completed (each step resumable): its own data's teacher answers, the
    teacher cache, the built student (first stage), preference pairs from the stage's starting student (dpo)."""
    if isinstance(stage, StageRecipe) and stage.own_data:
        generate(stage, progress=progress)
        if is_main_process():  # under torchrun, rank 0 writes what every process then reads
            filter_data(stage)
        barrier()
        recipe_examples(stage)  # a malformed data file fails here, before any model is built or trained
    if uses_teacher_cache(stage):  # resumable: done shards are kept
        capture(stage, progress=progress)
    if is_main_process():
        if stage.student.model is None:
            build_student(stage)
        if stage.method.kind in ("dpo", "kto"):  # resumable: built pairs are kept
            build_preference_data(stage, progress=progress)
    barrier()


def build_preference_data(recipe: Recipe, *, progress: bool = True, stop_after: Optional[int] = None) -> PairStats:
    """`distill pairs`: dpo's preference pairs, or kto's labelled answers, with their reference log-probs."""
    build = build_labelled if recipe.method.kind == "kto" else build_pairs
    return build(recipe, progress=progress, stop_after=stop_after)


def train_stages(recipe: Recipe, *, progress: bool = True, stop_after: Optional[int] = None
                 ) -> Optional[TrainResult]:
    """Prepare and train every stage in order; a stage already trained is skipped, a killed one resumes.

    `stop_after` ends the call after that many steps of the stage it reaches (as a kill would; None is returned).
    """
    stages, result = stage_recipes(recipe), None
    for stage in stages:
        if isinstance(stage, StageRecipe):
            log.info("stage %d of %d: %s (method.kind %s, %d steps)", stage.stage_index + 1, len(stages),
                     stage.stage, stage.method.kind, stage.train.steps)
        prepare_stage(stage, progress=progress)
        result = train(stage, progress=progress, stop_after=stop_after)
        if result is None:
            return None
    return result
