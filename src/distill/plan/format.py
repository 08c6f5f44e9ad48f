"""The plan as the readable table `distill plan` prints."""
from __future__ import annotations

from distill.plan.cost import Plan
from distill.plan.shapes import shared_vocab

MiB = 2**20


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _mib(n: float) -> str:
    return f"{n / MiB:,.0f} MiB" if n >= 10 * MiB else f"{n / MiB:,.1f} MiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _rows(pairs: list[tuple[str, str]], indent: str = "  ") -> list[str]:
    width = max(len(k) for k, _ in pairs)
    return [f"{indent}{k.ljust(width)}  {v}" for k, v in pairs]


def format_plan(plan: Plan) -> str:
    """The plan as a readable table."""
    sections = [_models_section(plan), _batch_section(plan), _flops_section(plan), _memory_section(plan),
                _time_section(plan)]
    return "\n\n".join("\n".join(lines) for lines in sections) + "".join(f"\nnote: {n}" for n in plan.notes)


def _models_section(plan: Plan) -> list[str]:
    return ["Models", *_rows([
        ("teacher", f"{_count(plan.teacher_params)} params: {plan.teacher.describe()}"),
        ("student", f"{_count(plan.student_params)} params: {plan.student.describe()}"),
        ("student / teacher", f"{plan.param_ratio:.1%} of the parameters (teacher/student = "
                              f"{1 / plan.param_ratio:.2f})"),
        ("trainable", _count(plan.trainable_params) + (" (LoRA adapters)" if plan.lora else "")),
    ])]


def _batch_section(plan: Plan) -> list[str]:
    b = plan.batch
    return [
        f"Batches ({plan.grad_accum} per step): {b.batch_size} sequences padded to {b.seq_len:.0f} tokens on "
        f"average (largest {b.max_seq_len}); {b.real_tokens:.0f} real tokens and {b.loss_rows:.0f} trained "
        "positions each",
        f"  {b.source}",
    ]


def _flops_section(plan: Plan) -> list[str]:
    total = plan.step_flops
    head = f"FLOPs per step: {_count(total)}; per real token: {_count(plan.flops_per_token)}"
    head += "" if plan.teacher_online else " (no teacher forward: SFT or teacher.cache)"
    return [head, *_rows([(k, f"{_count(v / plan.tokens_per_step)} per token ({v / total:.0%})")
                          for k, v in plan.flops.items()])]


def _memory_section(plan: Plan) -> list[str]:
    b = plan.batch
    whose = "teacher" if plan.teacher_online else "student"
    return [
        f"Memory at the peak ({plan.peak_phase}, largest batch): {_mib(plan.peak_bytes)} resident",
        *_rows([(k, _mib(v)) for k, v in plan.memory.items()]),
        f"  logits: a naive loss would hold {whose} logits [{b.max_padded_tokens:,} x "
        f"{shared_vocab(plan.teacher, plan.student):,}] of {_mib(plan.naive_logits_bytes)} and peak near "
        f"{_mib(plan.naive_loss_peak_bytes)}; the chunked loss peaks at {_mib(plan.chunked_loss_peak_bytes)}",
    ]


def _time_section(plan: Plan) -> list[str]:
    rates = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in plan.rates.items())
    return [
        f"Time on this machine ({plan.device}, {plan.threads} threads; GFLOP/s: {rates})",
        *_rows([(k, f"{v:.3f} s ({v / plan.step_seconds:.0%})") for k, v in plan.seconds.items()]),
        *_rows([
            ("step", f"{plan.step_seconds:.2f} s"),
            ("tokens/s", f"{plan.tokens_per_s:,.0f}"),
            (f"total ({plan.steps} steps)", f"{_duration(plan.total_seconds)} (the steps alone: no model loading, "
                                            "checkpoints or eval)"),
        ]),
    ]
