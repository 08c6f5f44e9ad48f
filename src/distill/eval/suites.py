"""Task suites: a YAML file naming JSONL task files, and running them on one model (see docs/eval.md)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.answers import extract_answer
from distill.data.layouts import Example
from distill.data.tokenize import collate, encode_all, padding_id
from distill.errors import DistillError
from distill.eval.calibration import expected_calibration_error
from distill.eval.metrics import perplexity, rouge_l
from distill.eval.scorers import (
    batch_choice_logprobs,
    best_choice,
    exact_match,
    mc_accuracy,
    per_character,
)
from distill.teachers.local import generate_texts

SUITES_DIR = Path(__file__).with_name("suites")
Kind = Literal["generate", "multiple_choice", "rouge", "perplexity"]
# The scorers each kind accepts; the first is its default.
SCORERS: dict[str, tuple[str, ...]] = {
    "generate": ("exact_match", "rouge_l"),
    "rouge": ("rouge_l",),
    "multiple_choice": (),
    "perplexity": (),
}


# ---------------------------------------------------------------- the YAML schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Fields(_Strict):
    """Which key of a JSONL record holds each part of an item."""

    prompt: str = "prompt"
    answer: str = "answer"
    choices: str = "choices"
    text: str = "text"


class TaskSpec(_Strict):
    """One task of a suite, as written in the YAML file."""

    name: str = Field(min_length=1)
    file: str
    kind: Kind
    scorer: Optional[Literal["exact_match", "rouge_l"]] = None
    extract: Literal["gsm8k", "last_number", "first_line"] = "gsm8k"  # how exact_match finds the answer
    prompt_format: Literal["chat", "text"] = "chat"  # text: a plain continuation (multiple_choice only)
    fields: Fields = Field(default_factory=Fields)
    max_new_tokens: int = Field(default=64, gt=0)
    limit: Optional[int] = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _options_fit_kind(self) -> "TaskSpec":
        if self.scorer is not None and self.scorer not in SCORERS[self.kind]:
            allowed = ", ".join(SCORERS[self.kind]) or "none"
            raise ValueError(f"scorer {self.scorer!r} does not apply to kind {self.kind!r} (allowed: {allowed})")
        if self.prompt_format == "text" and self.kind != "multiple_choice":
            raise ValueError("prompt_format: text applies to kind multiple_choice only")
        return self

    @property
    def metric(self) -> str:
        """The task's score: exact_match, rouge_l, accuracy or perplexity."""
        if self.kind == "multiple_choice":
            return "accuracy"
        if self.kind == "perplexity":
            return "perplexity"
        return self.scorer or SCORERS[self.kind][0]


