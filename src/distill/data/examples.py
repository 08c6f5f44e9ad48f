"""Reading training examples and prompts (JSONL, JSON, TXT; several record layouts) and the train/eval split."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from distill.errors import DistillError

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
Records = Iterator[tuple[str, Any]]  # (where: "file:line", parsed record)

EXAMPLE_LAYOUTS = (
    "prompt/response (or completion/output/answer)",
    "instruction/input/output (Alpaca)",
    "messages [{role, content}]",
    "conversations [{from, value}] (ShareGPT)",
    "text",
)
PROMPT_LAYOUTS = (
    "prompt (or question)", "instruction/input (Alpaca)", "messages [{role, content}]", "conversations [{from, value}]"
)
HUB_DATASET = "hf://"  # a prompts source on the Hugging Face Hub, not a file
PROMPT_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".parquet")
ANSWER_KEYS = ("response", "completion", "output", "answer")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One training example: a conversation (`messages`) or plain text (`text`)."""

    id: str
    messages: Messages | None = None
    text: str | None = None


@dataclass
class Prompt:
    """A conversation for the teacher to answer; `messages` ends with a user turn."""

    id: str
    messages: Messages
    tags: list[str] = field(default_factory=list)  # route to a teacher, group in reports
    reference: str | None = None  # a known answer (GSM8K's `#### N`, Alpaca's output): verification, eval

    @property
    def user_text(self) -> str:
        """The final user message (what the prompt asks)."""
        return self.messages[-1]["content"]


class Malformed(str):
    """A line that is not JSON at all: an error, or one counted skip with on_error="skip"."""


class RecordError(Exception):
    """What is wrong with one record; the reader adds file:line."""


class EmptyAnswer(RecordError):
    """A record whose answer is empty: skipped with a counted warning (real datasets and teachers produce them)."""


# ---------------------------------------------------------------- reading files


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DistillError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DistillError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _json_array_records(path: Path, text: str) -> Records:
    """Records of a JSON array, each named by the line it starts on (and its index, for one-line files)."""
    decoder = json.JSONDecoder()
    pos = _skip_space(text, text.index("[") + 1)
    line, counted, index = 1, 0, 0
    while pos < len(text) and text[pos] != "]":
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DistillError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        line += text.count("\n", counted, pos)
        counted, index = pos, index + 1
        yield f"{path}:{line} (record {index})", value
        pos = _skip_space(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_space(text, pos + 1)
        elif pos >= len(text) or text[pos] != "]":
            raise DistillError(f"{path}:{_line_of(text, pos)}: not valid JSON (expected ',' or ']' between records)")
    if pos >= len(text):
        raise DistillError(f"{path}:{_line_of(text, pos)}: not valid JSON (the list is not closed with ']')")


def _jsonl_records(path: Path, text: str) -> Records:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            record = Malformed(f"not valid JSON ({err.msg} at column {err.colno})")
        yield f"{path}:{number}", record


def _json_records(path: Path) -> Records:
    """Records of a .json/.jsonl file: a JSON array of objects, or one object per line (either extension)."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        return _json_array_records(path, text)
    return _jsonl_records(path, text)


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in (".jsonl", ".json", ".txt"):
        raise DistillError(f"{path}: unsupported file type {path.suffix!r} (expected .jsonl, .json or .txt)")


def _text_blocks(path: Path, text: str) -> Iterator[tuple[str, str]]:
    """(where, paragraph) of a text file: blank-line separated paragraphs, or lines if it has no blank line."""
    lines = text.splitlines()
    filled = [i for i, line in enumerate(lines) if line.strip()]
    if filled and all(line.strip() for line in lines[filled[0]:filled[-1] + 1]):
        yield from ((f"{path}:{i + 1}", lines[i].strip()) for i in filled)
        return
    start = None
    for i, line in enumerate(lines + [""]):
        if line.strip() and start is None:
            start = i
        elif not line.strip() and start is not None:
            yield f"{path}:{start + 1}", "\n".join(lines[start:i]).strip()  # inner indentation kept
            start = None


# ---------------------------------------------------------------- record layouts


def _content_id(value: Any) -> str:
    """A short, stable hash of a record's content (its id when the record has none)."""
    blob = json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:12]


