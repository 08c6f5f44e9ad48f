"""The student stage: the student as built before training (an existing model, cut from the teacher, or new)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.data.examples import read_examples
from distill.data.layouts import Example
from distill.data.tokenize import example_token_ids
from distill.errors import DistillError
from distill.models import build_student as build_new_student
from distill.models import count_params, load_model, load_tokenizer, save_model, student_config_summary
from distill.models.alignment import shared_vocabulary
from distill.models.prune import PruneReport, calibration_batches, prune_teacher
from distill.recipe import Recipe
from distill.runtime import atomic_write_json
from distill.stages.data import recipe_examples, recipe_prompts
from distill.stages.facts import (
    device,
    load_teacher,
    model_ref,
    model_source,
    named_by,
    run_files,
    teacher_tokenizer,
)
from distill.stages.presets import preset_config

log = logging.getLogger("distill")

BUILT_MARKER = "distill_student.json"


def build_student(recipe: Recipe, *, out_dir: Optional[Path] = None) -> Path:
    """Build the recipe's student (cut from the teacher, or new) and save it, without training."""
    if recipe.student.model is not None:
        raise DistillError("student.model: this recipe trains an existing model; there is no student to build")
    return built_student(recipe, load_teacher(recipe), teacher_tokenizer(recipe), out_dir)


def initial_student(
    recipe: Recipe, teacher: Optional[PreTrainedModel], tokenizer: PreTrainedTokenizerBase
) -> PreTrainedModel:
    """The fp32 student before training: an existing model, or the one built_student() made from the teacher."""
    spec = recipe.student
    if spec.model is not None:
        with named_by("student.model"):
            path, gguf = model_source(recipe, spec)
            return load_model(path, gguf, dtype=torch.float32, device=device(recipe),
                              trust_remote_code=spec.trust_remote_code)
    built = built_student(recipe, teacher, tokenizer)
    return load_model(str(built), None, dtype=torch.float32, device=device(recipe))


def _fingerprint(recipe: Recipe) -> dict:
    """What decides a built student: a saved one is reused only while these are unchanged."""
    dump = recipe.model_dump(mode="json")
    return {"teacher": dump["teacher"], "student": dump["student"], "seed": recipe.seed}


def built_student(
    recipe: Recipe, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Optional[Path] = None
) -> Path:
    """Build the recipe's new student (from_teacher, config or preset) into out_dir, or reuse the one there."""
    out_dir = out_dir or run_files(recipe).student_init
    marker = out_dir / BUILT_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("recipe") == _fingerprint(recipe):
        log.info("student: reusing %s\n%s", out_dir, describe_built_student(out_dir, teacher))
        return out_dir
    spec = recipe.student
    report = None
    own = own_tokenizer(recipe, tokenizer)
    if spec.from_teacher is not None:
        student, report = prune_from_recipe(recipe, teacher, tokenizer)
    elif own is not None:  # a tokenizer of its own: rows of the entries both vocabularies hold start from the teacher's
        student = build_new_student(spec.config or preset_config(spec.preset), teacher, own,
                                    init_embeddings=spec.init_embeddings, seed=recipe.seed,
                                    teacher_rows=_teacher_rows(own, tokenizer))
        student.generation_config.eos_token_id = stop_ids(own, tokenizer,
                                                          getattr(teacher.generation_config, "eos_token_id", None))
        tokenizer = own
    else:
        config = spec.config or preset_config(spec.preset)
        student = build_new_student(config, teacher, tokenizer, init_embeddings=spec.init_embeddings,
                                    seed=recipe.seed)
    save_model(student.float(), tokenizer, out_dir)
    if report is not None:
        atomic_write_json(out_dir / "pruning.json", report.to_json())
    # Written last: a directory without it (a kill mid-way) is rebuilt, never half-trusted.
    atomic_write_json(marker, {"recipe": _fingerprint(recipe), "shape": student_config_summary(student)})
    log.info("%s", describe_built_student(out_dir, teacher))
    return out_dir


def own_tokenizer(recipe: Recipe, teacher_tok: PreTrainedTokenizerBase) -> Optional[PreTrainedTokenizerBase]:
    """student.tokenizer, loaded (with the teacher's chat template under student.chat_template: teacher); None when
    the student uses the teacher's tokenizer."""
    spec = recipe.student
    if spec.tokenizer is None:
        return None
    with named_by("student.tokenizer"):
        tokenizer = load_tokenizer(model_ref(recipe, spec.tokenizer), trust_remote_code=spec.trust_remote_code)
    if spec.chat_template == "teacher":
        _take_teacher_template(tokenizer, teacher_tok)
    return tokenizer


