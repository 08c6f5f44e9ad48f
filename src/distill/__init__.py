"""distill: turn a large teacher LLM into a small, fast student, with the evidence to prove it.

The Python API mirrors the CLI: every `distill COMMAND recipe.yaml` is a function taking a Recipe.
"""
from __future__ import annotations

from pathlib import Path

from distill.errors import DistillError
from distill.recipe import Recipe, load_recipe
from distill.version import __version__


def _recipe(recipe: Recipe | str | Path, overrides: list[str] | None = None) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)


def run(recipe: Recipe | str | Path, overrides: list[str] | None = None, *, restart: bool = False,
        progress: bool = True) -> dict:
    """`distill run`: generate, train and evaluate; returns the report."""
    from distill import stages

    return stages.run(_recipe(recipe, overrides), restart=restart, progress=progress)


def generate(recipe: Recipe | str | Path, overrides: list[str] | None = None, *, progress: bool = True):
    """`distill generate`: the teacher answers the recipe's prompts."""
    from distill import stages

    r = _recipe(recipe, overrides)
    stages.prepare_run_dir(r)
    return stages.generate(r, progress=progress)


def train(recipe: Recipe | str | Path, overrides: list[str] | None = None, *, progress: bool = True):
    """`distill train`: distil the student, resuming from the newest checkpoint."""
    from distill import stages

    r = _recipe(recipe, overrides)
    stages.prepare_run_dir(r)
    return stages.train(r, progress=progress)


def evaluate(recipe: Recipe | str | Path, overrides: list[str] | None = None, *, progress: bool = True) -> dict:
    """`distill eval`: teacher-vs-student report (also written to <run>/report.json)."""
    from distill import stages

    return stages.evaluate(_recipe(recipe, overrides), progress=progress)


__all__ = ["DistillError", "Recipe", "load_recipe", "run", "generate", "train", "evaluate", "__version__"]