def _string(record: dict, key: str) -> str:
    value = record.get(key)
    if value is None:
        raise RecordError(f"missing {key!r}")
    if not isinstance(value, str):
        raise RecordError(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _nonempty(record: dict, key: str) -> str:
    value = _string(record, key)
    if not value.strip():
        raise RecordError(f"empty {key!r}")
    return value


def _content_text(content: Any, where: str) -> str:
    """Message content as text: a string, or a list of text parts ({"type": "text", "text"|"value": ...})."""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type", "text") != "text":
                raise RecordError(f"{where}: only text content is supported")
            parts.append(part.get("text", part.get("value")))
        if not all(isinstance(p, str) for p in parts):
            raise RecordError(f"{where}: a text part has no 'text' string")
        content = "".join(parts)
    if content is None:
        return ""
    if not isinstance(content, str):
        raise RecordError(f"{where}: content must be text, got {type(content).__name__}")
    return content


def _turns(record: dict, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> tuple[Messages, list[str]]:
    """Messages of a 'messages' or 'conversations' list, and where each one is (for error messages)."""
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"{key!r} must be a non-empty list of {{{role_key}, {text_key}}}")
    messages, names = [], []
    for i, turn in enumerate(turns):
        name = f"{key}[{i}]"
        if not isinstance(turn, dict) or role_key not in turn:
            raise RecordError(f"{name}: expected an object with {role_key!r} and {text_key!r}")
        role = roles.get(turn[role_key])
        if role is None:
            raise RecordError(f"{name}: unknown {role_key} {turn[role_key]!r} (expected {', '.join(roles)})")
        messages.append({"role": role, "content": _content_text(turn.get(text_key), name)})
        names.append(name)
    return messages, names


def _conversation(record: dict) -> tuple[Messages, list[str]] | None:
    """The turns of a messages/conversations record (None for the other layouts); contents may still be empty."""
    if "messages" in record:
        return _turns(record, "messages", "role", "content", {r: r for r in ROLES})
    if "conversations" in record:
        return _turns(record, "conversations", "from", "value", SHAREGPT_ROLES)
    return None


def _check_contents(messages: Messages, names: list[str]) -> None:
    """Every turn needs text; an empty assistant turn marks the whole record as an unanswered one."""
    for message, name in zip(messages, names):
        if not message["content"].strip():
            raise (EmptyAnswer if message["role"] == "assistant" else RecordError)(f"{name}: empty content")


def _with_system(record: dict, messages: Messages) -> Messages:
    """Prepend an optional top-level 'system' string (LLaMA-Factory style records carry one)."""
    system = record.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}] + messages
    return messages


def _question(record: dict) -> str | None:
    """The user text of an instruction or prompt record; None for the other layouts."""
    if "instruction" in record:
        instruction, extra = _nonempty(record, "instruction"), record.get("input") or ""
        if not isinstance(extra, str):
            raise RecordError(f"'input' must be a string, got {type(extra).__name__}")
        return f"{instruction}\n\n{extra}" if extra.strip() else instruction
    for key in ("prompt", "question"):
        if key in record:
            return _nonempty(record, key)
    return None


def _answer(record: dict) -> str:
    for key in ANSWER_KEYS:
        if key in record:
            answer = _string(record, key)
            if not answer.strip():
                raise EmptyAnswer(f"empty {key!r}")
            return answer
    raise RecordError(f"no answer: expected one of {', '.join(ANSWER_KEYS)}")


def _as_dict(record: Any) -> dict:
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    return record


def _unknown_layout(record: dict, accepted: tuple[str, ...]) -> RecordError:
    keys = ", ".join(sorted(record)) or "none"
    return RecordError(f"unknown record layout (keys: {keys}); expected one of: {'; '.join(accepted)}")


def example_from_record(record: Any) -> Example:
    """One example from a parsed record of any supported layout; raises RecordError (or EmptyAnswer)."""
    record = _as_dict(record)
    conversation = _conversation(record)
    if conversation is not None:
        messages, names = conversation
        if not any(m["role"] == "assistant" for m in messages):
            raise RecordError("conversation has no assistant turn to learn from")
        _check_contents(messages, names)
    elif (question := _question(record)) is not None:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": _answer(record)}]
    elif "text" in record:
        text = _nonempty(record, "text")
        return Example(id=_record_id(record, text), text=text)
    else:
        raise _unknown_layout(record, EXAMPLE_LAYOUTS)
    messages = _with_system(record, messages)
    return Example(id=_record_id(record, messages), messages=messages)