class SuiteSpec(_Strict):
    """A suite YAML file."""

    name: str = Field(min_length=1)
    description: Optional[str] = None
    tasks: list[TaskSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_task_names(self) -> "SuiteSpec":
        names = [t.name for t in self.tasks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"task names must be unique; repeated: {', '.join(repeated)}")
        return self


# ---------------------------------------------------------------- loaded suites


@dataclass
class Item:
    """One question of a task."""

    where: str  # file:line
    prompt: Optional[str]  # None for a plain text (perplexity)
    reference: str  # the expected answer (as extracted, for exact_match), the correct choice, or the text
    choices: Optional[list[str]] = None
    answer_index: Optional[int] = None


@dataclass
class Task:
    spec: TaskSpec
    items: list[Item]


@dataclass
class Suite:
    name: str
    path: Path
    tasks: list[Task]


def shipped_suites() -> list[str]:
    """Names of the suites that ship with distill (load_suite takes these names as well as paths)."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def _suite_path(path_or_name: str | Path) -> Path:
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    shipped = SUITES_DIR / f"{path_or_name}.yaml"
    if shipped.is_file():
        return shipped
    raise DistillError(f"{path}: suite file not found (shipped suites: {', '.join(shipped_suites())})")


def _format_error(source: Path, data: dict, err: ValidationError) -> str:
    """One line: the YAML file, the key path (with the task's name), and what is wrong."""
    first = err.errors()[0]
    loc = list(first["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    if loc[:1] == ["tasks"] and len(loc) > 1 and isinstance(loc[1], int):
        tasks = data.get("tasks")
        task = tasks[loc[1]] if isinstance(tasks, list) and loc[1] < len(tasks) else None
        if isinstance(task, dict) and isinstance(task.get("name"), str):
            where += f" (task {task['name']!r})"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "missing required key"
    elif first["type"] == "literal_error":
        msg = f"{first['input']!r} is not one of {first['ctx']['expected']}"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {where}: {msg}{more}"


def load_suite(path_or_name: str | Path) -> Suite:
    """Read and check a suite YAML file (or a shipped suite by name) and every task file it names."""
    path = _suite_path(path_or_name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise DistillError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DistillError(f"{path}: a suite must be a mapping with name and tasks")
    try:
        spec = SuiteSpec.model_validate(data)
    except ValidationError as err:
        raise DistillError(_format_error(path, data, err)) from None
    tasks = []
    for i, task in enumerate(spec.tasks):
        file = path.parent / task.file
        if not file.is_file():
            raise DistillError(f"{path}: tasks.{i}.file (task {task.name!r}): file not found: {file}")
        tasks.append(Task(spec=task, items=_read_items(file, task)))
    return Suite(name=spec.name, path=path, tasks=tasks)


# ---------------------------------------------------------------- task files


def _records(path: Path) -> list[tuple[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DistillError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise DistillError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
    return records


def field_text(record: dict, key: str) -> str:
    """A non-empty string field; numbers (a bare `72` answer) are taken as text."""
    if key not in record:
        raise ValueError(f"missing key {key!r}")
    value = record[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key!r} must be a non-empty string")
    return value


def choices_and_answer(record: dict, fields: Fields) -> tuple[list[str], int]:
    """The choices and the correct one's index; the answer is an index, the choice's text, or a letter."""
    choices = record.get(fields.choices)
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{fields.choices!r} must be a list of at least two non-empty strings")
    answer = record.get(fields.answer)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return choices, answer
    if isinstance(answer, str) and answer in choices:
        return choices, choices.index(answer)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(choices)]
    if isinstance(answer, str) and len(answer) == 1 and answer in letters:
        return choices, letters.index(answer)
    raise ValueError(f"{fields.answer!r} must be a choice's index (from 0), its text or its letter, got {answer!r}")


def _item(where: str, record: dict, spec: TaskSpec) -> Item:
    f = spec.fields
    if spec.kind == "perplexity" and f.text in record:
        return Item(where, None, field_text(record, f.text))
    prompt = field_text(record, f.prompt)
    if spec.kind == "multiple_choice":
        choices, index = choices_and_answer(record, f)
        return Item(where, prompt, choices[index], choices, index)
    reference = field_text(record, f.answer)
    if spec.metric == "exact_match":
        extracted = extract_answer(reference, spec.extract)
        if extracted is None:
            raise ValueError(f"no answer in {f.answer!r} for extract: {spec.extract} ({reference[:40]!r})")
        reference = extracted
    return Item(where, prompt, reference)


def _read_items(path: Path, spec: TaskSpec) -> list[Item]:
    items = parsed_records(path, lambda where, record: _item(where, record, spec), spec.limit)
    if not items:
        raise DistillError(f"{path}: no items (task {spec.name!r})")
    return items


def parsed_records(path: Path, parse: Callable[[str, dict], Any], limit: int | None = None) -> list:
    """parse(where, record) of each JSONL object; a non-object or a ValueError is one line naming file:line."""
    out = []
    for where, record in _records(path)[:limit]:
        if not isinstance(record, dict):
            raise DistillError(f"{where}: expected a JSON object, got {type(record).__name__}")
        try:
            out.append(parse(where, record))
        except ValueError as err:
            raise DistillError(f"{where}: {err}") from None
    return out


# ---------------------------------------------------------------- running


def _chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _generate(model, tokenizer, task: Task, batch_size: int, progress: bool) -> list[str]:
    prompts = [_chat(item.prompt) for item in task.items]
    texts = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=task.spec.name, disable=not progress, leave=False):
        chunk = prompts[start:start + batch_size]
        texts += [g.text for g in generate_texts(model, tokenizer, chunk, max_new_tokens=task.spec.max_new_tokens)]
    return texts


def _run_generate(model, tokenizer, task: Task, batch_size: int, progress: bool) -> dict:
    rows = []
    for item, text in zip(task.items, _generate(model, tokenizer, task, batch_size, progress)):
        row = {"prompt": item.prompt, "prediction": text, "reference": item.reference}
        if task.spec.metric == "rouge_l":
            row.update(score=rouge_l(text, item.reference), correct=None)
        else:
            row["extracted"] = extract_answer(text, task.spec.extract)
            row["correct"] = exact_match(row["extracted"], item.reference)
            row["score"] = float(row["correct"])
        rows.append(row)
    return {"score": sum(r["score"] for r in rows) / len(rows), "items": rows}


def _softmax(scores: list[float]) -> list[float]:
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]


def _run_multiple_choice(model, tokenizer, task: Task, batch_size: int, progress: bool) -> dict:
    as_text = task.spec.prompt_format == "text"
    questions = [(item.prompt if as_text else _chat(item.prompt), item.choices) for item in task.items]
    try:
        raw = batch_choice_logprobs(model, tokenizer, questions, batch_size=batch_size)
    except ValueError as err:
        raise DistillError(f"task {task.spec.name!r}: {err}") from None
    normalized = [per_character(scores, item.choices) for scores, item in zip(raw, task.items)]
    answers = [item.answer_index for item in task.items]
    rows = []
    for item, scores in zip(task.items, raw):
        chosen = best_choice(scores)
        rows.append({
            "prompt": item.prompt, "prediction": item.choices[chosen], "reference": item.reference,
            "correct": chosen == item.answer_index, "score": float(chosen == item.answer_index),
            "choices": item.choices, "logprobs": scores,
            "confidence": _softmax(scores)[chosen],  # the chosen choice's share of the probability over the choices
        })
    return {
        "score": mc_accuracy(raw, answers),
        "accuracy_norm": mc_accuracy(normalized, answers),
        "ece": expected_calibration_error([r["confidence"] for r in rows], [r["correct"] for r in rows]),
        "items": rows,
    }


def _run_perplexity(model, tokenizer, task: Task, batch_size: int, progress: bool) -> dict:
    examples = [
        Example(id=item.where, text=item.reference) if item.prompt is None
        else Example(id=item.where, messages=[*_chat(item.prompt), {"role": "assistant", "content": item.reference}])
        for item in task.items
    ]
    max_length = getattr(model.config, "max_position_embeddings", None) or 2048
    encoded = encode_all(examples, tokenizer, max_length, source=f"task {task.spec.name!r}")
    pad_id = padding_id(tokenizer)
    batches = (collate(encoded[s:s + batch_size], pad_id) for s in range(0, len(encoded), batch_size))
    result = perplexity(model, batches)
    # per-item rows would need one forward pass per item; a perplexity task reports the total only
    return {"score": result["perplexity"], "nll": result["nll"], "tokens": result["tokens"], "items": []}


RUNNERS: dict[str, Callable[..., dict]] = {
    "generate": _run_generate,
    "rouge": _run_generate,
    "multiple_choice": _run_multiple_choice,
    "perplexity": _run_perplexity,
}


def run_suite(
    suite: Suite,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Run every task of the suite on one model: per-task scores and per-item rows (prompt, prediction, ...)."""
    tasks = {}
    for task in tqdm(suite.tasks, desc=f"suite {suite.name}", disable=not progress, leave=False):
        result = RUNNERS[task.spec.kind](model, tokenizer, task, batch_size, progress)
        tasks[task.spec.name] = {"kind": task.spec.kind, "metric": task.spec.metric, "n": len(task.items), **result}
    return {
        "suite": suite.name,
        "path": str(suite.path),
        "scores": {name: result["score"] for name, result in tasks.items()},
        "tasks": tasks,
    }
