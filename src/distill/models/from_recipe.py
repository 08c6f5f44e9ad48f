"""Teacher, student and tokenizer as a recipe describes them."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.recipe import Recipe

log = logging.getLogger("distill")


def model_ref(recipe: Recipe, model: str) -> str:
    """A model reference with local relative paths resolved against the recipe's directory."""
    if "://" in model:
        return model
    local = recipe.path(model)
    return str(local) if local.exists() or model.startswith((".", "/", "~")) else model


def model_source(recipe: Recipe, spec) -> tuple[str, str | None]:
    """(local dir or hub id, gguf file) of a recipe's teacher or student spec."""
    from distill.models import resolve_model_path

    return resolve_model_path(model_ref(recipe, spec.model), spec.gguf_file)


def teacher_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    """The teacher's tokenizer: the student is trained on it too."""
    from distill.models import load_tokenizer

    path, gguf = model_source(recipe, recipe.teacher)
    return load_tokenizer(path, gguf, trust_remote_code=recipe.teacher.trust_remote_code)


def load_teacher(recipe: Recipe, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """The frozen teacher: eval mode, no gradients."""
    from distill.models import load_model

    path, gguf = model_source(recipe, recipe.teacher)
    teacher = load_model(path, gguf, dtype=dtype, device=device, trust_remote_code=recipe.teacher.trust_remote_code)
    teacher.eval().requires_grad_(False)
    return teacher


def initial_student(
    recipe: Recipe, teacher: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase,
    device: torch.device, dtype: torch.dtype,
) -> PreTrainedModel:
    """The student before training: an existing model, one cut from the teacher, or a new one from a config."""
    from distill.models import build_student, load_model
    from distill.models.presets import preset_config

    spec = recipe.student
    if spec.model is not None:
        path, gguf = model_source(recipe, spec)
        return load_model(path, gguf, dtype=dtype, device=device, trust_remote_code=spec.trust_remote_code)
    if spec.from_teacher is not None:
        from distill.models.prune import prune_from_recipe

        return prune_from_recipe(recipe, teacher, tokenizer).to(device=device, dtype=dtype)
    config = spec.config or preset_config(spec.preset)
    student = build_student(config, teacher, tokenizer, init_embeddings=spec.init_embeddings, seed=recipe.seed)
    return student.to(device=device, dtype=dtype)


def trained_student_dir(recipe: Recipe) -> Path:
    """Where the train stage saves the final student."""
    return recipe.run_dir / "student"
