"""The plan as the readable table `distill plan` prints."""
from __future__ import annotations

from distill.plan.cost import STRATEGIES, Plan
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
                *([_ranks_section(plan)] if plan.per_rank else []), _time_section(plan)]
    return "\n\n".join("\n".join(lines) for lines in sections) + "".join(f"\nnote: {n}" for n in plan.notes)


def format_stage_plans(plans: list[tuple[str, Plan]]) -> str:
    """One table per training stage under its name, then the stages' total time; a lone plan as format_plan."""
    if len(plans) == 1 and not plans[0][0]:
        return format_plan(plans[0][1])
    parts = [f"== {label}: {plan.steps} steps ==\n{format_plan(plan)}" for label, plan in plans]
    total = sum(plan.total_seconds for _, plan in plans)
    parts.append(f"All {len(plans)} stages: {_duration(total)} (the steps alone: no model loading, pair building, "
                 "checkpoints or eval)")
    return "\n\n".join(parts)


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


def _ranks_section(plan: Plan) -> list[str]:
    """One rank's memory at the peak under each strategy, side by side."""
    b, strategies = plan.rank_batch, list(plan.per_rank)
    # Each part where the strategies put it (DDP's buckets and the sharded ones' gathered weights sit alike).
    parts = sorted(dict.fromkeys(part for memory in plan.per_rank.values() for part in memory),
                   key=lambda part: min(list(m).index(part) for m in plan.per_rank.values() if part in m))
    rows = [(part, [_mib(plan.per_rank[s][part]) if part in plan.per_rank[s] else "-" for s in strategies])
            for part in parts]
    rows.append(("per rank at the peak", [_mib(sum(plan.per_rank[s].values())) for s in strategies]))
    rows.append(("peak phase", [plan.per_rank_phase[s] for s in strategies]))
    header = ("", [STRATEGIES[s] for s in strategies])
    width = max(len(name) for name, _ in [header, *rows])
    cols = [max(len(cells[i]) for _, cells in [header, *rows]) for i in range(len(strategies))]
    line = lambda name, cells: "  " + name.ljust(width) + "".join(  # noqa: E731
        "  " + cell.rjust(cols[i]) for i, cell in enumerate(cells))
    return [
        f"Memory per rank on {plan.processes} processes ({b.batch_size} of train.batch_size="
        f"{b.batch_size * plan.processes} rows each, padded to {b.seq_len:.0f} tokens on average, largest "
        f"{b.max_seq_len}): DDP replicates the models; FSDP (full shard) and ZeRO-3 divide the student's weights, "
        "gradients and optimizer state and gather what runs (FSDP the teacher's too; ZeRO-3 keeps it whole)",
        line(*header), *[line(name, cells) for name, cells in rows],
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