def prompt_from_record(record: Any) -> Prompt:
    """One prompt from a parsed record; any answer already there (trailing assistant turns) is ignored."""
    record = _as_dict(record)
    conversation = _conversation(record)
    if conversation is not None:
        messages, names = conversation
        while messages and messages[-1]["role"] == "assistant":
            messages, names = messages[:-1], names[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise RecordError("conversation does not end with a user turn to answer")
        _check_contents(messages, names)
    elif (question := _question(record)) is not None:
        messages = [{"role": "user", "content": question}]
    else:
        raise _unknown_layout(record, PROMPT_LAYOUTS)
    messages = _with_system(record, messages)
    return Prompt(id=_record_id(record, messages), messages=messages, tags=_tags(record), reference=_reference(record))


def _tags(record: dict) -> list[str]:
    tags = record.get("tags", record.get("tag", []))
    tags = [tags] if isinstance(tags, str) else tags
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise RecordError("'tags' must be a string or a list of strings")
    return tags


def _reference(record: dict) -> str | None:
    """A known answer carried by a prompt record (its `reference`, or its answer field)."""
    for key in ("reference",) + ANSWER_KEYS:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def map_fields(record: Any, fields: dict[str, str]) -> Any:
    """Rename a record's own keys to ours (`fields`: ours -> theirs), e.g. {"prompt": "question"}."""
    if not fields or not isinstance(record, dict):
        return record
    mapped = dict(record)
    for ours, theirs in fields.items():
        if theirs not in record:
            raise RecordError(f"missing {theirs!r} (data.fields.{ours})")
        mapped[ours] = record[theirs]
    return mapped


def _record_id(record: dict, content: Any) -> str:
    return str(record["id"]) if record.get("id") is not None else _content_id(content)


# ---------------------------------------------------------------- public readers


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
    _check_suffix(path)
    collector = _Collector(path)
    if path.suffix.lower() == ".txt":
        for where, block in _text_blocks(path, _read_text(path)):
            collector.add(where, {"text": block}, example_from_record)
    else:
        for where, record in _json_records(path):
            collector.add(where, record, example_from_record)
    return collector.finish("examples")


def _csv_records(path: Path) -> Records:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}


def _parquet_records(path: Path) -> Records:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DistillError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    for index, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"{path}: row {index}", row


def _prompt_records(path: Path) -> Records:
    suffix = path.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        raise DistillError(f"{path}: unsupported file type {path.suffix!r} (expected {', '.join(PROMPT_SUFFIXES)})")
    if suffix == ".txt":
        lines = enumerate(_read_text(path).splitlines(), start=1)
        return ((f"{path}:{n}", {"prompt": line.strip()}) for n, line in lines if line.strip())
    if suffix == ".csv":
        return _csv_records(_existing(path))
    if suffix == ".parquet":
        return _parquet_records(_existing(path))
    return _json_records(path)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise DistillError(f"{path}: file not found")
    return path


def _hub_records(source: str, split: str, config: str | None) -> Records:
    """Rows of a Hugging Face Hub dataset named hf://OWNER/NAME (needs the datasets package and the network)."""
    try:
        import datasets
    except ImportError:
        raise DistillError("data.prompts: hf:// prompts need the datasets package (pip install datasets)") from None
    name = source[len(HUB_DATASET):]
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, no such dataset, config or split: one line, not the hub's traceback
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        shown = f"{source} (config {config!r}, split {split!r})" if config else f"{source} (split {split!r})"
        raise DistillError(f"data.prompts: could not load {shown}: {reason}") from None
    # Arrow gives every row every column: a column another layout uses is None here, not absent.
    return ((f"{source}[{split}]:row {index}", {k: v for k, v in row.items() if v is not None})
            for index, row in enumerate(rows, start=1))


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
    records = _hub_records(source, split, config) if hub else _prompt_records(source)
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
        from distill.teachers.generate import latest_records, shard_paths

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
        records = _jsonl_records(path, _read_text(path))
    for where, record in records:
        if isinstance(record, dict) and record.get("status", "ok") != "ok":
            continue
        collector.add(where, _training_view(record), example_from_record)
    return collector.finish("examples")


def _training_view(record: Any) -> Any:
    """A teacher record as a training example: its conversation, under its own content address."""
    if isinstance(record, dict) and "messages" in record and "id" in record:
        return {"id": record["id"], "messages": record["messages"]}
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
