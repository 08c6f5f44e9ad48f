"""Reading a run directory's artifacts, and `distill compare`: one row per run."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from distill.errors import DistillError
from distill.rundir import RunDir
from distill.report.table import MISSING, RATIOS, ROWS

RUN_FILES = ("recipe.yaml", "report.json", "metrics.jsonl", "samples.jsonl")


@dataclass
class RunFiles:
    """What a run directory holds; a file that is absent or unreadable is None / empty, with the reason."""

    path: Path
    recipe: Optional[dict] = None
    report: Optional[dict] = None
    metrics: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)  # file name -> why it could not be read

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def teacher_name(self) -> Optional[str]:
        teacher = (self.recipe or {}).get("teacher") or {}
        model = teacher.get("model")
        return f"{model} ({teacher['gguf_file']})" if model and teacher.get("gguf_file") else model

    def value(self, section: str, key: str) -> Any:
        """report.json[section][key], or None when the report or the value is missing."""
        return ((self.report or {}).get(section) or {}).get(key)


def _read_yaml(path: Path, problems: dict) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        problems[path.name] = f"not valid YAML ({getattr(err, 'problem', err)})"
        return None
    return data if isinstance(data, dict) else None


def _read_json(path: Path, problems: dict) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        problems[path.name] = f"not valid JSON (line {err.lineno}: {err.msg})"
        return None
    if not isinstance(data, dict):
        problems[path.name] = "not a JSON object"
        return None
    return data


def _read_jsonl(path: Path, problems: dict) -> list[dict]:
    """The readable object lines; a line cut short by a kill is skipped and counted."""
    if not path.is_file():
        return []
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        problems[path.name] = f"{bad} unreadable line{'s' if bad > 1 else ''} skipped"
    return rows


def load_run(run_dir: Path) -> RunFiles:
    """Read recipe.yaml, report.json, metrics.jsonl and samples.jsonl from a run directory, whichever exist."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DistillError(f"{run_dir}: not found (expected a run directory)")
    if not any((run_dir / name).is_file() for name in RUN_FILES):
        raise DistillError(f"{run_dir}: not a run directory (none of {', '.join(RUN_FILES)})")
    problems: dict[str, str] = {}
    recipe = _read_yaml(run_dir / "recipe.yaml", problems)
    return RunFiles(
        path=run_dir,
        recipe=recipe,
        report=_read_json(run_dir / "report.json", problems),
        metrics=_stage_metrics(run_dir, recipe, problems) or _read_jsonl(run_dir / "metrics.jsonl", problems),
        samples=_read_jsonl(run_dir / "samples.jsonl", problems),
        problems=problems,
    )


def _stage_metrics(run_dir: Path, recipe: Optional[dict], problems: dict) -> list[dict]:
    """A `stages:` run's metrics, stage after stage: each row names its `stage`, and its step counts on from the
    stages before (so the curves continue); [] for a run without stages."""
    stages = (recipe or {}).get("stages")
    if not isinstance(stages, list):
        return []
    rows, offset = [], 0
    for stage in stages:
        name = stage.get("name") if isinstance(stage, dict) else None
        if not isinstance(name, str):
            continue
        found = _read_jsonl(RunDir(run_dir).for_stage(name, final=False).metrics, problems)
        steps = [row["step"] for row in found if isinstance(row.get("step"), (int, float))]
        rows += [{**row, "stage": name, "step": row["step"] + offset} if "step" in row else {**row, "stage": name}
                 for row in found]
        offset += max(steps, default=0)
    return rows


# (column header, report section, key); formats come from the teacher-vs-student table, so numbers match it
COLUMNS = (
    ("student params (M)", "student", "params"),
    ("perplexity", "student", "perplexity"),
    ("top-1 agreement", "student", "top1_agreement"),
    ("ROUGE-L", "student", "rougeL_ref"),
    ("decode tok/s", "student", "decode_tokens_per_s"),
    ("% of teacher", "ratios", "quality_pct_of_teacher"),
)
_FORMATS = {row.key: row.fmt for row in ROWS} | {key: fmt for key, _, fmt in RATIOS}


def _row_cells(run: RunFiles) -> list[str]:
    values = [run.value(section, key) for _, section, key in COLUMNS]
    return [MISSING if v is None else _FORMATS[key](v) for v, (_, _, key) in zip(values, COLUMNS)]


def _run_labels(runs: Sequence[RunFiles]) -> list[str]:
    """Directory names, or full paths where two runs share a name."""
    names = [r.name for r in runs]
    return [r.name if names.count(r.name) == 1 else str(r.path) for r in runs]


def compare_runs(run_dirs: Sequence[Path]) -> str:
    """A plain-text table, one row per run: student size, quality, speed and % of teacher from its report.json."""
    if not run_dirs:
        raise DistillError("compare: give at least one run directory")
    runs = [load_run(Path(d)) for d in run_dirs]
    header = ["run"] + [c[0] for c in COLUMNS]
    rows = [header] + [[label] + _row_cells(run) for label, run in zip(_run_labels(runs), runs)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]).rstrip()
             for r in rows]
    return "\n".join(lines + _notes(runs)) + "\n"


def _notes(runs: Sequence[RunFiles]) -> list[str]:
    notes = []
    for label, run in zip(_run_labels(runs), runs):
        if run.report is None:
            why = run.problems.get("report.json", "no report.json")
            notes.append(f"{label}: {why}; run `distill eval` on its recipe to measure it")
    teachers = {run.teacher_name for run in runs if run.report is not None}
    if len(teachers) > 1:
        notes.append("note: these runs have different teachers; each % of teacher is relative to its own")
    return [""] + notes if notes else []

