"""The training loop, nanoGPT-plain: draw a batch, take a step, log, checkpoint; stop at the first non-finite loss."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from distill.data.tokenize import batch_indices
from distill.errors import DistillError
from distill.losses.hidden import HiddenStateMatcher
from distill.runtime import atomic_write_text
from distill.signals.teacher_signal import TeacherSignal
from distill.training.checkpoint import list_checkpoints, save_checkpoint
from distill.training.distributed import Ranks
from distill.training.held_out import EVAL_SPLIT, BestSoFar, HeldOut, evaluate_held_out, is_eval_row
from distill.training.on_policy import ResponseSampler
from distill.training.preference import KtoObjective, PairObjective
from distill.training.step import BatchObjective, loss_on_batch

log = logging.getLogger("distill")


@dataclass(frozen=True)
class LoopSettings:
    """The train section's numbers the loop itself needs."""

    steps: int
    batch_size: int
    grad_accum: int
    seed: int
    max_grad_norm: Optional[float]
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    nan_tolerance: int = 0  # non-finite steps skipped (no update) before the run stops
    training_set: str = ""  # the data's hash, kept in every checkpoint
    eval_every: int = 0  # held-out evaluation every this many steps and at the last (0: never)
    patience: Optional[int] = None  # evaluations without a better best-so-far before stopping early


@dataclass
class Training:
    """Everything the loop touches, built once by the train stage's setup."""

    student: torch.nn.Module
    tokenizer: Any  # saved with the student
    signal: Optional[TeacherSignal]
    matcher: Optional[HiddenStateMatcher]
    objective: BatchObjective  # the loss to take, built once from the recipe's method section
    compute_dtype: torch.dtype
    device: torch.device
    items: list  # encoded examples, or packed rows of several
    to_batch: Callable[[list, int], dict]
    pad_id: int
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    checkpoint_dir: Path
    metrics: Optional["MetricsLog"]  # None on the ranks other than 0 (rank 0 alone writes the run's files)
    settings: LoopSettings
    ranks: Ranks  # this process among the training processes (one, unless launched by torchrun/accelerate)
    wrapped: torch.nn.Module  # what gradients flow through: the student's LossThroughWrapper, DDP-wrapped on N > 1
    sampler: Optional[ResponseSampler] = None  # method.kind on_policy: samples responses for its micro-batches
    held_out: Optional[HeldOut] = None  # what train.eval_every evaluates on
    best: Optional[BestSoFar] = None  # train.keep_best's best-so-far
    # method.kind dpo (kto): items are pairs (labelled answers), and this is their loss
    pair_objective: Optional[PairObjective | KtoObjective] = None


@dataclass
class StepResult:
    """One optimizer step's mean loss terms over its micro-batches, gradient norm and real tokens seen."""

    totals: dict[str, float]
    grad_norm: float
    tokens: int

    @property
    def finite(self) -> bool:
        return math.isfinite(self.totals["loss"]) and math.isfinite(self.grad_norm)


def accumulate_gradients(t: Training, step: int) -> StepResult:
    """Forward and backward over the step's micro-batches; gradients are left for the update.

    Each micro-batch is this rank's share of the global one; its loss is scaled so that the gradients DDP averages
    over the ranks are those of the mean over the whole micro-batch (training.distributed).
    """
    s, ranks = t.settings, t.ranks
    terms = ["loss", "kd", "ce", *(["hidden"] if t.matcher is not None else [])]
    if t.pair_objective is not None:
        terms = list(t.pair_objective.terms)
    weighted, tokens = dict.fromkeys(terms, 0.0), 0  # this rank's share of each term's mean over the step
    for micro in range(s.grad_accum):
        idx = ranks.share(batch_indices(len(t.items), s.batch_size, s.seed, step * s.grad_accum + micro))
        batch = {k: v.to(t.device) for k, v in t.to_batch([t.items[i] for i in idx], t.pad_id).items()}
        objective, signal, rows = t.objective, t.signal, idx
        if t.sampler is not None:  # under FSDP through the root, which gathers the embeddings and head
            drawn = ranks.unsharded(t.wrapped, partial(t.sampler.batch_for, t.student, batch, step, micro, idx))
            batch = drawn.batch
            objective = objective.for_student_samples() if drawn.by_student else objective
            if drawn.signal is not None:  # rebuilt samples across tokenizers: the teacher on their own views
                signal, rows = drawn.signal, list(range(len(idx)))
        with ranks.syncing(t.wrapped, last_micro_batch=micro == s.grad_accum - 1):
            out = t.wrapped(partial(_micro_batch_loss, t, batch, objective, signal, rows))
            count = len(idx) if t.pair_objective is not None else out.n_tokens  # what the loss is a mean over
            share = count / max(ranks.sums([count])[0], 1)
            # share * world is 1.0 alone
            ranks.backward(out.loss * (share * ranks.world) / s.grad_accum, last_micro_batch=micro == s.grad_accum - 1)
        for key in terms:
            weighted[key] += float(getattr(out, key).detach()) * share / s.grad_accum
        tokens += int(batch["attention_mask"].sum())
    *values, tokens = ranks.sums([*weighted.values(), tokens])
    grad_norm = ranks.clip(t.trainable, s.max_grad_norm)
    return StepResult(dict(zip(terms, values)), grad_norm, int(tokens))


