"""A plain-text teacher-vs-student table from a report.json object."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

from distill.eval.report import METRIC_KEYS, per_token

MISSING = "—"
HIGHER, LOWER = "↑", "↓"


class Row(NamedTuple):
    key: str
    label: str
    fmt: Callable[[float], str]
    better: str
    show_ratio: bool  # False where the teacher's value is 1 or 0 by definition, so a ratio says nothing


def _fixed(decimals: int) -> Callable[[float], str]:
    return lambda v: f"{v:,.{decimals}f}"


def _scaled(divisor: float, decimals: int) -> Callable[[float], str]:
    return lambda v: f"{v / divisor:,.{decimals}f}"


ROWS = (
    Row("params", "params (M)", _scaled(1e6, 2), LOWER, True),
    Row("bytes_on_disk", "weights on disk (MB)", _scaled(2**20, 1), LOWER, True),
    Row("peak_memory_mb", "peak memory (MB)", _fixed(1), LOWER, True),
    Row("perplexity", "perplexity", _fixed(2), LOWER, True),
    Row("perplexity_general", "perplexity, general text", _fixed(2), LOWER, True),
    Row("bits_per_byte", "bits per byte", _fixed(3), LOWER, True),
    Row("bits_per_byte_general", "bits per byte, general text", _fixed(3), LOWER, True),
    Row("top1_agreement", "top-1 agreement", _fixed(3), HIGHER, False),
    Row("kl_to_teacher", "KL to teacher", _fixed(4), LOWER, False),
    Row("rougeL_ref", "ROUGE-L vs reference", _fixed(3), HIGHER, True),
    Row("rougeL_teacher", "ROUGE-L vs teacher", _fixed(3), HIGHER, False),
    Row("loop_share", "answers that loop", _fixed(3), LOWER, False),
    Row("reward_accuracy", "reward accuracy, held-out pairs", _fixed(3), HIGHER, False),
    Row("reward_margin", "reward margin, held-out pairs", _fixed(3), HIGHER, False),
    Row("distinct_2", "distinct word bigrams", _fixed(3), HIGHER, True),
    Row("ece", "calibration error (ECE)", _fixed(3), LOWER, True),
    Row("prefill_tokens_per_s", "prefill tok/s", _fixed(1), HIGHER, True),
    Row("decode_tokens_per_s", "decode tok/s", _fixed(1), HIGHER, True),
    Row("time_to_first_token_s", "time to first token (ms)", _scaled(1e-3, 1), LOWER, True),
    Row("decode_tokens_per_s_b8", "decode tok/s, batch 8", _fixed(1), HIGHER, True),
)

RATIOS = (
    ("compression", "compression (student/teacher params)", lambda v: f"{v:.3f}"),
    ("speedup", "speedup (student/teacher decode tok/s)", lambda v: f"{v:.2f}x"),
    ("rougeL_pct_of_teacher", "ROUGE-L % of teacher", lambda v: f"{v:.1f}%"),
    ("perplexity_pct_of_teacher", "perplexity % of teacher (teacher/student)", lambda v: f"{v:.1f}%"),
    ("bits_per_byte_pct_of_teacher", "bits per byte % of teacher (teacher/student)", lambda v: f"{v:.1f}%"),
    ("quality_pct_of_teacher", "quality % of teacher", lambda v: f"{v:.1f}%"),
)


# The exports block: report.json keys of each export row (ratios: of its `ratios`), shown like the rows above.
EXPORT_COLUMNS = ("bytes_on_disk", "perplexity", "top1_agreement", "quality_pct_of_teacher", "decode_tokens_per_s")


def cell(value: Any, fmt: Callable[[float], str]) -> str:
    """One formatted value; a dash when it was not measured."""
    return MISSING if value is None else fmt(value)


def ratio_cell(teacher: Any, student: Any) -> str:
    """student / teacher as a multiplier: reads the same for higher- and lower-is-better rows."""
    if teacher is None or student is None or teacher == 0:
        return MISSING
    return f"{student / teacher:,.2f}x"


def student_header(report: dict) -> str:
    """The student column's header: "student", or "student (after NAME)" for a `stages:` run's final stage."""
    final = report.get("final_stage")
    return f"student (after {final})" if isinstance(final, str) else "student"


def extra_columns(report: dict) -> list[tuple[str, dict]]:
    """(header, metrics) of the columns after student/teacher: before training, then after each earlier stage."""
    columns = []
    if isinstance(report.get("student_init"), dict) and report["student_init"]:
        columns.append(("before training", report["student_init"]))
    stages = report.get("stages")
    if isinstance(stages, dict):
        columns += [(f"after {name}", row) for name, row in stages.items() if isinstance(row, dict)]
    return columns


def _metric_lines(
    teacher: dict, student: dict, extra: list[tuple[str, dict]], student_label: str, tokenizers_differ: bool = False
) -> list[str]:
    """One row per metric either model has; then a column per extra model (before training, earlier stages); no
    student/teacher ratio for per-token metrics when the two tokenizers differ."""
    header = ("metric", "", "teacher", student_label, "student/teacher") + tuple(name for name, _ in extra)
    rows = [header]
    for row in ROWS:
        t, s = teacher.get(row.key), student.get(row.key)
        if t is None and s is None and row.key not in METRIC_KEYS:
            continue  # an optional metric this run did not measure
        comparable = row.show_ratio and not (tokenizers_differ and per_token(row.key))
        ratio = ratio_cell(t, s) if comparable else ""
        cells = tuple(cell(values.get(row.key), row.fmt) for _, values in extra)
        rows.append((row.label, row.better, cell(t, row.fmt), cell(s, row.fmt), ratio) + cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return [
        "  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1])] + [c.rjust(w) for c, w in zip(r[2:], widths[2:])])
        .rstrip()
        for r in rows
    ]


def _suite_lines(report: dict) -> list[str]:
    suites = report.get("suites") or {}
    teacher, student = suites.get("teacher", {}), suites.get("student", {})
    lines = []
    for suite, tasks in student.items():
        for task, score in tasks.items():
            t = teacher.get(suite, {}).get(task)
            lines.append(f"  {suite}/{task}: teacher {cell(t, _fixed(3))}, student {cell(score, _fixed(3))}")
    return ["", "task suites"] + lines if lines else []


def lm_eval_rows(report: dict) -> list[tuple[str, str, Any, Any, Any]]:
    """(task, metric, teacher, student, n) from report.json's `lm_eval`; standard errors stay in the JSON."""
    section = report.get("lm_eval") or {}
    teacher, student = section.get("teacher") or {}, section.get("student") or {}
    rows = []
    for task in list(student) + [t for t in teacher if t not in student]:
        t_scores, s_scores = teacher.get(task) or {}, student.get(task) or {}
        metrics = [m for m in list(s_scores) + [m for m in t_scores if m not in s_scores]
                   if m != "n" and not m.endswith("_stderr")]
        n = s_scores.get("n", t_scores.get("n"))
        rows += [(task, metric, t_scores.get(metric), s_scores.get(metric), n) for metric in metrics]
    return rows


