"""`distill report`: one self-contained HTML page (inline SVG, no scripts, no URLs) and a Markdown summary of a run."""
from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from distill.errors import DistillError
from distill.report import plots
from distill.report.compare import RunFiles, load_run
from distill.eval.report import METRIC_KEYS, per_token
from distill.report.table import (
    MISSING,
    RATIOS,
    ROWS,
    cell,
    export_rows,
    extra_columns,
    format_table,
    lm_eval_rows,
    preference_note,
    ratio_cell,
    student_header,
)
from distill.runtime import atomic_write_text

MAX_SAMPLES = 20
# Curves drawn first and named; any other numeric key of metrics.jsonl follows under its own name.
CURVE_LABELS = {"loss": "total loss", "kd": "KD loss", "ce": "cross-entropy", "hidden": "hidden-state loss",
                "lr": "learning rate", "grad_norm": "gradient norm", "tokens_per_s": "training tokens/s",
                "tokens": "tokens trained since the last logged step",
                "sample_length": "on-policy: mean sample length (tokens)",
                "eos_share": "on-policy: samples that end on their own", "loop_share": "on-policy: samples that loop",
                "sample_tokens_per_s": "on-policy: sampled tokens/s",
                "agreement": "top-1 agreement with the teacher",
                "margin": "DPO reward margin (chosen - rejected)", "accuracy": "DPO reward accuracy (chosen > rejected)",
                "chosen_logp": "log-prob of chosen answers", "rejected_logp": "log-prob of rejected answers",
                "sft": "NLL of chosen answers", "kl": "KTO reference point z0 (KL estimate)",
                "desirable_reward": "KTO reward of desirable answers",
                "undesirable_reward": "KTO reward of undesirable answers"}
EVAL_PREFIXES = ("eval_", "eval/")  # metrics keys logged on held-out data: drawn beside their training curve
SERIES_NAMES = {"eval": "held-out"}  # a curve's lines, as its legend names them
EVAL_SPLIT = "eval"  # metrics.jsonl rows of held-out evaluations (train.eval_every) carry "split": "eval"
SIDES = ("teacher", "student")
# In report.md text, what Markdown would read as emphasis, code, a link or image, or a table cell's end.
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|])")

HOW_TO = {
    "report.json": "the run has not been evaluated: run `distill eval` with the run's recipe "
                   "(or `distill run`, which resumes and ends with eval)",
    "metrics.jsonl": "the run has not trained yet: run `distill train` with the run's recipe (or `distill run`)",
    "samples.jsonl": "`distill eval` writes the teacher's and student's answers to the eval prompts there",
    "recipe.yaml": "`distill run`, `train` or `eval` keeps the resolved recipe in the run directory",
}

CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0; } th, td { padding: .25rem .6rem; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; }
dl.summary dt { font-weight: bold; } dl.summary dd { margin: 0; }
.missing { background: #fff6e0; border-left: 4px solid #e69f00; padding: .5rem .8rem; }
.plots { display: flex; flex-wrap: wrap; gap: 1rem; } .note { color: #666; font-size: .9rem; }
table.samples td { vertical-align: top; white-space: pre-wrap; max-width: 22rem; font-size: .9rem; }
pre { background: #f6f6f6; padding: .6rem; white-space: pre-wrap; } .empty { color: #999; font-style: italic; }
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: object) -> str:
    """Integers in full with separators, large floats to one decimal, small ones to 4 significant digits."""
    if value is None:
        return MISSING
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if not _finite(value):
        return str(value)
    return f"{value:,.1f}" if abs(value) >= 1e4 else f"{value:.4g}"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_esc(title)}</h2>\n{body}\n</section>'


def _missing(run: RunFiles, name: str) -> str:
    """Why a file is not used (absent or unreadable) and how to produce it."""
    problem = run.problems.get(name)
    what = f"{name} could not be read: {problem}" if problem else f"No {name} in {run.path}"
    how = re.sub(r"`([^`]+)`", r"<code>\1</code>", _esc(HOW_TO[name]))  # HOW_TO is Markdown for report.md too
    return f'<p class="missing">{_esc(what)}; {how}.</p>'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: Optional[int] = 1,
           cls: str = "") -> str:
    """An HTML table from cells already escaped; columns from `numeric_from` on (None: none) are right-aligned."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if numeric_from is not None and i >= numeric_from
                         else f"<td>{c}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# ---------------------------------------------------------------- recipe summary


def _short(name: Optional[str]) -> str:
    """The last path component of a model name: a hub id's model, a directory's or file's name."""
    return str(name).rstrip("/").rsplit("/", 1)[-1] if name else "?"


