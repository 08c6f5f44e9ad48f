"""Export a run's student (or any HF model directory) as a clean Hugging Face directory with a model card."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from distill.errors import DistillError
from distill.models import load_model, load_tokenizer, resolve_model_path, save_model, student_config_summary
from distill.models.weight_files import check_gguf
from distill.report.table import format_table
from distill.runtime import atomic_directory, atomic_write_json, atomic_write_text, remove_stale_temporaries
from distill.version import __version__

CARD_TAGS = ["distill", "knowledge-distillation"]
# The hub rejects a base_model that is not `org/name`; a local teacher is named in the card's text only.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf(source: Path, out_dir: Path) -> Path:
    """Write source's student (a run directory) or model (an HF directory) to out_dir with a model card."""
    source, out_dir = Path(source), Path(out_dir)
    model_dir = model_dir_of(source)
    _check_out_dir(source, out_dir)
    is_run = model_dir != source
    recipe = _read_yaml(source / "recipe.yaml") if is_run else None
    report = _read_json(source / "report.json") if is_run else None
    pruning = _read_json(source / "student_init" / "pruning.json") if is_run else None
    model = load_model(str(model_dir), dtype=_saved_dtype(model_dir))
    tokenizer = load_tokenizer(str(model_dir))
    teacher = (recipe or {}).get("teacher") or {}
    card = model_card(student_config_summary(model), recipe=recipe, report=report, pruning=pruning,
                      teacher_license=_teacher_license(teacher.get("model"), teacher.get("gguf_file")),
                      source=source)
    remove_stale_temporaries(out_dir.parent, out_dir.name)  # what a killed export of this folder left
    with atomic_directory(out_dir) as tmp:
        save_model(model, tokenizer, tmp)  # replaces tmp itself; out_dir appears only when all is written
        atomic_write_text(tmp / "README.md", card)
        if report is not None:
            shutil.copyfile(source / "report.json", tmp / "report.json")
        atomic_write_json(tmp / "distill_export.json", {
            "source": str(source.resolve()), "kind": "run" if is_run else "model", "format": "hf",
            "distill_version": __version__,
        })
    return out_dir


def model_dir_of(source: Path) -> Path:
    """The HF directory to export: <run>/student for a run directory, source itself for a model directory; its
    safetensors are checked whole (every export format reads them)."""
    from distill.models.weight_files import check_model_dir  # distill.models pulls in transformers

    model_dir = _model_dir(source)
    check_model_dir(model_dir)
    return model_dir


def _model_dir(source: Path) -> Path:
    if not source.is_dir():
        raise DistillError(f"{source}: not found (expected a run directory or a model directory)")
    if (source / "recipe.yaml").is_file():
        student = source / "student"
        if not (student / "config.json").is_file():
            raise DistillError(f"{source}: run has no trained student in {student}; run `distill train` first")
        return student
    if (source / "config.json").is_file():
        return source
    raise DistillError(f"{source}: neither a run directory (recipe.yaml, student/) nor a model directory "
                       "(config.json)")


def _check_out_dir(source: Path, out_dir: Path) -> None:
    # Writing replaces out_dir: it must not be the source or hold it.
    resolved = out_dir.resolve()
    if resolved == source.resolve() or resolved in source.resolve().parents:
        raise DistillError(f"--out {out_dir}: would replace the source {source}; choose another directory")


def _read_yaml(path: Path) -> Optional[dict]:
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError as err:
        raise DistillError(f"{path}: not valid YAML ({getattr(err, 'problem', err)})") from None


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError as err:
        raise DistillError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def _saved_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the weights were saved in: exporting must not widen bf16 weights to fp32."""
    config = _read_json(model_dir / "config.json") or {}
    return _DTYPES.get(config.get("dtype") or config.get("torch_dtype"), torch.float32)


def _teacher_license(teacher: Optional[str], gguf_file: Optional[str]) -> Optional[str]:
    """The teacher's licence from its local README front matter or GGUF metadata; None when unknown."""
    if not teacher:
        return None
    try:
        path, gguf = resolve_model_path(teacher, gguf_file)
    except DistillError:  # moved since the run, or a reference we cannot resolve offline
        return None
    if not Path(path).is_dir():  # a hub id: its card is not on disk
        return None
    if gguf is not None:
        return _gguf_license(Path(path) / gguf)
    return _readme_license(Path(path) / "README.md")


def _readme_license(readme: Path) -> Optional[str]:
    """`license:` from a model card's YAML front matter."""
    if not readme.is_file():
        return None
    parts = readme.read_text(errors="replace").split("---")
    try:
        meta = yaml.safe_load(parts[1]) if len(parts) >= 3 and not parts[0].strip() else None
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def _gguf_license(path: Path) -> Optional[str]:
    from gguf import GGUFReader


    try:
        check_gguf(path)  # GGUFReader fails in many ways on a damaged file
        field = GGUFReader(path).fields.get("general.license")
    except (OSError, ValueError, DistillError):
        return None
    return str(field.contents()) if field is not None else None


# ---------------------------------------------------------------------------------------------- model card


def model_card(
    shape: dict,
    *,
    recipe: Optional[dict] = None,
    report: Optional[dict] = None,
    pruning: Optional[dict] = None,
    teacher_license: Optional[str] = None,
    source: Path | str = "",
) -> str:
    """README.md for an exported student: YAML front matter, then what it is, training, evaluation, licence."""
    teacher = ((recipe or {}).get("teacher") or {}).get("model")
    sections = [
        _front_matter(teacher, teacher_license),
        f"# {_title(recipe, teacher)}\n",
        _what_it_is(shape, recipe, report, pruning, teacher, source),
        _training(recipe),
        _evaluation(report),
        _licence(teacher, teacher_license, recipe),
    ]
    return "\n".join(sections)


