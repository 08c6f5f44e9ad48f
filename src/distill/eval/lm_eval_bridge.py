"""lm-evaluation-harness on an already-loaded model: lm-eval task names, or local JSONL files as tasks.

lm-eval is an optional extra and slow to import (seconds), so it is imported only when a task runs.
"""
from __future__ import annotations

import copy
import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.errors import DistillError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

KINDS = ("multiple_choice", "generate", "perplexity")
# The record keys each kind reads (`question` falls back to `prompt`, the key distill's suites use).
DEFAULT_FIELDS = {"question": "question", "choices": "choices", "answer": "answer", "text": "text"}
MAX_GEN_TOKS = 32
_NAME = re.compile(r"[A-Za-z0-9_.\-*]+$")
INSTALL_HINT = "pip install 'distill[lm-eval]'"


@dataclass(frozen=True)
class LmEvalTask:
    """One task: an lm-eval task (or group) by name, or a local JSONL file (`path` and `kind` set)."""

    name: str
    path: Path | None = None
    kind: str | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None


# ---------------------------------------------------------------- the --lm-eval spec string


def parse_task_specs(text: str) -> list[LmEvalTask]:
    """Parse `TASK[,TASK...]`; a TASK is an lm-eval task name or `NAME=PATH.jsonl:KIND` for a local file."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise DistillError("lm-eval tasks: empty list (give TASK[,TASK...], e.g. hellaswag or facts=facts.jsonl:multiple_choice)")
    tasks = [_parse_one(item) for item in items]
    names = [t.name for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DistillError(f"lm-eval tasks: task name repeated: {', '.join(repeated)}")
    return tasks


def _parse_one(item: str) -> LmEvalTask:
    if not item:
        raise DistillError("lm-eval tasks: empty task between commas")
    if "=" not in item:
        if not _NAME.match(item):
            raise DistillError(f"lm-eval task {item!r}: not a task name; a local file is NAME=PATH.jsonl:KIND")
        return LmEvalTask(item)
    name, rest = (part.strip() for part in item.split("=", 1))
    if not _NAME.match(name) or "*" in name:
        raise DistillError(f"lm-eval task {item!r}: {name!r} is not a task name (letters, digits, _ . -)")
    if ":" not in rest:
        raise DistillError(f"lm-eval task {item!r}: missing :KIND after the path ({' | '.join(KINDS)})")
    path, kind = (part.strip() for part in rest.rsplit(":", 1))  # rsplit: the path may hold a colon
    if kind not in KINDS:
        raise DistillError(f"lm-eval task {item!r}: kind {kind!r} is not one of {', '.join(KINDS)}")
    if not path:
        raise DistillError(f"lm-eval task {item!r}: missing the path before :{kind}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise DistillError(f"lm-eval task {name!r}: file not found: {file}")
    return LmEvalTask(name, file, kind)


# ---------------------------------------------------------------- local JSONL files as lm-eval task configs


def local_task_config(
    name: str, jsonl_path: Path, kind: str, fields: dict[str, str] | None = None, *, work_dir: Path
) -> dict[str, Any]:
    """Check a local JSONL task file, write it to work_dir in canonical form, return its lm-eval task config."""
    if kind not in KINDS:
        raise DistillError(f"lm-eval task {name!r}: kind {kind!r} is not one of {', '.join(KINDS)}")
    records = _canonical_records(Path(jsonl_path), kind, {**DEFAULT_FIELDS, **(fields or {})})
    data_file = Path(work_dir) / f"{name}.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return {
        "task": name,
        "dataset_path": "json",
        # cache_dir: datasets' Arrow cache stays in work_dir instead of piling up in ~/.cache
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(Path(work_dir) / "datasets")},
        "test_split": "test",
        "fewshot_split": "test",  # the only split; lm-eval leaves the current item out of its own shots
        **_KIND_CONFIG[kind],
        "metadata": {"version": 1.0, "source": str(jsonl_path)},
    }


_EXACT = {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": True,
          "ignore_punctuation": True, "regexes_to_ignore": [r"^\s+", r"\s+$"]}
_KIND_CONFIG: dict[str, dict[str, Any]] = {
    # A plain field name makes lm-eval take the record's value as is (no Jinja rendering).
    "multiple_choice": {
        "output_type": "multiple_choice", "doc_to_text": "question", "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    },
    "generate": {
        "output_type": "generate_until", "doc_to_text": "question", "doc_to_target": "answer",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": MAX_GEN_TOKS, "do_sample": False},
        "metric_list": [_EXACT],
    },
    "perplexity": {
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
        "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": False} for m, a in (
            ("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
            ("bits_per_byte", "bits_per_byte"))],
    },
}


def _canonical_records(path: Path, kind: str, fields: dict[str, str]) -> list[dict[str, Any]]:
    """Every record checked (one-line errors naming file:line) and rewritten with the keys the config reads."""
    from distill.eval.suites import parsed_records  # noqa: PLC0415 -- suites imports transformers

    records = parsed_records(path, lambda where, record: _canonical(record, kind, fields))
    if not records:
        raise DistillError(f"{path}: no records")
    return records


def _canonical(record: dict, kind: str, fields: dict[str, str]) -> dict[str, Any]:
    from distill.eval.suites import Fields, choices_and_answer, field_text  # noqa: PLC0415 -- as above

    if kind == "perplexity":
        return {"text": field_text(record, fields["text"])}
    question_key = fields["question"]
    if question_key == "question" and "question" not in record and "prompt" in record:
        question_key = "prompt"
    question = field_text(record, question_key)
    if kind == "generate":
        return {"question": question, "answer": field_text(record, fields["answer"])}
    choices, index = choices_and_answer(record, Fields(choices=fields["choices"], answer=fields["answer"]))
    return {"question": question, "choices": choices, "answer": index}


# ---------------------------------------------------------------- running


def _import_lm_eval():
    try:
        from lm_eval import evaluator  # noqa: PLC0415
        from lm_eval.models.huggingface import HFLM  # noqa: PLC0415
        from lm_eval.tasks import TaskManager  # noqa: PLC0415
    except ModuleNotFoundError as err:
        missing = "" if err.name == "lm_eval" else f" completely (its dependency {err.name!r} is missing)"
        raise DistillError(f"lm-evaluation-harness is not installed{missing}: {INSTALL_HINT}") from None
    return evaluator, HFLM, TaskManager


def _as_tasks(tasks: list[LmEvalTask | str]) -> list[LmEvalTask]:
    out = []
    for task in tasks:
        out += parse_task_specs(task) if isinstance(task, str) else [task]
    return out


def _load_named(names: list[str], task_manager: Any) -> dict[str, Any]:
    """lm-eval's own tasks by name; their datasets come from the Hugging Face Hub (or its local cache)."""
    unknown = [n for n in names if not task_manager.match_tasks([n])]
    if unknown:
        raise DistillError(
            f"lm-eval task {unknown[0]!r}: not an lm-eval task name; for a local file write "
            f"NAME=PATH.jsonl:KIND ({' | '.join(KINDS)})"
        )
    try:
        return task_manager.load(task_manager.match_tasks(names))["tasks"]
    except (ConnectionError, OSError) as err:
        raise DistillError(
            f"lm-eval task {', '.join(names)}: could not load its dataset ({str(err).splitlines()[0]}); "
            f"lm-eval's own tasks need network access to the Hugging Face Hub (or the dataset in the local HF "
            f"cache); offline, point at a local file instead: NAME=PATH.jsonl:KIND ({' | '.join(KINDS)})"
        ) from None


