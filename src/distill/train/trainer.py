"""The flat KD/SFT training loop: frozen teacher, student, chunked loss, checkpoints, exact resume."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.errors import DistillError
from distill.losses.objective import LossOutput
from distill.losses.sparse import SparseTargets
from distill.recipe import MethodSpec, Recipe
from distill.runtime import atomic_write_text, resolve_device, resolve_dtype, set_seed
from distill.signals.teacher_signal import (
    HIDDEN_WITH_CACHE,
    PACKING_WITH_CACHE,
    CachedTeacher,
    LiveTeacher,
    TeacherSignal,
    attention_inputs,
)

if TYPE_CHECKING:
    from distill.losses.hidden import HiddenStateMatcher

log = logging.getLogger("distill")


@dataclass
class TrainResult:
    student_dir: Path
    steps: int
    final_loss: float
    seconds: float


def _finished_student(recipe: Recipe, checkpoints: list[Path]) -> Optional[TrainResult]:
    """The saved student when its last step is already trained: a re-run neither loads models nor re-saves it
    (re-saving would make every export look older than the student)."""
    from distill.models.from_recipe import trained_student_dir
    from distill.train.checkpoint import STEP_PREFIX

    out_dir = trained_student_dir(recipe)
    if not checkpoints or int(checkpoints[-1].name[len(STEP_PREFIX):]) != recipe.train.steps:
        return None
    if not (out_dir / "config.json").is_file() or out_dir.stat().st_mtime < checkpoints[-1].stat().st_mtime:
        return None  # killed between the last checkpoint and saving the student: save it again
    log.info("student already trained (%d steps): %s", recipe.train.steps, out_dir)
    return TrainResult(student_dir=out_dir, steps=recipe.train.steps, final_loss=_last_loss(recipe.run_dir),
                       seconds=0.0)


def _last_loss(run_dir: Path) -> float:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    return float(json.loads(lines[-1]).get("loss", float("nan"))) if lines else float("nan")


def needs_teacher_weights(recipe: Recipe) -> bool:
    """Live KD needs the teacher's logits; a new student is built from the teacher's weights or vocab and positions."""
    return (recipe.method.kind == "kd" and not uses_teacher_cache(recipe)) or recipe.student.built_from_teacher


def uses_teacher_cache(recipe: Recipe) -> bool:
    """KD from teacher.cache (top-k log-probs captured once) instead of a live teacher."""
    return recipe.method.kind == "kd" and recipe.teacher.cache is not None


@dataclass
class BatchLoss(LossOutput):
    """LossOutput plus the hidden-state term: detached and unweighted, None when method.hidden is off."""

    hidden: Optional[torch.Tensor] = None


def loss_on_batch(
    student: PreTrainedModel, signal: Optional[TeacherSignal], batch: dict[str, torch.Tensor],
    method: MethodSpec, compute_dtype: torch.dtype = torch.float32,
    matcher: Optional["HiddenStateMatcher"] = None, *, indices: Optional[Sequence[int]] = None,
) -> BatchLoss:
    """The recipe's loss on one micro-batch, without ever holding [batch, seq, vocab] logits.

    `signal` is the teacher: a LiveTeacher (dense logits, chunk by chunk) or a CachedTeacher (the sparse top-k
    rows of the batch's examples, `indices`: the rows of the training examples the batch was drawn from);
    None, or method.kind: sft, trains on the labels alone.
    With a matcher (method.hidden), `method.hidden.weight` times its loss on the block outputs of every real
    token (prompt included, padding not) is added to the logit loss.
    """
    from distill.losses import kd_loss_chunked, kd_loss_sparse_chunked
    from distill.models import output_head
    from distill.models.heads import decoder_layer_outputs

    if matcher is not None and (signal is None or method.kind != "kd" or method.hidden is None):
        raise DistillError("method.hidden: hidden-state KD needs method.hidden set, method.kind: kd and a teacher")
    ids, real = batch["input_ids"], batch["attention_mask"]
    mask, positions = attention_inputs(batch)
    labels = batch["labels"][:, 1:].reshape(-1)  # position i predicts token i+1
    student_layers = matcher.student_layers if matcher is not None else []
    teacher_layers = matcher.teacher_layers if matcher is not None else []
    # Master weights stay fp32; a bf16 compute dtype runs the student's body under autocast.
    with torch.autocast(ids.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        hidden, student_states = decoder_layer_outputs(student, ids, mask, student_layers, positions)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    teacher, teacher_states = None, {}
    if signal is not None and method.kind == "kd":
        teacher, teacher_states = signal.for_batch(batch, indices, teacher_layers)
    loss_keys = dict(divergence=method.divergence, temperature=method.temperature, alpha=method.alpha,
                     beta=method.beta, skew=method.skew, chunk_size=method.chunk_size)
    if isinstance(teacher, SparseTargets):
        out = kd_loss_sparse_chunked(hidden, output_head(student), teacher, labels, **loss_keys)
    else:
        teacher_hidden, teacher_head = (teacher.hidden, teacher.head) if teacher is not None else (None, None)
        out = kd_loss_chunked(hidden, output_head(student), teacher_hidden, teacher_head, labels, **loss_keys)
    if matcher is None:
        return BatchLoss(**vars(out))
    hidden_loss = matcher(student_states, teacher_states, real)
    return BatchLoss(loss=out.loss + method.hidden.weight * hidden_loss, kd=out.kd, ce=out.ce,
                     n_tokens=out.n_tokens, hidden=hidden_loss.detach())


def teacher_signal(
    recipe: Recipe, teacher: Optional[PreTrainedModel], tokenizer: PreTrainedTokenizerBase, encoded: Sequence
) -> Optional[TeacherSignal]:
    """The recipe's teacher signal, built once: its teacher.cache, the live teacher, or None (SFT)."""
    if uses_teacher_cache(recipe):
        from distill.signals.reader import open_teacher_cache

        reader = open_teacher_cache(recipe, tokenizer, encoded)  # refuses a partial or foreign cache
        log.info("teacher: top-%d cache %s (the teacher is not run)", reader.cache.header.k, reader.cache.path)
        return CachedTeacher(reader)
    return LiveTeacher(teacher) if teacher is not None else None


def hidden_matcher(
    recipe: Recipe, student: torch.nn.Module, teacher: Optional[torch.nn.Module]
) -> Optional["HiddenStateMatcher"]:
    """The projections for method.hidden (None when it is off); the map follows how the student was pruned."""
    from distill.losses.hidden import HiddenStateMatcher, check_layer_map, default_layer_map
    from distill.models.heads import base_model, decoder_layers

    spec = recipe.method.hidden
    if spec is None:
        return None
    _check_hidden_recipe(recipe)
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


def _check_hidden_recipe(recipe: Recipe) -> None:
    if recipe.method.hidden is not None and recipe.method.kind != "kd":
        raise DistillError(
            f"method.hidden: hidden-state KD needs the teacher's states (method.kind: kd), "
            f"got method.kind: {recipe.method.kind}"
        )
    if recipe.method.hidden is not None and uses_teacher_cache(recipe):
        raise DistillError(HIDDEN_WITH_CACHE)


def _check_packing_recipe(recipe: Recipe) -> None:
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
    from peft import LoraConfig, get_peft_model

    lora = recipe.train.lora
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [m for m in lora.target_modules if m in present]
    if not targets:
        raise DistillError(f"train.lora.target_modules: none of {lora.target_modules} exist in the student")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a kill counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    """metrics.jsonl, one object per logged step; on resume, entries past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if resume_step and path.is_file():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.tensorboard = _tensorboard(path.parent / "tensorboard")

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"train/{key}", value, record["step"])


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(log_dir))


def _log_sizes(student: PreTrainedModel, teacher: Optional[PreTrainedModel]) -> None:
    from distill.models import count_params

    n = count_params(student)
    share = f" ({100 * n / count_params(teacher):.1f}% of the teacher's)" if teacher is not None else ""
    log.info("student: %.2fM parameters%s", n / 1e6, share)


def _models(recipe: Recipe, device: torch.device, dtype: torch.dtype):
    """(tokenizer, frozen teacher or None for SFT, fp32 student) as the recipe describes them."""
    from distill.models import check_tokenizers, load_tokenizer
    from distill.models.from_recipe import initial_student, load_teacher, model_source, teacher_tokenizer

    tokenizer: PreTrainedTokenizerBase = teacher_tokenizer(recipe)
    teacher_dtype = dtype if recipe.teacher.dtype == "auto" else resolve_dtype(recipe.teacher.dtype, device)
    teacher = load_teacher(recipe, device, teacher_dtype) if needs_teacher_weights(recipe) else None
    student = initial_student(recipe, teacher, tokenizer, device, torch.float32)
    if recipe.student.model is not None:
        path, gguf = model_source(recipe, recipe.student)
        student_tok = load_tokenizer(path, gguf)
        if recipe.method.kind == "kd":
            check_tokenizers(tokenizer, student_tok, _teacher_vocab(recipe, teacher), student.config.vocab_size)
        else:
            tokenizer = student_tok
    _log_sizes(student, teacher)
    if recipe.method.kind != "kd" or uses_teacher_cache(recipe):
        teacher = None  # its weights only seeded the student's embeddings

    return tokenizer, teacher, student


def _teacher_vocab(recipe: Recipe, teacher: Optional[PreTrainedModel]) -> int:
    if teacher is not None:
        return teacher.config.vocab_size
    from distill.signals.cache import read_header
    from distill.signals.provenance import cache_path

    return read_header(cache_path(recipe)).vocab_size


def train(
    recipe: Recipe, *, resume: bool = True, progress: bool = True, stop_after: int | None = None
) -> TrainResult | None:
    """Train the recipe's student, continuing from the newest checkpoint in <run>/checkpoints when resuming.

    `stop_after` ends this call after that many completed steps (checkpointing first), as a kill would;
    it returns None then and a later call resumes.
    """
    from distill.data.packing import check_packing_support, collate_packed, fill_ratio, pack_examples
    from distill.data.splits import recipe_examples
    from distill.data.tokenize import batch_indices, collate, encode_all, padding_id
    from distill.models import save_model
    from distill.models.from_recipe import trained_student_dir
    from distill.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
    from distill.train.schedule import lr_multiplier

    t = recipe.train
    _check_hidden_recipe(recipe)  # before any model is loaded
    _check_packing_recipe(recipe)
    device = resolve_device(t.device)
    dtype = resolve_dtype(t.dtype, device)
    if t.threads:
        torch.set_num_threads(t.threads)
    set_seed(recipe.seed)
    run_dir = recipe.run_dir
    checkpoint_dir = run_dir / "checkpoints"
    checkpoints = list_checkpoints(checkpoint_dir) if resume else []
    finished = _finished_student(recipe, checkpoints)
    if finished is not None:
        return finished

    tokenizer, teacher, student = _models(recipe, device, dtype)
    if t.packing:
        for model, name in ((student, "student"), (teacher, "teacher")):
            if model is not None:
                check_packing_support(model, name)

    train_examples, _ = recipe_examples(recipe)
    encoded = encode_all(train_examples, tokenizer, recipe.data.max_length, recipe.data.system_prompt)
    signal = teacher_signal(recipe, teacher, tokenizer, encoded)
    # The batch order draws from `items`: examples, or with train.packing rows of several examples.
    items, to_batch = encoded, collate
    if t.packing:
        items, to_batch = pack_examples(encoded, recipe.data.max_length, recipe.seed), collate_packed
        log.info("packing: %d examples in %d rows of %d tokens (%.0f%% filled)", len(encoded), len(items),
                 recipe.data.max_length, 100 * fill_ratio(items, recipe.data.max_length))
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

    start = 0
    if checkpoints and resume:
        start = load_checkpoint(checkpoints[-1], student, optimizer, scheduler, matcher)
        log.info("resumed from %s (step %d of %d)", checkpoints[-1], start, t.steps)
    metrics = MetricsLog(run_dir / "metrics.jsonl", start)
    pad_id = padding_id(tokenizer)

    began, last = time.perf_counter(), float("nan")
    bar = tqdm(range(start, t.steps), initial=start, total=t.steps, desc="train", disable=not progress,
               dynamic_ncols=True)
    window_tokens, window_start = 0, time.perf_counter()
    for step in bar:
        totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0, **({"hidden": 0.0} if matcher is not None else {})}
        for micro in range(t.grad_accum):
            idx = batch_indices(len(items), t.batch_size, recipe.seed, step * t.grad_accum + micro)
            batch = {k: v.to(device) for k, v in to_batch([items[i] for i in idx], pad_id).items()}
            out = loss_on_batch(student, signal, batch, recipe.method, dtype, matcher, indices=idx)
            (out.loss / t.grad_accum).backward()
            for key in totals:
                totals[key] += float(getattr(out, key).detach()) / t.grad_accum
            window_tokens += int(batch["attention_mask"].sum())
        grad_norm = None
        if t.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last = totals["loss"]
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            elapsed = time.perf_counter() - window_start
            record = {"step": done, **totals, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
            metrics.write(record)
            bar.set_postfix(loss=f"{last:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            window_tokens, window_start = 0, time.perf_counter()
        if done % t.checkpoint_every == 0 or done == t.steps or done == stop_after:
            save_checkpoint(checkpoint_dir, done, student, optimizer, scheduler, t.keep_checkpoints, matcher)
        if done == stop_after:
            bar.close()
            return None
    bar.close()

    out_dir = trained_student_dir(recipe)
    save_model(student, tokenizer, out_dir)  # the student alone: the matcher's projections are training-only
    seconds = time.perf_counter() - began
    log.info("student saved to %s (%d steps, final loss %.4f, %.0f s)", out_dir, t.steps, last, seconds)
    return TrainResult(student_dir=out_dir, steps=t.steps, final_loss=last, seconds=seconds)
