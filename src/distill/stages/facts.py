"""What every stage derives from a recipe, decided here once: device, dtypes, cache use, models and teacher backends.

Before this module the teacher's dtype was worked out three ways (capture, live KD and eval could run the same
teacher in different dtypes); now `teacher_dtype` is the one rule and every stage loads the teacher through
`load_teacher`.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.errors import DistillError
from distill.models import load_model, load_tokenizer, resolve_model_path
from distill.recipe import GenerationTeacherSpec, Recipe, StageRecipe, TeacherSpec
from distill.rundir import RunDir
from distill.runtime import resolve_device, resolve_dtype
from distill.signals.provenance import files_fingerprint
from distill.teachers.backend import TeacherBackend
from distill.teachers.local import LocalBackend
from distill.teachers.openai_client import OpenAIBackend
from distill.teachers.vllm_backend import VLLMBackend

log = logging.getLogger("distill")

AnyTeacherSpec = Union[TeacherSpec, GenerationTeacherSpec]


def run_files(recipe: Recipe) -> RunDir:
    """The recipe's run directory and every artifact path in it (a training stage's own, for a stage's recipe)."""
    files = RunDir(recipe.run_dir)
    return recipe.stage_files(files) if isinstance(recipe, StageRecipe) else files


def device(recipe: Recipe) -> torch.device:
    """Where every model of the run lives (train.device; auto = CUDA when present)."""
    return resolve_device(recipe.train.device)


def compute_dtype(recipe: Recipe) -> torch.dtype:
    """The student's compute dtype (train.dtype; auto = bf16 on GPUs that support it, else fp32)."""
    return resolve_dtype(recipe.train.dtype, device(recipe))


def teacher_dtype(recipe: Recipe, spec: Optional[AnyTeacherSpec] = None) -> torch.dtype:
    """The one rule for a local teacher's dtype: its own `dtype`, and `auto` follows train.dtype.

    Generation, capture, live KD and eval all load the teacher with it, so the cache holds exactly the
    log-probs live KD would compute.
    """
    spec = spec or recipe.teacher
    if spec.dtype == "auto":
        return compute_dtype(recipe)
    return resolve_dtype(spec.dtype, device(recipe))


def uses_teacher_cache(recipe: Recipe) -> bool:
    """KD from teacher.cache (top-k log-probs captured once) instead of a live teacher (on_policy never: a cache
    cannot score new samples)."""
    return recipe.method.kind == "kd" and recipe.teacher.cache is not None


def needs_teacher_weights(recipe: Recipe) -> bool:
    """Live KD needs the teacher's logits; a new student is built from the teacher's weights or vocab and positions."""
    live = recipe.method.learns_from_teacher_logits and not uses_teacher_cache(recipe) and not scores_on_server(recipe)
    return live or recipe.student.built_from_teacher


def scores_on_server(recipe: Recipe) -> bool:
    """On-policy distillation from teacher.endpoint: the server scores the student's samples (no local teacher)."""
    return recipe.method.kind == "on_policy" and recipe.teacher.endpoint is not None


def captures_at_generation(recipe: Recipe) -> bool:
    """Does the generate stage keep the teacher's top-k log-probs for the cache (generate.capture_topk)?"""
    wanted = recipe.generate.capture_topk
    if wanted is None:
        wanted = recipe.teacher.endpoint is None and uses_teacher_cache(recipe)
    return bool(wanted)


def cache_path(recipe: Recipe) -> Path:
    """teacher.cache, else <run>/teacher_cache (where `distill capture` writes without one)."""
    return recipe.path(recipe.teacher.cache) if recipe.teacher.cache else run_files(recipe).teacher_cache


def model_ref(recipe: Recipe, model: str) -> str:
    """A model reference with local relative paths resolved against the recipe's directory."""
    if "://" in model:
        return model
    local = recipe.path(model)
    return str(local) if local.exists() or model.startswith((".", "/", "~")) else model


def model_source(recipe: Recipe, spec) -> tuple[str, Optional[str]]:
    """(local dir or hub id, gguf file) of a recipe's teacher, student or generation-teacher spec."""
    return resolve_model_path(model_ref(recipe, spec.model), spec.gguf_file)


def teacher_id(recipe: Recipe) -> str:
    """The recipe's teacher as a reference: resolved path or hub id, plus the .gguf file when named."""
    ref = model_ref(recipe, recipe.teacher.model)
    return ref + (f"#{recipe.teacher.gguf_file}" if recipe.teacher.gguf_file else "")


def teacher_files(recipe: Recipe) -> str:
    """A fingerprint of the local teacher's weight files (its .gguf or *.safetensors); "" for a hub id."""
    path, gguf = model_source(recipe, recipe.teacher)
    local = Path(path)
    if gguf is not None:
        files = [local / gguf] if local.is_dir() else []
    else:
        files = sorted(local.glob("*.safetensors")) if local.is_dir() else []
    return files_fingerprint([f for f in files if f.is_file()])


def teacher_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    """The teacher's tokenizer: the student is trained on it too."""
    with named_by("teacher.model"):
        path, gguf = model_source(recipe, recipe.teacher)
        return load_tokenizer(path, gguf, trust_remote_code=recipe.teacher.trust_remote_code)