def _student_text(recipe: dict) -> str:
    student = recipe.get("student") or {}
    if student.get("model"):
        return f"existing model {student['model']}"
    if student.get("preset"):
        return f"preset {student['preset']}"
    if student.get("config"):
        c = student["config"]
        layers = c.get("num_layers")
        return (f"new: {layers} layer{'' if layers == 1 else 's'}, hidden {c.get('hidden_size')}, "
                f"{c.get('num_heads')} heads, on the teacher's tokenizer")
    cut = student.get("from_teacher") or {}
    depth = f"layers {cut['keep_layers']}" if cut.get("keep_layers") else f"{cut.get('layers') or 'all'} layers"
    widths = [f"{k} {cut[k]}" for k in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads") if cut.get(k)]
    return f"cut from the teacher: {depth}" + (f", {', '.join(widths)}" if widths else "")


def _method_text(recipe: dict) -> str:
    method, train, teacher = recipe.get("method") or {}, recipe.get("train") or {}, recipe.get("teacher") or {}
    if method.get("kind") == "sft":
        text = "SFT on the teacher's answers"
    elif method.get("kind") == "on_policy":
        text = (f"on-policy distillation ({method.get('divergence')} on the student's own samples, lmbda "
                f"{method.get('lmbda')}, {method.get('estimator')} estimator)")
    else:
        text = f"KD ({method.get('divergence')}, alpha {method.get('alpha')}, T {method.get('temperature')})"
        if teacher.get("cache"):
            text += f" from a top-{teacher.get('cache_k')} teacher cache"
    if method.get("hidden"):
        text += f" + hidden-state KD ({method['hidden'].get('loss')}, weight {method['hidden'].get('weight')})"
    if train.get("lora"):
        text += f", LoRA r {train['lora'].get('r')}"
    return text


def _params_text(run: RunFiles, side: str) -> str:
    params = run.value(side, "params")
    return f" — {params / 1e6:,.2f}M parameters" if _finite(params) else ""


def _stage_steps(recipe: dict) -> list[tuple[str, str, Any]]:
    """(name, method kind, steps) of each training stage of a `stages:` recipe (its own value, else the recipe's)."""
    method, train = recipe.get("method") or {}, recipe.get("train") or {}
    stages = [s for s in recipe.get("stages") or [] if isinstance(s, dict)]
    return [(str(s.get("name")), (s.get("method") or {}).get("kind", method.get("kind", "kd")),
             (s.get("train") or {}).get("steps", train.get("steps", "?"))) for s in stages]


def summary_rows(run: RunFiles) -> list[tuple[str, str]]:
    """(label, text) pairs: teacher, student, method, steps, data, eval set; what the run's files tell."""
    recipe = run.recipe or {}
    train, data = recipe.get("train") or {}, recipe.get("data") or {}
    rows = []
    if recipe:
        rows.append(("teacher", f"{run.teacher_name}{_params_text(run, 'teacher')}"))
        rows.append(("student", f"{_student_text(recipe)}{_params_text(run, 'student')}"))
        rows.append(("method", _method_text(recipe)))
    stages = _stage_steps(recipe)
    if stages:
        rows.append(("stages", " → ".join(f"{name} ({kind}, {steps} steps)" for name, kind, steps in stages)))
    logged = [r["step"] for r in run.metrics if _finite(r.get("step"))]
    done = f"{max(logged)} trained" if logged else "none trained yet"
    total = sum(steps for _, _, steps in stages if isinstance(steps, int)) if stages else train.get("steps")
    planned = f" of {total}" if total else ""
    rows.append(("steps", f"{done}{planned} (batch {train.get('batch_size', '?')}, lr {train.get('lr', '?')})"
                 if recipe else f"{done}{planned}"))
    sources = [f"{k}: {data[k]}" for k in ("prompts", "train", "eval") if data.get(k)]
    if sources:
        rows.append(("data", ", ".join(sources)))
    meta = (run.report or {}).get("meta") or {}
    if meta:
        rows.append(("eval", f"{meta.get('eval_examples', '?')} held-out examples on {meta.get('device', '?')} "
                             f"({meta.get('dtype', '?')}), {meta.get('eval_seconds', '?')} s"))
    return rows


def _summary(run: RunFiles) -> str:
    items = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in summary_rows(run))
    body = f'<dl class="summary">{items}</dl>'
    return body if run.recipe else _missing(run, "recipe.yaml") + body