def _lm_eval_lines(report: dict) -> list[str]:
    rows = lm_eval_rows(report)
    version = (report.get("lm_eval") or {}).get("version")
    lines = [f"  {task} {metric}: teacher {cell(t, _fixed(3))}, student {cell(s, _fixed(3))} (n = {n})"
             for task, metric, t, s, n in rows]
    return ["", f"lm-evaluation-harness {version or ''}".rstrip()] + lines if lines else []


def _judge_lines(report: dict) -> list[str]:
    judge = report.get("judge")
    if not judge:
        return []
    rate = cell(judge.get("win_rate"), lambda v: f"{100 * v:.1f}%")
    return ["", f"judge ({judge.get('judge')}): student wins {rate} of {judge.get('judged')} judged pairs "
                f"({judge.get('wins')} wins, {judge.get('ties')} ties, {judge.get('losses')} losses; "
                f"each pair judged in both orders)"]


def preference_note(report: dict) -> str:
    """One line on what a dpo run trained on: the pairs' source, how many were built, dropped (why), filtered."""
    section = report.get("preference")
    if not isinstance(section, dict) or not isinstance(section.get("training_pairs"), dict):
        return ""
    counts = section["training_pairs"]
    dropped = ", ".join(f"{reason} {n}" for reason, n in sorted((counts.get("dropped") or {}).items()))
    line = f"preference pairs ({section.get('source')}): {counts.get('built', 0)} built"
    line += f"; dropped: {dropped}" if dropped else ""
    line += f"; {counts['after_filter']} after the filter" if counts.get("after_filter") is not None else ""
    held_out = section.get("pairs")
    return line + (f"; reward accuracy on {held_out} held-out pairs" if held_out else "; no held-out pair")


def _preference_lines(report: dict) -> list[str]:
    note = preference_note(report)
    return ["", note] if note else []


def _contamination_lines(report: dict) -> list[str]:
    c = report.get("contamination")
    if not c or not c.get("overlapping"):
        return []
    return ["", f"warning: {c['overlapping']} of {c['eval_items']} eval items share a {c['ngram']}-gram with the "
                "training data (report.json: contamination)"]


def _export_column(key: str) -> tuple[str, Callable[[float], str]]:
    """(header, formatter) of an exports column: the label and format of the metric row or ratio it shows."""
    row = next((r for r in ROWS if r.key == key), None)
    if row is not None:
        return f"{row.label} {row.better}", row.fmt
    return next((f"{label} {HIGHER}", fmt) for ratio_key, label, fmt in RATIOS if ratio_key == key)