def _title(recipe: Optional[dict], teacher: Optional[str]) -> str:
    if recipe is None:
        return "Model exported by distill"
    return f"Distilled student of {teacher}" if teacher else "Distilled student"


def _front_matter(teacher: Optional[str], teacher_license: Optional[str]) -> str:
    meta: dict[str, Any] = {"library_name": "transformers", "license": teacher_license or "other"}
    if teacher and _HUB_ID.match(teacher) and not Path(teacher).exists():
        meta["base_model"] = teacher
    meta["tags"] = CARD_TAGS
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n"


def _teacher_params(report: Optional[dict], pruning: Optional[dict]) -> Optional[int]:
    return ((report or {}).get("teacher") or {}).get("params") or (pruning or {}).get("teacher_params")


def _what_it_is(shape: dict, recipe, report, pruning, teacher, source) -> str:
    params = shape["params"]
    teacher_params = _teacher_params(report, pruning)
    share = f" ({100 * params / teacher_params:.1f}% of the teacher's {teacher_params / 1e6:.2f}M)" \
        if teacher_params else ""
    shape_text = ", ".join(f"{k} {v}" for k, v in shape.items() if k != "params")
    lines = ["## What it is", "",
             f"A causal language model with {params / 1e6:.2f}M parameters{share}; shape: {shape_text}.", "",
             _how_made(recipe, pruning, teacher, source), ""]
    return "\n".join(lines)


def _how_made(recipe: Optional[dict], pruning: Optional[dict], teacher: Optional[str], source) -> str:
    if recipe is None:
        return f"Exported by distill from the model directory `{source}`; no run directory, so no training record."
    if pruning is not None:
        t, s = pruning["teacher_shape"], pruning["student_shape"]
        widths = [f"{k} {t[k]} -> {s[k]}" for k in ("hidden", "intermediate", "heads", "kv_heads") if t[k] != s[k]]
        return (f"Cut out of the teacher `{teacher}` by distill: kept layers {pruning['keep_layers']} of "
                f"{t['layers']}; widths: {', '.join(widths) or 'unchanged'}. Then trained by distillation.")
    student = recipe.get("student") or {}
    if student.get("model"):
        return f"Started from the existing model `{student['model']}`, then trained by distillation from `{teacher}`."
    origin = f"the preset `{student['preset']}`" if student.get("preset") else "a new configuration"
    embeddings = student.get("init_embeddings", "project")
    return (f"Built from {origin} on the teacher's tokenizer (embeddings: {embeddings}), "
            f"then trained by distillation from `{teacher}`.")


def _training(recipe: Optional[dict]) -> str:
    if recipe is None:
        return "## Training\n\nUnknown: exported from a plain model directory.\n"
    method, train = recipe.get("method") or {}, recipe.get("train") or {}
    if method.get("kind") == "sft":
        objective = "SFT: cross-entropy on the teacher's answers"
    elif method.get("kind") == "on_policy":
        objective = (f"on-policy distillation: the student samples answers (for a share lmbda = "
                     f"{method.get('lmbda')} of batches) and D = {method.get('divergence')} to the teacher on them "
                     f"({method.get('estimator')} estimator)")
    else:
        objective = (f"KD: `alpha * CE + (1 - alpha) * T^2 * D(teacher || student)` with D = "
                     f"{method.get('divergence')}, alpha = {method.get('alpha')}, T = {method.get('temperature')}")
    batch = train.get("batch_size")
    if (train.get("grad_accum") or 1) > 1:
        batch = f"{batch} x {train['grad_accum']} accumulation steps"
    lora = train.get("lora")
    rows = [
        f"- objective: {objective}",
        f"- steps: {train.get('steps')}, batch: {batch}, learning rate: {train.get('lr')} "
        f"({train.get('schedule')} schedule, {train.get('warmup_steps')} warm-up steps)",
        f"- LoRA r = {lora.get('r')}, merged into the weights" if lora else "- all weights trained",
        f"- data: {', '.join(_data_paths(recipe)) or 'not recorded'}",
    ]
    return "## Training\n\n" + "\n".join(rows) + "\n"


def _data_paths(recipe: dict) -> list[str]:
    data = recipe.get("data") or {}
    return [str(data[k]) for k in ("train", "prompts") if data.get(k)]


def _evaluation(report: Optional[dict]) -> str:
    if report is None:
        return "## Evaluation\n\nNo report: run `distill eval` on the run directory, then export again.\n"
    meta = report.get("meta") or {}
    examples = f" on {meta['eval_examples']} held-out examples" if meta.get("eval_examples") else ""
    return (f"## Evaluation\n\nTeacher and student measured the same way{examples} (↑ higher is better, "
            f"↓ lower is better; `report.json` beside this card has every value):\n\n"
            f"```\n{format_table(report)}```\n")


def _licence(teacher: Optional[str], teacher_license: Optional[str], recipe: Optional[dict]) -> str:
    lines = ["## Licence", ""]
    if teacher:
        data = ", ".join(f"`{p}`" for p in _data_paths(recipe or {})) or "(not recorded)"
        lines.append(f"The student inherits the terms of its teacher `{teacher}` and of its training data {data}.")
    if teacher_license is None:
        lines.append("The licence could not be determined from the files at hand (`license: other`); "
                     "check the terms of the model it came from before use.")
    return "\n".join(lines) + "\n"