# ---------------------------------------------------------------- teacher vs student


def _metrics_table(report: dict) -> str:
    """The rows and cells of the CLI table (distill.report.table), as HTML; before-training and stage columns."""
    teacher, student = report.get("teacher") or {}, report.get("student") or {}
    extra = extra_columns(report)
    differ = bool((report.get("meta") or {}).get("tokenizer_difference"))
    rows = []
    for row in ROWS:
        t, s = teacher.get(row.key), student.get(row.key)
        if t is None and s is None and row.key not in METRIC_KEYS:
            continue  # an optional metric this run did not measure
        ratio = ratio_cell(t, s) if row.show_ratio and not (differ and per_token(row.key)) else ""
        cells = [_esc(cell(values.get(row.key), row.fmt)) for _, values in extra]
        rows.append([_esc(row.label), row.better, _esc(cell(t, row.fmt)), _esc(cell(s, row.fmt)), _esc(ratio)]
                    + cells)
    header = ["metric", "", "teacher", student_header(report), "student/teacher"] + [name for name, _ in extra]
    return _table(header, rows, numeric_from=2) + _tokenizer_note(report) + _contamination_note(report)


def _tokenizer_note(report: dict) -> str:
    """When teacher and student tokenizers differ: how the table compares them, and what is absent and why."""
    difference = (report.get("meta") or {}).get("tokenizer_difference")
    if not difference:
        return ""
    absent = "".join(f"<li><code>{_esc(key)}</code>: absent ({_esc(why)})</li>"
                     for key, why in (report.get("absent") or {}).items())
    return (f'<p class="note">Teacher and student tokenizers differ ({_esc(difference)}): perplexities and tok/s '
            "count each model's own tokens, bits per byte compare them; top-1 agreement and KL to teacher are on "
            f"aligned spans (docs/cross_tokenizer.md).</p><ul>{absent}</ul>")


def _contamination_note(report: dict) -> str:
    c = report.get("contamination")
    if not isinstance(c, dict):
        return ""
    if not c.get("overlapping"):
        return (f'<p class="note">No eval item shares a {_esc(c.get("ngram"))}-gram with the training data '
                f'({_esc(c.get("eval_items"))} items checked).</p>')
    examples = "".join(f"<li><code>{_esc(e.get('id'))}</code>: {_esc(e.get('text'))}</li>"
                       for e in c.get("examples", []))
    return (f'<p class="missing">Contamination: {_esc(c["overlapping"])} of {_esc(c.get("eval_items"))} eval '
            f'items share a {_esc(c.get("ngram"))}-gram with the training data; their scores may be inflated.</p>'
            f"<ul>{examples}</ul>")


def _ratios_table(report: dict) -> str:
    ratios = report.get("ratios") or {}
    rows = [[_esc(label), _esc(cell(ratios.get(key), fmt))] for key, label, fmt in RATIOS]
    return _table(["ratio", "value"], rows)


def _other_measurements(report: dict) -> str:
    """Scalar extras the eval stage added beyond the table's rows (perplexity_text, time_to_first_token_s...)."""
    shown = {row.key for row in ROWS}
    teacher, student = report.get("teacher") or {}, report.get("student") or {}
    keys = [k for k in dict.fromkeys([*teacher, *student]) if k not in shown
            and all(not isinstance(side.get(k), (dict, list)) for side in (teacher, student))]
    if not keys:
        return ""
    rows = [[_esc(k), _esc(_number(teacher.get(k))), _esc(_number(student.get(k)))] for k in keys]
    return "<h3>Other measurements</h3>" + _table(["key", "teacher", "student"], rows)