# A conversation the teacher's template renders, to find the special tokens it writes.
_PROBE_CHAT = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
               {"role": "assistant", "content": "A"}]


def _take_teacher_template(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase) -> None:
    """Give the student's tokenizer the teacher's chat template, refused when it lacks the template's markers."""
    template = teacher_tok.chat_template
    if not isinstance(template, str):
        raise DistillError("student.chat_template: teacher, but the teacher's tokenizer has no chat template")
    rendered = teacher_tok.apply_chat_template(_PROBE_CHAT, tokenize=False)
    markers = sorted({t.content for t in teacher_tok.added_tokens_decoder.values() if t.content in rendered})
    missing = [m for m in markers if len(student_tok(m, add_special_tokens=False)["input_ids"]) != 1]
    if missing:
        raise DistillError(f"student.tokenizer: has no token for {', '.join(missing)}, which the teacher's chat "
                           "template writes; use a tokenizer with those special tokens, or student.chat_template: own")
    student_tok.chat_template = template


def _teacher_rows(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase) -> list[int]:
    """For each student id, the teacher id standing for the same bytes (-1 where the teacher has none)."""
    rows = [-1] * len(student_tok)
    for student_id, teacher_id in zip(*shared_vocabulary(student_tok, teacher_tok)):
        if student_id < len(rows):
            rows[student_id] = teacher_id
    log.info("student: %d of %d entries of its own tokenizer start from the teacher's embeddings (same bytes)",
             sum(r >= 0 for r in rows), len(rows))
    return rows


def stop_ids(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase, teacher_eos) -> list[int]:
    """Where a student on its own tokenizer stops: its eos, and the tokens the teacher stops on (`teacher_eos`, an
    id or a list: e.g. an end-of-turn marker) that its vocabulary also holds."""
    vocab = student_tok.get_vocab()
    eos = [] if teacher_eos is None else list(teacher_eos) if isinstance(teacher_eos, (list, tuple)) else [teacher_eos]
    names = [student_tok.eos_token] + [teacher_tok.convert_ids_to_tokens(i) for i in eos]
    return sorted({vocab[n] for n in names if n in vocab})


def describe_built_student(path: Path, teacher) -> str:
    """A few lines: parameter count and share of the teacher, shape, and for a cut student what was cut."""
    pruning = path / "pruning.json"
    if pruning.is_file():
        report = PruneReport(**json.loads(pruning.read_text()))
        lines = [report.summary()]
        if report.layer_importance:
            scores = ", ".join(f"{k}:{v:.3f}" for k, v in report.layer_importance.items())
            lines.append(f"layer importance ({report.layer_importance_method}, higher = kept first): {scores}")
        return "\n".join(lines)
    shape = json.loads((path / BUILT_MARKER).read_text())["shape"]
    share = 100 * shape["params"] / count_params(teacher)
    return (f"student: {shape['params'] / 1e6:.2f}M parameters ({share:.1f}% of the teacher's); shape: "
            + ", ".join(f"{k} {v}" for k, v in shape.items() if k != "params"))


def calibration_token_ids(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of the calibration text: calibration.file, else the training data, else the prompts."""
    calibration = recipe.student.from_teacher.calibration
    data = recipe.data
    if calibration.file is not None:
        examples = read_examples(recipe.path(calibration.file))
    elif data.train is not None or (data.prompts is not None and run_files(recipe).teacher_data.is_dir()):
        examples = recipe_examples(recipe)[0]  # the held-out split stays unseen
    else:  # before the teacher has answered: its prompts still show which parts of the model fire
        examples = [Example(id=p.id, messages=p.messages) for p in recipe_prompts(recipe)]
    ids, budget = [], calibration.samples * calibration.max_length
    for example in examples:
        ids.append(example_token_ids(example, tokenizer, calibration.max_length, data.system_prompt))
        if sum(map(len, ids)) >= budget:
            break
    return ids


def prune_from_recipe(
    recipe: Recipe, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[PreTrainedModel, PruneReport]:
    """The recipe's student.from_teacher cut, calibrated on the recipe's data."""
    calibration = recipe.student.from_teacher.calibration
    batches = calibration_batches(calibration_token_ids(recipe, tokenizer), calibration.samples,
                                  calibration.max_length)
    return prune_teacher(teacher, recipe.student.from_teacher, batches)
