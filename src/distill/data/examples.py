"""Reading training examples, prompts and teacher answers from files (any layout), and the train/eval split."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable

from distill.data.layouts import (
    EmptyAnswer,
    Example,
    LabelledExample,
    PreferencePair,
    Prompt,
    RecordError,
    example_from_record,
    labelled_from_record,
    map_fields,
    pair_from_record,
    prompt_from_record,
)
from distill.data.readers import (
    HUB_DATASET,
    Malformed,
    check_suffix,
    hub_records,
    json_records,
    jsonl_records,
    prompt_records,
    read_text,
    text_blocks,
)
from distill.data.teacher_records import latest_records, shard_paths
from distill.errors import DistillError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- examples, prompts and teacher answers


class _Collector:
    """Turns records into items: errors name file:line, repeated ids are refused, duplicates and empty answers
    are skipped with one counted warning each."""

    def __init__(self, path: Path, empty_reason: str = "an empty answer", skip_bad: bool | None = None):
        # skip_bad None: this reader cannot skip; False: it can (data.on_error: skip), so the error says so
        self.path, self.empty_reason, self.skip_bad = path, empty_reason, skip_bad
        self.bad, self.first_bad = 0, ""
        self.first: dict[str, str] = {}
        self.items: list = []
        self.duplicates, self.empty, self.first_empty = 0, 0, ""

    def add(self, where: str, record: Any, parse: Callable[[Any], Example | Prompt]) -> None:
        try:
            if isinstance(record, Malformed):
                raise RecordError(record)
            item = parse(record)
        except EmptyAnswer:
            self.empty += 1
            self.first_empty = self.first_empty or where
            return
        except RecordError as err:
            if not self.skip_bad:
                hint = "" if self.skip_bad is None else " (or set data.on_error: skip)"
                raise DistillError(f"{where}: {err}{hint}") from None
            self.bad += 1
            self.first_bad = self.first_bad or f"{where}: {err}"
            return
        if item.id in self.first:
            if isinstance(record, dict) and record.get("id") is not None:
                raise DistillError(f"{where}: duplicate id {item.id!r} (first at {self.first[item.id]})")
            self.duplicates += 1  # the same content again: it would only weigh twice
            return
        self.first[item.id] = where
        self.items.append(item)

    def finish(self, noun: str) -> list:
        if self.empty:
            log.warning("%s: skipped %d record(s) with %s (first at %s)",
                        self.path, self.empty, self.empty_reason, self.first_empty)
        if self.bad:
            log.warning("%s: skipped %d malformed record(s) (first: %s)", self.path, self.bad, self.first_bad)
        if self.duplicates:
            log.warning("%s: skipped %d exact duplicate record(s)", self.path, self.duplicates)
        if not self.items:
            more = f" ({self.empty} with {self.empty_reason})" if self.empty else ""
            raise DistillError(f"{self.path}: no {noun}{more}")
        return self.items


def read_examples(path: str | Path) -> list[Example]:
    """Training examples from .jsonl/.json (layout detected per record) or .txt (paragraphs; lines if no blank line)."""
    path = Path(path)
    check_suffix(path)
    collector = _Collector(path)
    if path.suffix.lower() == ".txt":
        for where, block in text_blocks(path, read_text(path)):
            collector.add(where, {"text": block}, example_from_record)
    else:
        for where, record in json_records(path):
            collector.add(where, record, example_from_record)
    return collector.finish("examples")


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """Preference pairs from .jsonl/.json (layouts: distill.data.layouts.PAIR_LAYOUTS); a bad record is file:line."""
    return _read_json_records(Path(path), pair_from_record, "preference pairs")


def read_labelled(path: str | Path) -> list[LabelledExample]:
    """KTO examples (a prompt, one answer, a boolean label) from .jsonl/.json (distill.data.layouts.LABELLED_LAYOUTS);
    a bad record is file:line."""
    return _read_json_records(Path(path), labelled_from_record, "labelled examples")


def _read_json_records(path: Path, parse: Callable, what: str) -> list:
    """Every record of a .jsonl/.json file parsed by `parse`, collected (duplicates counted, errors file:line)."""
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise DistillError(f"{path}: unsupported file type {path.suffix!r} for {what} (expected .jsonl or .json)")
    collector = _Collector(path)
    for where, record in json_records(path):
        collector.add(where, record, parse)
    return collector.finish(what)


def read_prompts(
    path: str | Path, *, fields: dict[str, str] | None = None, on_error: str = "stop",
    split: str = "train", config: str | None = None,
) -> list[Prompt]:
    """Prompts from .jsonl/.json/.csv/.parquet (answers become references), .txt (one prompt per line) or hf://.

    `fields` maps our keys (prompt, instruction, input, messages, reference, tags, id, system) to the file's;
    on_error="skip" skips malformed records with one counted warning instead of stopping at the first.
    An hf://OWNER/NAME source is a Hugging Face Hub dataset: its `split` (and `config`) rows are the records.
    """
    hub = isinstance(path, str) and path.startswith(HUB_DATASET)
    source: Any = path if hub else Path(path)
    collector = _Collector(source, skip_bad=on_error == "skip")
    parse = (lambda record: prompt_from_record(map_fields(record, fields))) if fields else prompt_from_record
    records = hub_records(source, split, config) if hub else prompt_records(source)
    for where, record in records:
        collector.add(where, record, parse)
    return collector.finish("prompts")


def load_teacher_data(path: str | Path, ids: list[str] | None = None) -> list[Example]:
    """Examples from teacher answers: a generate-stage directory of shards, or one JSONL file (e.g. filtered).

    `ids` picks the records a recipe asks for (the directory may also hold answers of other teachers or
    settings); failed requests are left out; empty answers are skipped with a warning.
    """
    path = Path(path)
    collector = _Collector(path, empty_reason="an empty teacher response")
    if path.is_dir():
        if not shard_paths(path):
            raise DistillError(f"{path}: no teacher data shards; run `distill generate` first")
        latest = latest_records(path)
        chosen = list(latest.values()) if ids is None else [latest[i] for i in ids if i in latest]
        missing = 0 if ids is None else len(ids) - sum(r.get("status", "ok") == "ok" for r in chosen)
        if missing:
            log.warning("%s: %d of %d planned teacher answers are missing or failed; re-run `distill generate` "
                        "to retry them", path, missing, len(ids))
        records = ((f"{path}/{r['id']}", r) for r in chosen)
    else:
        records = jsonl_records(path, read_text(path))
    for where, record in records:
        if isinstance(record, dict) and record.get("status", "ok") != "ok":
            continue
        collector.add(where, _training_view(record), example_from_record)
    return collector.finish("examples")


def _training_view(record: Any) -> Any:
    """A teacher record as a training example: its conversation and its prompt's tags, under its own content
    address."""
    if isinstance(record, dict) and "messages" in record and "id" in record:
        return {"id": record["id"], "messages": record["messages"], "tags": record.get("tags", [])}
    return record


# ---------------------------------------------------------------- split


def _unit_hash(seed: int, id_: str) -> float:
    """A uniform number in [0, 1) from (seed, id): an example's side of the split never depends on the others."""
    digest = hashlib.sha256(f"{seed}:{id_}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_train_eval(
    examples: list[Example], eval_fraction: float, seed: int, max_eval: int
) -> tuple[list[Example], list[Example]]:
    """Deterministic split by hashing ids: adding examples never moves an existing training example to eval.

    Eval holds the examples whose hash falls below eval_fraction, capped at max_eval (lowest hashes kept), at
    least one when eval_fraction > 0, and never all of them (training keeps at least one example).
    """
    if eval_fraction <= 0 or len(examples) < 2:
        return list(examples), []
    score = {e.id: _unit_hash(seed, e.id) for e in examples}
    ranked = sorted(examples, key=lambda e: (score[e.id], e.id))
    wanted = sum(1 for s in score.values() if s < eval_fraction)
    count = min(max(wanted, 1), max_eval, len(examples) - 1)
    eval_ids = {e.id for e in ranked[:count]}
    return [e for e in examples if e.id not in eval_ids], [e for e in examples if e.id in eval_ids]