def _comparison(run: RunFiles) -> str:
    if run.report is None:
        return _missing(run, "report.json")
    note = ('<p class="note">↑ higher is better, ↓ lower is better; the same numbers as the table '
            '<code>distill eval</code> prints. Definitions: docs/report.md.</p>')
    return note + _metrics_table(run.report) + _ratios_table(run.report) + _other_measurements(run.report)


# ---------------------------------------------------------------- training curves


def curve_series(metrics: Sequence[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{curve: {"train" | "eval": [(step, value)]}} from metrics.jsonl; eval_X is drawn with X. Rows of a `stages:`
    run (they name their stage) make a line per stage: {curve: {STAGE | "STAGE held-out": ...}}."""
    curves: dict[str, dict[str, list]] = {}
    for record in metrics:
        step = record.get("step")
        if not _finite(step):
            continue
        for key, value in record.items():
            if key == "step" or not _finite(value):
                continue
            prefix = next((p for p in EVAL_PREFIXES if key.startswith(p)), None)
            name, split = (key[len(prefix):], "eval") if prefix else (key, "train")
            if isinstance(record.get("stage"), str):  # a `stages:` run: a line per stage
                split = record["stage"] if split == "train" else f"{record['stage']} {SERIES_NAMES['eval']}"
            curves.setdefault(name, {}).setdefault(split, []).append((step, value))
    order = [k for k in CURVE_LABELS if k in curves] + [k for k in curves if k not in CURVE_LABELS]
    return {k: curves[k] for k in order}


def _curves(run: RunFiles) -> str:
    if not run.metrics:
        return _missing(run, "metrics.jsonl")
    charts = [plots.line_chart([plots.Series(SERIES_NAMES.get(split, split), pts) for split, pts in splits.items()],
                               title=CURVE_LABELS.get(name, name), x_label="step", y_label=name)
              for name, splits in curve_series(run.metrics).items()]
    if not charts:
        return '<p class="missing">metrics.jsonl has no numeric values with a step to plot.</p>'
    skipped = run.problems.get("metrics.jsonl")
    note = f'<p class="note">metrics.jsonl: {_esc(skipped)} (a line cut short by a kill).</p>' if skipped else ""
    return note + f'<div class="plots">{"".join(charts)}</div>'


# ---------------------------------------------------------------- Pareto: quality vs size and latency


def _latency_ms(run: RunFiles, side: str) -> Optional[float]:
    speed = run.value(side, "decode_tokens_per_s")
    return 1000.0 / speed if _finite(speed) and speed > 0 else None


def _params(run: RunFiles, side: str) -> Optional[float]:
    return run.value(side, "params")


def pareto_points(run: RunFiles, others: Sequence[RunFiles],
                  x_of: Callable[[RunFiles, str], Optional[float]]) -> list[plots.Point]:
    """Each run's student at its quality % of teacher, and each distinct teacher at 100%."""
    points, teachers_seen = [], set()
    for r in [run, *others]:
        teacher_x, student_x = x_of(r, "teacher"), x_of(r, "student")
        quality = r.value("ratios", "quality_pct_of_teacher")
        if teacher_x is not None and (r.teacher_name, teacher_x) not in teachers_seen:
            teachers_seen.add((r.teacher_name, teacher_x))
            model = ((r.recipe or {}).get("teacher") or {}).get("model")
            points.append(plots.Point(_short(model), teacher_x, 100.0, "teacher"))
        if student_x is not None and quality is not None:
            group = "this run's student" if r is run else "other runs' students"
            points.append(plots.Point(r.name, student_x, quality, group))
    return points


def _pareto(run: RunFiles, others: Sequence[RunFiles]) -> str:
    if run.report is None:
        return _missing(run, "report.json")
    y_label, reference = "quality, % of teacher", (100.0, "teacher = 100%")
    by_size = plots.scatter_chart(pareto_points(run, others, _params), title="Quality vs parameters",
                                  x_label="parameters (log scale)", y_label=y_label, log_x=True,
                                  y_reference=reference)
    by_latency = plots.scatter_chart(pareto_points(run, others, _latency_ms), title="Quality vs decode latency",
                                     x_label="decode latency, ms per token", y_label=y_label, y_reference=reference)
    notes = []
    for r in [run, *others]:
        if r.report is None:
            notes.append(f"{r.name}: no report.json, not plotted")
        elif r.value("ratios", "quality_pct_of_teacher") is None:
            notes.append(f"{r.name}: no quality % of teacher (needs perplexity or ROUGE-L), student not plotted")
        elif _latency_ms(r, "student") is None:
            notes.append(f"{r.name}: speed not measured (eval.measure_speed), not on the latency chart")
    text = ('<p class="note">Quality is report.json\'s quality_pct_of_teacher (each run relative to its own '
            'teacher). Up and left is better; the dashed staircase joins the points no other point beats on both '
            'axes. Other runs\' students appear here when the report is made with their run directories.</p>')
    text += "".join(f'<p class="note">{_esc(n)}</p>' for n in notes)
    return text + f'<div class="plots">{by_size}{by_latency}</div>'


# ---------------------------------------------------------------- optional parts of report.json


def per_model(report: dict, key: str) -> dict[str, Any]:
    """{side: value} from report[key][side], or else report[side][key]; sides without one are left out."""
    top = report.get(key) if isinstance(report.get(key), dict) else {}
    found = {side: top.get(side) if top.get(side) is not None else (report.get(side) or {}).get(key)
             for side in SIDES}
    return {side: value for side, value in found.items() if value is not None}


def _calibration(report: dict) -> Optional[str]:
    models = {side: v for side, v in per_model(report, "calibration").items() if isinstance(v, dict)}
    if not models:
        return None
    tokens = {side: sum(b["count"] for b in plots.calibration_bins(data)) for side, data in models.items()}
    rows = [[_esc(side), _esc(_number(data.get("ece"))), _esc(_number(tokens[side]))] for side, data in models.items()]
    return (plots.reliability_diagram(models, title="Reliability diagram")
            + _table(["model", "ECE", "tokens"], rows)
            + '<p class="note">A point below the diagonal is over-confident: its tokens were right less often '
              'than the model\'s probability said. ECE: the count-weighted mean gap between the two.</p>')


def suite_rows(report: dict) -> list[tuple[str, str, Any, Any]]:
    """(suite, task, teacher score, student score) rows from report.json's `suites` (shapes: docs/report.md)."""
    by_side = per_model(report, "suites")
    if not by_side and isinstance(report.get("suites"), dict):
        by_side = {"student": report["suites"]}
    rows: dict[tuple[str, str], dict] = {}
    for side, suites in by_side.items():
        for suite, tasks in suites.items() if isinstance(suites, dict) else ():
            for task, score in tasks.items() if isinstance(tasks, dict) else ():
                rows.setdefault((str(suite), str(task)), {})[side] = score
    return [(suite, task, s.get("teacher"), s.get("student")) for (suite, task), s in rows.items()]


def _suites(report: dict) -> Optional[str]:
    rows = suite_rows(report)
    if not rows:
        return None
    cells = []
    for suite, task, teacher, student in rows:
        pct = f"{100 * student / teacher:.1f}%" if _finite(teacher) and _finite(student) and teacher else MISSING
        cells.append([_esc(suite), _esc(task), _esc(_number(teacher)), _esc(_number(student)), pct])
    return _table(["suite", "task", "teacher", "student", "% of teacher"], cells, numeric_from=2)


def _judge(report: dict) -> Optional[str]:
    judge = report.get("judge")
    if not isinstance(judge, dict):
        return None
    win_rate = judge.get("win_rate")
    parts = [f"<p><strong>Student win rate against the teacher: "
             f"{_esc(f'{100 * win_rate:.1f}%' if _finite(win_rate) else MISSING)}</strong>"
             + (f" (judge: {_esc(judge['judge'])})" if judge.get("judge") else "") + "</p>"]
    counts = [(label, judge.get(key)) for key, label in
              (("wins", "student better"), ("ties", "tie"), ("losses", "teacher better"))]
    if any(_finite(v) for _, v in counts):
        parts.append(plots.stacked_bar(counts, title="Judge verdicts"))
    extra = {k: v for k, v in judge.items() if k not in ("win_rate", "judge", "prompt", "wins", "ties", "losses")
             and not isinstance(v, (dict, list))}
    if extra:
        parts.append(_table(["key", "value"], [[_esc(k), _esc(_number(v))] for k, v in extra.items()]))
    prompt = judge.get("prompt")
    parts.append(f"<h3>Judge prompt</h3><pre>{_esc(prompt)}</pre>" if prompt
                 else '<p class="missing">report.json\'s judge has no "prompt": the verdicts cannot be read '
                      'without it.</p>')
    return "".join(parts)


def _lm_eval(report: dict) -> Optional[str]:
    """lm-evaluation-harness scores of teacher and student (distill eval --lm-eval)."""
    rows = lm_eval_rows(report)
    if not rows:
        return None
    section = report["lm_eval"]
    note = (f'<p class="note">lm-eval {_esc(section.get("version") or "")}, tasks <code>{_esc(section.get("tasks"))}'
            f'</code>, few-shot {_esc(_number(section.get("num_fewshot")))}, limit {_esc(_number(section.get("limit")))}'
            '; standard errors are in report.json.</p>')
    cells = []
    for task, metric, teacher, student, n in rows:
        pct = f"{100 * student / teacher:.1f}%" if _finite(teacher) and _finite(student) and teacher else MISSING
        cells.append([_esc(task), _esc(metric), _esc(_number(teacher)), _esc(_number(student)), pct,
                      _esc(_number(n))])
    return note + _table(["task", "metric", "teacher", "student", "% of teacher", "n"], cells, numeric_from=2)


def _exports(report: dict) -> Optional[str]:
    """The files `distill export` wrote, measured like the student (the table's exports block)."""
    header, rows, notes = export_rows(report)
    if not rows:
        return None
    text = ('<p class="note">Each export under <code>&lt;run&gt;/exports/</code>, measured by <code>distill '
            'eval</code> on the same eval set as the student; export, then run <code>distill eval</code> again to '
            'add one. A GGUF file is scored dequantized by transformers.</p>')
    table = _table([_esc(h) for h in header], [[_esc(c) for c in row] for row in rows], numeric_from=2)
    return text + table + "".join(f'<p class="note">{_esc(n)}</p>' for n in notes)


def _preference(report: dict) -> Optional[str]:
    """What a dpo run trained on (the pairs' source and counts) and on how many held-out pairs it was scored."""
    note = preference_note(report)
    return f"<p>{_esc(note)}</p>" if note else None


OPTIONAL_PARTS = (("exports", "Exported files", _exports), ("calibration", "Calibration", _calibration),
                  ("suites", "Task suites", _suites), ("lm_eval", "lm-evaluation-harness", _lm_eval),
                  ("judge", "Judge win rate", _judge), ("preference", "Preference pairs", _preference))


# ---------------------------------------------------------------- sample answers


def _answer_cell(text: object) -> str:
    return _esc(text) if text else '<span class="empty">(empty)</span>'


def _samples(run: RunFiles) -> str:
    if not run.samples:
        return _missing(run, "samples.jsonl")
    shown = run.samples[:MAX_SAMPLES]
    rows = [[_answer_cell(s.get(k)) for k in ("prompt", "reference", "teacher", "student")] for s in shown]
    note = f'<p class="note">The first {len(shown)} of {len(run.samples)} eval prompts, greedy answers.</p>'
    return note + _table(["prompt", "reference", "teacher", "student"], rows, numeric_from=None, cls="samples")


# ---------------------------------------------------------------- the page and the summary


def render_html(run: RunFiles, others: Sequence[RunFiles] = ()) -> str:
    """The whole report page: every section, each saying what is missing when its data is not there."""
    sections = [
        _section("summary", "Run", _summary(run)),
        _section("teacher-vs-student", "Teacher vs student", _comparison(run)),
        _section("curves", "Training curves", _curves(run)),
        _section("pareto", "Quality vs size and speed", _pareto(run, others)),
    ]
    absent = []
    for key, title, render in OPTIONAL_PARTS:
        body = render(run.report) if run.report is not None else None
        if body:
            sections.append(_section(key, title, body))
        else:
            absent.append(key)
    sections.append(_section("samples", "Sample answers", _samples(run)))
    footer = (f'<footer class="note"><p>Made by distill from {_esc(run.path.resolve())}.'
              + (f" report.json has no {', '.join(absent)} section." if run.report is not None and absent else "")
              + "</p></footer>")
    title = f"Distillation report: {run.name}"
    # The policy forbids every fetch: the page is one file and stays one file.
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
            f"<title>{_esc(title)}</title><style>{CSS}</style></head>\n<body><h1>{_esc(title)}</h1>\n"
            + "\n".join(sections) + f"\n{footer}\n</body></html>\n")


def render_markdown(run: RunFiles, html_name: str = "report.html") -> str:
    """A short text summary: the run, the CLI table, the last training step, optional scores, what is missing.

    Every name and value from the run's files goes through _md: it renders as the text it is, never as HTML,
    a link or an image.
    """
    lines = [f"# Distillation report: {_md(run.name)}", ""]
    lines += [f"- **{_md(k)}**: {_md(v)}" for k, v in summary_rows(run)] + [""]
    if run.report is not None:
        table = format_table(run.report).rstrip("\n")
        fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", table)), default=0))  # none closes it early
        lines += ["## Teacher vs student", "", fence, table, fence, ""]
        lines += _markdown_extras(run.report)
    steps = [r for r in run.metrics if r.get("split") != EVAL_SPLIT]
    evals = [r for r in run.metrics if r.get("split") == EVAL_SPLIT]
    if steps:
        lines += ["## Training", "", f"{len(steps)} logged steps; the last, step {_md(steps[-1].get('step'))}: "
                                     f"{_values_text(steps[-1])}.", ""]
    if evals:
        lines += [f"{len(evals)} held-out evaluations; the last, step {_md(evals[-1].get('step'))}: "
                  f"{_values_text(evals[-1])}.", ""]
    missing = [f"- {name}: {_md(run.problems.get(name, 'absent'))}; {HOW_TO[name]}." for name in HOW_TO
               if _absent(run, name)]
    if missing:
        lines += ["## Missing", ""] + missing + [""]
    lines.append(f"Plots and sample answers: {_md(html_name)} beside this file.")
    return "\n".join(lines) + "\n"


def _values_text(record: dict) -> str:
    """A metrics.jsonl row's numbers as Markdown text: "loss 2.5, kd 1.2"."""
    return ", ".join(f"{_md(k)} {v:.4g}" for k, v in record.items() if k != "step" and _finite(v))


def _absent(run: RunFiles, name: str) -> bool:
    return {"report.json": run.report is None, "metrics.jsonl": not run.metrics,
            "samples.jsonl": not run.samples, "recipe.yaml": run.recipe is None}[name]


def _md(value: object) -> str:
    """A name or value as Markdown text that shows as itself: one line, HTML as entities, no emphasis, code or links.

    `|` is escaped too, so the text also fits a table cell.
    """
    one_line = " ".join(str(value).split())  # a newline could start a heading or a raw HTML block
    return MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(one_line, quote=False))