def load_tasks(tasks: list[LmEvalTask | str], work_dir: Path) -> dict[str, Any]:
    """lm-eval Task objects by name: local files as generated configs (written to work_dir), then named tasks."""
    _, _, TaskManager = _import_lm_eval()
    specs = _as_tasks(tasks)
    configs = [local_task_config(t.name, t.path, t.kind, work_dir=work_dir) for t in specs if t.is_local]
    named = [t.name for t in specs if not t.is_local]
    # Indexing lm-eval's ~15k shipped task YAMLs takes ~20 s: only when a task is named.
    loaded = TaskManager(include_defaults=False).load(configs)["tasks"] if configs else {}
    if named:
        loaded.update(_load_named(named, TaskManager()))
    return loaded


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's `metric,filter` keys as `metric` (filter `none`) or `metric,filter`; stderr as `metric_stderr`."""
    out = {}
    for key, value in task_results.items():
        if "," not in key or _number(value) is None:
            continue  # alias, name, sample_len, and stderr lm-eval could not compute ("N/A")
        metric, filter_name = key.split(",", 1)
        out[metric if filter_name == "none" else key] = _number(value)
    return out


def run_lm_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[LmEvalTask | str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval on a loaded HF model; {task: {metric: value, metric_stderr: se, n: items}}."""
    evaluator, HFLM, TaskManager = _import_lm_eval()
    with tempfile.TemporaryDirectory(prefix="distill-lm-eval-") as work_dir:
        loaded = load_tasks(tasks, Path(work_dir))
        # A copy: HFLM sets a pad token and padding side on the tokenizer it is given.
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        results = evaluator.simple_evaluate(
            model=lm, tasks=list(loaded.values()), limit=limit, num_fewshot=num_fewshot,
            task_manager=TaskManager(include_defaults=False),  # the tasks are loaded; its default indexes ~15k YAMLs
            bootstrap_iters=1000,  # closed-form stderr for means; a short bootstrap for the rest
            log_samples=False,
        )
    counts = results.get("n-samples", {})
    return {
        task: {**_metrics(values), **({"n": counts[task]["effective"]} if task in counts else {})}
        for task, values in results["results"].items()
    }
