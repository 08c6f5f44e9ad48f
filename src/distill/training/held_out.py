"""Held-out evaluation while training (train.eval_every) and the best step so far (train.keep_best, train.patience).

The held-out loss is the training loss itself (`loss_on_batch`, the same objective and teacher signal) on a bounded
number of batches of the held-out examples, with the student in eval mode and no gradients; values are means over
the trained positions of all those batches. No text is generated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from distill.losses.hidden import HiddenStateMatcher
from distill.signals.teacher_signal import TeacherSignal
from distill.training.step import BatchObjective, loss_on_batch

EVAL_SPLIT = "eval"  # metrics.jsonl rows of held-out evaluations carry "split": "eval"
KEEP_BEST = ("eval_loss", "eval_kd", "eval_ce", "eval_agreement")
HIGHER_IS_BETTER = frozenset({"eval_agreement"})


def is_eval_row(record: dict) -> bool:
    """Whether a metrics.jsonl row is a held-out evaluation (the others are training steps)."""
    return record.get("split") == EVAL_SPLIT


@dataclass
class HeldOut:
    """The held-out batches the loop evaluates on, and the teacher signal for them.

    `signal` None means no teacher rows exist for these examples (a teacher cache holds only the training
    examples'; SFT has no teacher): the evaluation then logs what the labels alone give.
    """

    batches: list[dict[str, Tensor]]  # collated, on the CPU
    signal: Optional[TeacherSignal]


def evaluate_held_out(
    student: torch.nn.Module, held_out: HeldOut, objective: BatchObjective, compute_dtype: torch.dtype,
    device: torch.device, matcher: Optional[HiddenStateMatcher] = None,
) -> dict[str, float]:
    """{eval_loss, eval_kd, eval_ce, eval_hidden, eval_agreement}: the training loss's terms on the held-out batches.

    Means over their trained positions. Without a held-out teacher signal only eval_ce is given when the objective
    has a KD term (its value could not be the training loss), and eval_loss and eval_ce when it has none (SFT).
    """
    modules = [m for m in (student, matcher) if m is not None]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    sums: dict[str, float] = {}
    tokens, matches = 0, 0
    try:
        with torch.no_grad():
            start = 0  # the batch's first held-out example (a routed signal picks each row's teacher by it)
            for cpu_batch in held_out.batches:
                batch = {k: v.to(device) for k, v in cpu_batch.items()}
                rows = range(start, start + batch["input_ids"].size(0))
                out = loss_on_batch(student, held_out.signal, batch, objective, compute_dtype, matcher,
                                    indices=rows, count_agreement=True)
                start = rows.stop
                for key in ("loss", "kd", "ce", "hidden"):
                    value = getattr(out, key)
                    if value is not None:
                        sums[key] = sums.get(key, 0.0) + float(value) * out.n_tokens
                matches += out.top1_matches or 0
                tokens += out.n_tokens
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    if tokens == 0:
        return {}
    if held_out.signal is None or not objective.kd:
        kept = ("ce",) if objective.kd else ("loss", "ce")
        return {f"eval_{k}": sums[k] / tokens for k in kept}
    metrics = {f"eval_{k}": v / tokens for k, v in sums.items()}
    metrics["eval_agreement"] = matches / tokens
    return metrics


@dataclass
class BestSoFar:
    """The best held-out value of `metric` so far, its step and weights, and evaluations since it (patience)."""

    metric: str
    value: Optional[float] = None
    step: Optional[int] = None
    evals_since: int = 0
    stopped: Optional[int] = None  # the step where train.patience ran out
    weights: Optional[dict[str, Tensor]] = None  # a CPU copy of the student at `step`

    def better(self, value: Optional[float]) -> bool:
        """Whether `value` beats the best so far (a tie does not: the earlier step stays)."""
        if value is None or not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.metric in HIGHER_IS_BETTER else value < self.value

    def update(self, metrics: dict[str, float], step: int,
               student_copy: Callable[[], Optional[dict[str, Tensor]]]) -> bool:
        """Take this evaluation into account; keep `student_copy()` (a CPU copy of the student's weights) when it is
        the best. True if so."""
        value = metrics.get(self.metric)
        if not self.better(value):
            self.evals_since += 1
            return False
        self.value, self.step, self.evals_since = float(value), step, 0
        self.weights = student_copy()
        return True

    def state(self) -> dict:
        """Everything but the weights, as JSON values (kept in every checkpoint)."""
        return {"metric": self.metric, "value": self.value, "step": self.step, "evals_since": self.evals_since,
                "stopped": self.stopped}

    @classmethod
    def from_state(cls, state: dict, weights: Optional[dict[str, Tensor]]) -> "BestSoFar":
        """The best so far as a checkpoint kept it."""
        return cls(metric=state["metric"], value=state.get("value"), step=state.get("step"),
                   evals_since=int(state.get("evals_since", 0)), stopped=state.get("stopped"), weights=weights)