def load_teacher(recipe: Recipe, spec: Optional[AnyTeacherSpec] = None) -> PreTrainedModel:
    """A frozen local teacher (eval mode, no gradients) on the run's device, in `teacher_dtype`."""
    spec = spec or recipe.teacher
    with named_by(model_key(recipe, spec)):
        path, gguf = model_source(recipe, spec)
        teacher = load_model(path, gguf, dtype=teacher_dtype(recipe, spec), device=device(recipe),
                             trust_remote_code=spec.trust_remote_code)
    return teacher.eval().requires_grad_(False)


def model_key(recipe: Recipe, spec) -> str:
    """The recipe key that names a spec's model: teacher.model, student.model, generate.teachers[i].model or
    method.teachers[i].model."""
    if spec is recipe.teacher:
        return "teacher.model"
    if spec is recipe.student:
        return "student.model"
    found = [i for i, t in enumerate(recipe.generate.teachers) if t is spec]
    scoring = [i for i, t in enumerate(recipe.method.teachers) if t is spec]
    if scoring:
        return f"method.teachers[{scoring[0]}].model"
    return f"generate.teachers[{found[0]}].model" if found else "model"


@contextmanager
def named_by(key: str) -> Iterator[None]:
    """Prefix a DistillError raised inside with the recipe key that named the model (one line says where to look)."""
    try:
        yield
    except DistillError as err:
        if str(err).startswith(key):
            raise
        raise DistillError(f"{key}: {err}") from None


def teacher_backend(
    recipe: Recipe, spec: Optional[AnyTeacherSpec] = None, *, tokenizer_needed: bool = False
) -> TeacherBackend:
    """A teacher as a text generator: an OpenAI-compatible server (spec.endpoint), vLLM, or local weights.

    `spec` is recipe.teacher (the default) or one of generate.teachers; `tokenizer_needed` gives a served teacher
    the recipe teacher's tokenizer, to turn returned top_logprobs back into token ids.
    """
    t = spec or recipe.teacher
    if t.endpoint is not None:
        return OpenAIBackend(t.endpoint, t.model, api_key_env=t.api_key_env, concurrency=t.concurrency,
                             timeout_s=t.timeout_s, max_retries=t.max_retries, name=t.model,
                             tokenizer=teacher_tokenizer(recipe) if tokenizer_needed else None)
    if getattr(t, "engine", "transformers") == "vllm":  # generate.teachers have no engine key
        return _vllm_backend(recipe, t)
    if t is recipe.teacher:
        tokenizer = teacher_tokenizer(recipe)
    else:
        path, gguf = model_source(recipe, t)
        tokenizer = load_tokenizer(path, gguf, trust_remote_code=t.trust_remote_code)
    return LocalBackend(load_teacher(recipe, t), tokenizer, name=t.model, batch_size=recipe.generate.batch_size)


def judge_backend(
    recipe: Recipe, *, model: Optional[str], endpoint: Optional[str] = None, api_key_env: Optional[str] = None,
    batch_size: int = 8, loaded_teacher: Optional[PreTrainedModel] = None,
) -> TeacherBackend:
    """A judge (filter.judge, eval.judge): its own server or local model, else the recipe's teacher.

    With no model and no endpoint of its own the judge is the teacher: its server when served, else
    `loaded_teacher` when a stage already holds it, else the teacher loaded anew.
    """
    if endpoint is not None:
        return OpenAIBackend(endpoint, model or recipe.teacher.model, api_key_env=api_key_env)
    if model is not None:
        return LocalBackend(load_model(model), load_tokenizer(model), name=model, batch_size=batch_size)
    if loaded_teacher is not None and recipe.teacher.endpoint is None:
        return LocalBackend(loaded_teacher, teacher_tokenizer(recipe), name=recipe.teacher.model,
                            batch_size=batch_size)
    return teacher_backend(recipe)


def _vllm_backend(recipe: Recipe, t: TeacherSpec) -> VLLMBackend:
    """A local teacher on vLLM's offline engine; a GGUF teacher is given to it as its .gguf file."""
    path, gguf = model_source(recipe, t)  # resolves relative paths (model_ref) and pkg://
    if gguf is not None:
        path = str(Path(path) / gguf) if Path(path).is_dir() else _hub_file(path, gguf)
    # vLLM refuses requests for more log-probs than the engine allows (20 by default); a cache keeps cache_k.
    dtype = str(teacher_dtype(recipe, t)).removeprefix("torch.")  # the one dtype rule, as vLLM names dtypes
    return VLLMBackend(path, name=t.model, batch_size=recipe.generate.batch_size, dtype=dtype, seed=recipe.seed,
                       trust_remote_code=t.trust_remote_code, max_logprobs=max(20, recipe.teacher.cache_k))


def _hub_file(repo: str, filename: str) -> str:
    """A .gguf file of a hub repo, downloaded (or found in the cache): vLLM loads GGUF only from a local file."""
    from huggingface_hub import hf_hub_download  # only for vLLM with a hub GGUF teacher

    try:
        return hf_hub_download(repo, filename)
    except Exception as err:  # offline, no such repo or file: one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DistillError(f"teacher.gguf_file: could not fetch {filename} from {repo} ({reason})") from None
