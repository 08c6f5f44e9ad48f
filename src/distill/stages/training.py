"""The train stage: models, data, teacher signal, optimizer and resume state from the recipe, then the loop."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.data.packing import check_packing_support, collate_packed, fill_ratio, pack_examples
from distill.data.tokenize import collate, padding_id
from distill.errors import DistillError
from distill.losses.hidden import HiddenStateMatcher, check_layer_map, default_layer_map
from distill.losses.objective import LossSettings
from distill.models import check_tokenizers, count_params, load_tokenizer, save_model
from distill.models.heads import base_model, decoder_layers
from distill.recipe import MethodSpec, Recipe
from distill.runtime import set_seed
from distill.signals.cache import dataset_hash, example_hash, read_header
from distill.signals.reader import TeacherCacheReader, open_teacher_cache
from distill.signals.teacher_signal import (
    HIDDEN_WITH_CACHE,
    PACKING_WITH_CACHE,
    CachedTeacher,
    LiveTeacher,
    TeacherSignal,
)
from distill.stages.cross_tokenizer import Crossing, crossing, crossing_signal
from distill.stages.data import TrainingSet, encode, recipe_examples
from distill.stages.facts import (
    cache_path,
    compute_dtype,
    device,
    load_teacher,
    model_source,
    needs_teacher_weights,
    run_files,
    teacher_files,
    teacher_id,
    teacher_tokenizer,
    uses_teacher_cache,
)
from distill.stages.student import initial_student
from distill.training.checkpoint import STEP_PREFIX, list_checkpoints, load_checkpoint
from distill.training.loop import LoopSettings, MetricsLog, Training, check_finite, last_logged_loss, run_loop
from distill.training.schedule import lr_multiplier
from distill.training.step import BatchObjective

log = logging.getLogger("distill")


@dataclass
class TrainResult:
    """What a finished training call made: the student's directory, its steps, last loss and seconds."""

    student_dir: Path
    steps: int
    final_loss: float
    seconds: float


def train(
    recipe: Recipe, *, resume: bool = True, progress: bool = True, stop_after: Optional[int] = None
) -> Optional[TrainResult]:
    """Train the recipe's student, continuing from the newest checkpoint in <run>/checkpoints when resuming.

    `stop_after` ends this call after that many completed steps (checkpointing first), as a kill would;
    it returns None then and a later call resumes.
    """
    _check_recipe(recipe)  # before any model is loaded
    files = run_files(recipe)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    set_seed(recipe.seed)
    checkpoints = list_checkpoints(files.checkpoints) if resume else []
    finished = _finished_student(recipe, checkpoints)
    if finished is not None:
        return finished
    training, start = setup(recipe, checkpoints[-1] if checkpoints else None)
    began = time.perf_counter()
    last = run_loop(training, start, stop_after=stop_after, progress=progress)
    if last is None:
        return None
    if start == recipe.train.steps:  # nothing left to train: the loss is the one logged last
        last = last_logged_loss(files.metrics)
    check_finite(training.student)
    save_model(training.student, training.tokenizer, files.student)  # the matcher's projections stay behind
    seconds = time.perf_counter() - began
    log.info("student saved to %s (%d steps, final loss %.4f, %.0f s)", files.student, recipe.train.steps, last,
             seconds)
    return TrainResult(student_dir=files.student, steps=recipe.train.steps, final_loss=last, seconds=seconds)