def _markdown_extras(report: dict) -> list[str]:
    lines = []
    calibration = per_model(report, "calibration")
    if calibration:
        eces = ", ".join(f"{_md(side)} {_md(_number(v.get('ece') if isinstance(v, dict) else None))}"
                         for side, v in calibration.items())
        lines += [f"Calibration (ECE, lower is better): {eces}.", ""]
    rows = suite_rows(report)
    if rows:
        lines += ["## Task suites", "", "| suite | task | teacher | student |", "|---|---|---:|---:|"]
        lines += [f"| {_md(s)} | {_md(t)} | {_md(_number(a))} | {_md(_number(b))} |" for s, t, a, b in rows] + [""]
    judge = report.get("judge")
    if isinstance(judge, dict) and _finite(judge.get("win_rate")):
        lines += [f"Judge ({_md(judge.get('judge', 'unnamed'))}): the student wins {100 * judge['win_rate']:.1f}% "
                  "against the teacher.", ""]
    return lines


def write_report(run_dir: Path, *, out: Optional[Path] = None, compare_with: Sequence[Path] = ()) -> Path:
    """Write <run>/report.html (or `out`) and the Markdown summary beside it (.md), atomically; return the HTML path."""
    run = load_run(Path(run_dir))
    others = [load_run(Path(p)) for p in compare_with]
    html_path = Path(out) if out is not None else run.path / "report.html"
    if html_path.suffix == ".md":
        raise DistillError(f"{html_path}: the HTML report needs another name; its Markdown summary takes the .md")
    atomic_write_text(html_path, render_html(run, others))
    atomic_write_text(html_path.with_suffix(".md"), render_markdown(run, html_path.name))
    return html_path