def _micro_batch_loss(
    t: Training, batch: dict, objective: BatchObjective, signal: Optional[TeacherSignal], rows: list[int]
):
    """The recipe's loss on one micro-batch: the pair loss, or the KD/SFT loss against `signal` (its rows `rows`)."""
    if t.pair_objective is not None:
        return t.pair_objective(t.student, batch, t.compute_dtype)
    return loss_on_batch(t.student, signal, batch, objective, t.compute_dtype, t.matcher, indices=rows)


def run_loop(t: Training, start: int, *, stop_after: Optional[int] = None, progress: bool = True) -> Optional[float]:
    """Train from step `start` to settings.steps, evaluating on the held-out batches every settings.eval_every steps
    and stopping early when settings.patience runs out; return the last loss, or None when stopped at `stop_after`."""
    s = t.settings
    last, skipped = float("nan"), 0
    if t.best is not None and t.best.stopped is not None:
        return last  # train.patience already ran out before this resume
    window_tokens, window_start = 0, time.perf_counter()
    bar = tqdm(range(start, s.steps), initial=start, total=s.steps, desc="train",
               disable=not (progress and t.ranks.main), dynamic_ncols=True)
    postfix: dict[str, str] = {}
    for step in bar:
        result = accumulate_gradients(t, step)
        if result.finite:
            t.optimizer.step()
        else:
            skipped += 1
            _refuse_divergence(t, step + 1, result, skipped)
        t.scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)
        last, done = result.totals["loss"], step + 1
        window_tokens += result.tokens
        if done % s.log_every == 0 or done == s.steps:
            elapsed = time.perf_counter() - window_start
            record = {"step": done, **result.totals, "lr": t.scheduler.get_last_lr()[0],
                      "grad_norm": result.grad_norm, "tokens": window_tokens,
                      "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
            record.update(t.sampler.take_metrics() if t.sampler is not None else {})
            _write_metrics(t, record)
            postfix.update(loss=f"{last:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.set_postfix(postfix)
            window_tokens, window_start = 0, time.perf_counter()
        stop_early = False
        if t.held_out is not None and s.eval_every and (done % s.eval_every == 0 or done == s.steps):
            stop_early = _evaluate(t, done, postfix)
            bar.set_postfix(postfix)
        if done % s.checkpoint_every == 0 or done == s.steps or done == stop_after or stop_early:
            _checkpoint(t, done)
        if done == stop_after or stop_early:
            bar.close()
            return None if done == stop_after else last
    bar.close()
    return last


def _evaluate(t: Training, step: int, postfix: dict[str, str]) -> bool:
    """Evaluate on the held-out batches, log the row, update the best so far; True when patience runs out."""
    # Every rank evaluates the same batches (under FSDP each forward gathers shards from all ranks); rank 0's values
    # are taken everywhere, so train.keep_best and train.patience decide alike on every rank.
    metrics = t.ranks.rank0s(t.ranks.unsharded(t.wrapped, partial(
        evaluate_held_out, t.student, t.held_out, t.objective, t.compute_dtype, t.device, t.matcher)))
    _write_metrics(t, {"step": step, "split": EVAL_SPLIT, **metrics})
    shown = metrics.get("eval_loss", metrics.get("eval_ce"))
    if shown is not None:
        postfix["eval"] = f"{shown:.4f}"
    if t.best is None:
        return False
    t.best.update(metrics, step, partial(t.ranks.kept_copy, t.student))
    patience = t.settings.patience
    if patience is None or t.best.evals_since < patience:
        return False
    t.best.stopped = step
    log.info("train: no better %s in %d evaluations (best %.4f at step %d); stopping early at step %d",
             t.best.metric, patience, t.best.value if t.best.value is not None else math.nan, t.best.step or 0, step)
    return True


def _write_metrics(t: Training, record: dict) -> None:
    if t.metrics is not None:
        t.metrics.write(record)


def _checkpoint(t: Training, step: int) -> None:
    """Rank 0 saves the step's checkpoint; the other ranks wait for it (a kill then finds the same one everywhere).

    With FSDP every rank first gathers the whole student, optimizer and projections, so all of them check the same
    weights and rank 0 writes the same files as one process would."""
    s, best, ranks = t.settings, t.best, t.ranks
    gathered = None
    if ranks.fsdp or ranks.zero is not None:
        gathered = (ranks.whole_weights(t.student), ranks.whole_optimizer_state(t.optimizer),
                    None if t.matcher is None else ranks.whole_weights(t.matcher))
    _refuse_non_finite_weights(t, step, t.student.state_dict() if gathered is None else gathered[0])
    if ranks.main:
        save_checkpoint(t.checkpoint_dir, step, t.student, t.optimizer, t.scheduler, s.keep_checkpoints,
                        t.matcher, s.training_set, best=None if best is None else best.state(),
                        best_weights=None if best is None or best.step == step else best.weights, gathered=gathered)
    ranks.wait()


def _refuse_divergence(t: Training, step: int, result: StepResult, skipped: int) -> None:
    """Skip a non-finite step while train.nan_tolerance allows; then stop, keeping the last good checkpoint."""
    what = f"loss {result.totals['loss']:g}, gradient norm {result.grad_norm:g}"
    if skipped <= t.settings.nan_tolerance:
        log.warning("train: step %d is not finite (%s); skipped without an update (%d of train.nan_tolerance %d)",
                    step, what, skipped, t.settings.nan_tolerance)
        return
    kept = list_checkpoints(t.checkpoint_dir)
    where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written"
    raise DistillError(f"train: step {step} diverged ({what}); stopped, {where}; lower train.lr, set "
                       "train.max_grad_norm, or allow skipped steps with train.nan_tolerance")


def _refuse_non_finite_weights(t: Training, step: int, weights: dict) -> None:
    """Never checkpoint a student whose update went non-finite: stop, keeping the last good checkpoint."""
    name = first_non_finite(weights)
    if name is not None:
        kept = list_checkpoints(t.checkpoint_dir)
        where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written"
        raise DistillError(f"train: step {step} left the student's {name} non-finite; stopped, {where}; lower "
                           "train.lr or set train.max_grad_norm (or pass --restart)")


def first_non_finite(weights: dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor of a state dict holding a NaN or infinity, else None."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def check_finite(weights: dict[str, torch.Tensor]) -> None:
    """Refuse to save a student with a non-finite weight (one line naming the first such tensor)."""
    name = first_non_finite(weights)
    if name is not None:
        raise DistillError(f"train: the student's {name} is not finite; it was not saved (pass --restart)")


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a kill counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    """metrics.jsonl, one object per logged step and per held-out evaluation ("split": "eval"); on resume, entries
    past the checkpoint are dropped. Trackers (train.report_to) get every row too, as "train/KEY" or "eval/KEY"."""

    def __init__(self, path: Path, resume_step: int, trackers: Sequence = ()):
        self.path = path
        kept = []
        if resume_step and path.is_file():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.trackers = list(trackers)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        split = EVAL_SPLIT if is_eval_row(record) else "train"
        scalars = {f"{split}/{key.removeprefix('eval_')}": value for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float))}
        for tracker in self.trackers:
            tracker.log(scalars, step=record["step"])

    def close(self) -> None:
        """Flush and close the trackers (at the end of training)."""
        for tracker in self.trackers:
            tracker.finish()


def last_logged_loss(path: Path) -> float:
    """The loss of the last training step logged in a metrics.jsonl (nan when nothing is logged)."""
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(record, dict) and not is_eval_row(record):
            return float(record.get("loss", float("nan")))
    return float("nan")