def export_rows(report: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """The exports block: header, formatted cells (the student first, then each export) and notes; empty without."""
    exports = report.get("exports")
    if not isinstance(exports, dict) or not exports:
        return [], [], []
    columns = [_export_column(key) for key in EXPORT_COLUMNS]

    def cells(name: str, kind: str, metrics: dict, ratios: dict) -> list[str]:
        values = [metrics.get(key, ratios.get(key)) for key in EXPORT_COLUMNS]
        return [name, kind] + [cell(v, fmt) for v, (_, fmt) in zip(values, columns)]

    rows = [cells("student", "hf", report.get("student") or {}, report.get("ratios") or {})]
    notes = []
    for name, export in exports.items():
        export = export if isinstance(export, dict) else {}
        kind = " ".join(str(export[k]) for k in ("format", "quant") if export.get(k))
        rows.append(cells(name, kind or "?", export, export.get("ratios") or {}))
        if export.get("error"):
            notes.append(f"{name}: not measured ({export['error']})")
        elif export.get("speed_not_measured"):
            notes.append(f"{name}: speed not measured ({export['speed_not_measured']})")
        elif export.get("speed_runtime"):
            notes.append(_runtime_note(name, export))
        if export.get("quality_not_measured"):
            notes.append(_unmeasured_quality_note(name, export))
        if export.get("older_than_student"):
            notes.append(f"{name}: written before the student was last saved; export it again")
    return ["model", "format"] + [header for header, _ in columns], rows, notes


def _runtime_note(name: str, export: dict) -> str:
    """Where an export's speed was measured (llama.cpp for GGUF), and its one-thread decode speed."""
    threads = export.get("speed_threads")
    note = f"{name}: speed in {export['speed_runtime']}" + (f" on {threads} threads" if threads else "")
    alone = export.get("decode_tokens_per_s_1_thread")
    return note + (f"; 1 thread: {alone:.1f} decode tok/s" if isinstance(alone, (int, float)) else "")


def _unmeasured_quality_note(name: str, export: dict) -> str:
    """Why an export (an ExecuTorch program) has no quality columns, and its check against the student instead."""
    check = export.get("vs_student")
    if not isinstance(check, dict):
        return f"{name}: quality not measured; no check against the student beside it (export it again)"
    greedy = check.get("greedy") or {}
    return (f"{name}: quality not measured on the held-out set; vs the student when exported: mean KL "
            f"{check.get('mean_kl', float('nan')):.3g}, top-1 {check.get('top1_agreement', float('nan')):.3f}, "
            f"greedy answers equal on {greedy.get('same', '?')} of {greedy.get('prompts', '?')} prompts")


def _export_lines(report: dict) -> list[str]:
    header, rows, notes = export_rows(report)
    if not rows:
        return []
    table = [header] + rows
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1])]
                       + [c.rjust(w) for c, w in zip(r[2:], widths[2:])]).rstrip() for r in table]
    return ["", "exports (<run>/exports/, measured like the student)"] + lines + [f"  {n}" for n in notes]


def _tokenizer_lines(report: dict) -> list[str]:
    """When teacher and student tokenizers differ: how the table compares them, and what it cannot."""
    difference = (report.get("meta") or {}).get("tokenizer_difference")
    if not difference:
        return []
    lines = ["", f"teacher and student tokenizers differ ({difference}):",
             "  perplexities and tok/s count each model's own tokens; bits per byte compare them; top-1 agreement "
             "and KL to teacher are on aligned spans (docs/cross_tokenizer.md)"]
    return lines + [f"  {key}: absent ({why})" for key, why in (report.get("absent") or {}).items()]


def _ratio_lines(ratios: dict) -> list[str]:
    width = max(len(label) for _, label, _ in RATIOS)
    return [f"{label.ljust(width)}  {cell(ratios.get(key), fmt)}" for key, label, fmt in RATIOS]


def format_table(report: dict) -> str:
    """Teacher vs student, one metric a row (↑ higher is better, ↓ lower is better), then the ratios."""
    differ = bool((report.get("meta") or {}).get("tokenizer_difference"))
    lines = _metric_lines(report.get("teacher", {}), report.get("student", {}), extra_columns(report),
                          student_header(report), differ)
    lines += ["", "ratios"] + _ratio_lines(report.get("ratios", {})) + _tokenizer_lines(report)
    lines += _export_lines(report) + _suite_lines(report) + _lm_eval_lines(report) + _judge_lines(report)
    lines += _preference_lines(report) + _contamination_lines(report)
    return "\n".join(lines) + "\n"