def setup(recipe: Recipe, checkpoint: Optional[Path]) -> tuple[Training, int]:
    """Everything the loop needs, from the recipe, resumed from `checkpoint` when given; and the step to start at."""
    t, files = recipe.train, run_files(recipe)
    examples, held_out = recipe_examples(recipe)  # a malformed data file fails before any model is built
    tokenizer, teacher, student, cross = _models(recipe)
    if t.packing:
        for model, name in ((student, "student"), (teacher, "teacher")):
            if model is not None:
                check_packing_support(model, name)
    data = TrainingSet(examples, held_out, encode(recipe, examples, tokenizer))
    if cross is None:
        signal = teacher_signal(recipe, teacher, tokenizer, data.encoded)
    else:
        signal = crossing_signal(recipe, cross, teacher, student.config.vocab_size, data)
    items, to_batch = _batch_items(recipe, data)
    if t.lora is not None:
        student = _apply_lora(student, recipe)
    student.train()
    matcher = hidden_matcher(recipe, student, teacher)
    # Student parameters first, so the optimizer state's layout is the same as without method.hidden.
    trainable = [p for p in student.parameters() if p.requires_grad]
    trainable += list(matcher.parameters()) if matcher is not None else []
    optimizer = _optimizer(trainable, recipe)
    factor = lr_multiplier(t.schedule, total_steps=t.steps, warmup_steps=t.warmup_steps,
                           min_ratio=t.min_lr_ratio, decay_fraction=t.decay_fraction)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    start, data_hash = 0, training_set_hash(data)
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, student, optimizer, scheduler, matcher, data_hash)
        log.info("resumed from %s (step %d of %d)", checkpoint, start, t.steps)
    settings = LoopSettings(steps=t.steps, batch_size=t.batch_size, grad_accum=t.grad_accum, seed=recipe.seed,
                            max_grad_norm=t.max_grad_norm, log_every=t.log_every, checkpoint_every=t.checkpoint_every,
                            keep_checkpoints=t.keep_checkpoints, nan_tolerance=t.nan_tolerance,
                            training_set=data_hash)
    training = Training(
        student=student, tokenizer=tokenizer, signal=signal, matcher=matcher, objective=batch_objective(recipe.method),
        compute_dtype=compute_dtype(recipe), device=device(recipe), items=items, to_batch=to_batch,
        pad_id=padding_id(tokenizer), trainable=trainable, optimizer=optimizer, scheduler=scheduler,
        checkpoint_dir=files.checkpoints,
        metrics=MetricsLog(files.metrics, start, files.tensorboard), settings=settings,
    )
    return training, start


def _batch_items(recipe: Recipe, data: TrainingSet) -> tuple[list, object]:
    """What batches draw from: encoded examples, or with train.packing rows of several examples."""
    if not recipe.train.packing:
        return data.encoded, collate
    length = recipe.data.max_length
    rows = pack_examples(data.encoded, length, recipe.seed)
    log.info("packing: %d examples in %d rows of %d tokens (%.0f%% filled)", len(data.encoded), len(rows), length,
             100 * fill_ratio(rows, length))
    return rows, collate_packed


def batch_objective(m: MethodSpec) -> BatchObjective:
    """The recipe's method section as the loss every micro-batch takes."""
    loss = LossSettings(divergence=m.divergence, temperature=m.temperature, alpha=m.alpha, beta=m.beta, skew=m.skew,
                        chunk_size=m.chunk_size)
    return BatchObjective(loss, kd=m.kind == "kd", hidden_weight=m.hidden.weight if m.hidden is not None else None)


def training_set_hash(data: TrainingSet) -> str:
    """One hash of every encoded training example: checkpoints keep it, so a resume on other data is refused."""
    return dataset_hash([example_hash(e.input_ids, e.labels) for e in data.encoded])


def _finished_student(recipe: Recipe, checkpoints: list[Path]) -> Optional[TrainResult]:
    """The saved student when its last step is already trained: a re-run neither loads models nor re-saves it
    (re-saving would make every export look older than the student)."""
    files = run_files(recipe)
    if not checkpoints or int(checkpoints[-1].name[len(STEP_PREFIX):]) != recipe.train.steps:
        return None
    saved = (files.student / "config.json").is_file()
    if not saved or files.student.stat().st_mtime < checkpoints[-1].stat().st_mtime:
        return None  # killed between the last checkpoint and saving the student: save it again
    log.info("student already trained (%d steps): %s", recipe.train.steps, files.student)
    return TrainResult(student_dir=files.student, steps=recipe.train.steps, final_loss=last_logged_loss(files.metrics),
                       seconds=0.0)


def teacher_signal(
    recipe: Recipe, teacher: Optional[PreTrainedModel], tokenizer: PreTrainedTokenizerBase, encoded: list
) -> Optional[TeacherSignal]:
    """The recipe's teacher signal, built once: its teacher.cache, the live teacher, or None (SFT)."""
    if uses_teacher_cache(recipe):
        reader = open_recipe_cache(recipe, tokenizer, encoded)
        log.info("teacher: top-%d cache %s (the teacher is not run)", reader.cache.header.k, reader.cache.path)
        return CachedTeacher(reader)
    return LiveTeacher(teacher) if teacher is not None else None


def open_recipe_cache(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, encoded: list) -> TeacherCacheReader:
    """The recipe's teacher cache for these encoded examples, refused unless it is complete and theirs."""
    return open_teacher_cache(cache_path(recipe), teacher_id(recipe), tokenizer, encoded, teacher_files(recipe))


