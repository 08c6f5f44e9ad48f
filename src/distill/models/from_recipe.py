"""Teacher, student and tokenizer as a recipe describes them."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.recipe import Recipe

log = logging.getLogger("distill")

STUDENT_INIT = "student_init"
BUILT_MARKER = "distill_student.json"


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
    """The student before training: an existing model, or the one built_student() made from the teacher."""
    from distill.models import load_model

    spec = recipe.student
    if spec.model is not None:
        path, gguf = model_source(recipe, spec)
        return load_model(path, gguf, dtype=dtype, device=device, trust_remote_code=spec.trust_remote_code)
    return load_model(str(built_student(recipe, teacher, tokenizer)), None, dtype=dtype, device=device)


def student_init_dir(recipe: Recipe) -> Path:
    """Where a run keeps the student it built before training (cut from the teacher, or new)."""
    return recipe.run_dir / STUDENT_INIT


def _fingerprint(recipe: Recipe) -> dict:
    """What decides a built student: a saved one is reused only while these are unchanged."""
    dump = recipe.model_dump(mode="json")
    return {"teacher": dump["teacher"], "student": dump["student"], "seed": recipe.seed}


def built_student(
    recipe: Recipe, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path | None = None
) -> Path:
    """Build the recipe's new student (from_teacher, config or preset) into out_dir, or reuse the one there."""
    from distill.models import build_student, save_model, student_config_summary
    from distill.models.presets import preset_config
    from distill.runtime import atomic_write_json

    out_dir = out_dir or student_init_dir(recipe)
    marker = out_dir / BUILT_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("recipe") == _fingerprint(recipe):
        log.info("student: reusing %s\n%s", out_dir, describe_built_student(out_dir, teacher))
        return out_dir
    spec = recipe.student
    report = None
    if spec.from_teacher is not None:
        from distill.models.prune import prune_from_recipe

        student, report = prune_from_recipe(recipe, teacher, tokenizer)
    else:
        config = spec.config or preset_config(spec.preset)
        student = build_student(config, teacher, tokenizer, init_embeddings=spec.init_embeddings, seed=recipe.seed)
    save_model(student.float(), tokenizer, out_dir)
    if report is not None:
        atomic_write_json(out_dir / "pruning.json", report.to_json())
    # Written last: a directory without it (a kill mid-way) is rebuilt, never half-trusted.
    atomic_write_json(marker, {"recipe": _fingerprint(recipe), "shape": student_config_summary(student)})
    log.info("%s", describe_built_student(out_dir, teacher))
    return out_dir


def describe_built_student(path: Path, teacher) -> str:
    """A few lines: parameter count and share of the teacher, shape, and for a cut student what was cut."""
    from distill.models import count_params
    from distill.models.prune import PruneReport

    pruning = path / "pruning.json"
    if pruning.is_file():
        report = PruneReport(**json.loads(pruning.read_text()))
        lines = [report.summary()]
        if report.layer_importance:
            scores = ", ".join(f"{k}:{v:.3f}" for k, v in report.layer_importance.items())
            lines.append(f"layer importance ({report.layer_importance_method}, higher = kept first): {scores}")
        return "\n".join(lines)
    shape = json.loads((path / "distill_student.json").read_text())["shape"]
    share = 100 * shape["params"] / count_params(teacher)
    return (f"student: {shape['params'] / 1e6:.2f}M parameters ({share:.1f}% of the teacher's); shape: "
            + ", ".join(f"{k} {v}" for k, v in shape.items() if k != "params"))


def trained_student_dir(recipe: Recipe) -> Path:
    """Where the train stage saves the final student."""
    return recipe.run_dir / "student"
