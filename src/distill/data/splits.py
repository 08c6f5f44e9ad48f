"""The training and held-out examples of a recipe, the same for the train and eval stages."""
from __future__ import annotations

from pathlib import Path

from distill.errors import DistillError
from distill.recipe import Recipe

TEACHER_DATA = "teacher_data"


def teacher_data_path(recipe: Recipe) -> Path:
    """Where the generate stage writes the teacher's answers (a directory of JSONL shards)."""
    return recipe.run_dir / TEACHER_DATA


def filtered_data_path(recipe: Recipe) -> Path:
    """Where the filter stage writes the teacher answers that pass recipe.filter (its report beside it)."""
    return recipe.run_dir / "teacher_data.filtered.jsonl"


def planned_ids(recipe: Recipe) -> list[str]:
    """The content addresses of the answers this recipe asks its teacher(s) for (prompts x samples)."""
    from distill.teachers.from_recipe import generation_settings, teacher_assignments
    from distill.teachers.generate import plan_requests

    params, reasoning = generation_settings(recipe)
    ids = []
    for spec, prompts in teacher_assignments(recipe):
        ids += [r.id for r in plan_requests(prompts, spec.model, params, recipe.generate.samples,
                                            recipe.data.system_prompt, reasoning)]
    return ids


def recipe_examples(recipe: Recipe) -> tuple[list, list]:
    """Return (train, eval) examples: teacher answers and/or data.train, split unless data.eval is given."""
    from distill.data.examples import load_teacher_data, read_examples, split_train_eval

    examples = []
    if recipe.data.prompts is not None:
        path = teacher_data_path(recipe)
        if not path.is_dir():
            raise DistillError(f"{path}: no teacher data yet; run `distill generate` (or `distill run`) first")
        if recipe.filter is not None:
            path = filtered_data_path(recipe)
            if not path.is_file():
                raise DistillError(f"{path}: the recipe filters its teacher data; run `distill filter` first")
        examples += load_teacher_data(path, ids=planned_ids(recipe))
    if recipe.data.train is not None:
        examples += read_examples(recipe.path(recipe.data.train))
    if not examples:
        raise DistillError("recipe data: no training examples")
    if recipe.data.eval is not None:
        held_out = read_examples(recipe.path(recipe.data.eval))[: recipe.data.max_eval_examples]
        return examples, held_out
    return split_train_eval(examples, recipe.data.eval_fraction, recipe.seed, recipe.data.max_eval_examples)