def hidden_matcher(
    recipe: Recipe, student: torch.nn.Module, teacher: Optional[torch.nn.Module]
) -> Optional[HiddenStateMatcher]:
    """The projections for method.hidden (None when it is off); the map follows how the student was pruned."""
    spec = recipe.method.hidden
    if spec is None:
        return None
    _check_recipe(recipe)
    student_config, teacher_config = _text_config(base_model(student)), _text_config(base_model(teacher))
    pruned_from = getattr(base_model(student).config, "distill_pruned_from", None) or {}
    n_student, n_teacher = len(decoder_layers(student)), len(decoder_layers(teacher))
    if spec.layer_map is not None:
        layer_map = check_layer_map(spec.layer_map, n_student, n_teacher)
    else:
        layer_map = default_layer_map(n_student, n_teacher, pruned_from.get("teacher_layers"))
    matcher = HiddenStateMatcher(
        layer_map, student_config.hidden_size, teacher_config.hidden_size, spec.loss,
        hidden_channels=pruned_from.get("hidden_channels"), seed=recipe.seed,
    )
    log.info("hidden-state KD (%s, weight %g): student->teacher layers %s", spec.loss, spec.weight, layer_map)
    return matcher.to(next(student.parameters()).device)


def _check_recipe(recipe: Recipe) -> None:
    """Combinations the trainer cannot run, refused before any model loads."""
    if recipe.method.hidden is not None and recipe.method.kind != "kd":
        raise DistillError(
            f"method.hidden: hidden-state KD needs the teacher's states (method.kind: kd), "
            f"got method.kind: {recipe.method.kind}"
        )
    if recipe.method.hidden is not None and uses_teacher_cache(recipe):
        raise DistillError(HIDDEN_WITH_CACHE)
    if recipe.train.packing and uses_teacher_cache(recipe):
        raise DistillError(PACKING_WITH_CACHE)


def _text_config(model: torch.nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _optimizer(params: list[torch.nn.Parameter], recipe: Recipe) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases and other 1-D parameters."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    t = recipe.train
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas))


def _apply_lora(model: PreTrainedModel, recipe: Recipe) -> PreTrainedModel:
    lora = recipe.train.lora
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [m for m in lora.target_modules if m in present]
    if not targets:
        raise DistillError(f"train.lora.target_modules: none of {lora.target_modules} exist in the student")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _models(
    recipe: Recipe,
) -> tuple[PreTrainedTokenizerBase, Optional[PreTrainedModel], PreTrainedModel, Optional[Crossing]]:
    """(the student's tokenizer, frozen teacher or None when the loss needs none, fp32 student, the crossing when
    the two tokenizers differ) as the recipe describes them."""
    tokenizer, cross, student, student_tok = teacher_tokenizer(recipe), None, None, None
    if recipe.student.model is not None:  # an existing student (it needs no teacher) and its own tokenizer
        student = initial_student(recipe, None, tokenizer)
        student_tok = load_tokenizer(*model_source(recipe, recipe.student))
        cross = crossing(recipe, tokenizer, student_tok)  # refuses a method that cannot apply, before the teacher
    text_only = cross is not None and not cross.logits
    teacher = load_teacher(recipe) if needs_teacher_weights(recipe) and not text_only else None
    if student is None:
        student = initial_student(recipe, teacher, tokenizer)
    if student_tok is not None:
        if recipe.method.kind == "kd" and cross is None:
            check_tokenizers(tokenizer, student_tok, _teacher_vocab(recipe, teacher), student.config.vocab_size)
        else:
            tokenizer = student_tok
    _log_sizes(student, teacher)
    if recipe.method.kind != "kd" or uses_teacher_cache(recipe):
        teacher = None  # its weights only seeded the student's embeddings
    return tokenizer, teacher, student, cross


def _teacher_vocab(recipe: Recipe, teacher: Optional[PreTrainedModel]) -> int:
    if teacher is not None:
        return teacher.config.vocab_size
    return read_header(cache_path(recipe)).vocab_size


def _log_sizes(student: PreTrainedModel, teacher: Optional[PreTrainedModel]) -> None:
    n = count_params(student)
    share = f" ({100 * n / count_params(teacher):.1f}% of the teacher's)" if teacher is not None else ""
    log.info("student: %.2fM parameters%s", n / 1e6, share)
