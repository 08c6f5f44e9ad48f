"""Reading training examples and prompts (JSONL, JSON, TXT; several record layouts) and the train/eval split."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from distill.errors import DistillError

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]

EXAMPLE_LAYOUTS = (
    "prompt/response (or completion/output)",
    "instruction/input/output (Alpaca)",
    "messages [{role, content}]",
    "conversations [{from, value}] (ShareGPT)",
    "text",
)
PROMPT_LAYOUTS = ("prompt", "instruction/input (Alpaca)", "messages [{role, content}]", "conversations [{from, value}]")
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

    @property
    def user_text(self) -> str:
        """The final user message (what the prompt asks)."""
        return self.messages[-1]["content"]


class RecordError(Exception):
    """What is wrong with one record; the reader adds file:line."""


# ---------------------------------------------------------------- reading files


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DistillError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DistillError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _line_at(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _json_array_records(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Yield (line, element) for a JSON array, so errors can name the line each record starts on."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1, 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos < len(text) and text[pos] == "]":
            return
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DistillError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        line += text.count("\n", counted, pos)
        counted = pos
        yield line, value
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            raise DistillError(f"{path}:{_line_at(text, pos)}: not valid JSON (expected ',' or ']')")


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise DistillError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None


def _json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Records of a .json/.jsonl file: a JSON array of objects, or one object per line (either extension)."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        return _json_array_records(path, text)
    return _jsonl_records(path, text)


def _check_suffix(path: Path, allowed: tuple[str, ...]) -> None:
    if path.suffix.lower() not in allowed:
        raise DistillError(f"{path}: unsupported file type {path.suffix!r} (expected {', '.join(allowed)})")


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, stripped, empty ones dropped."""
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current).strip())
            current = []
    if current:
        blocks.append("\n".join(current).strip())
    return blocks


# ---------------------------------------------------------------- record layouts


def _content_id(value: Any) -> str:
    """A short, stable hash of a record's content (its id when the record has none)."""
    blob = json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:12]


def _text_field(record: dict, key: str) -> str:
    value = record.get(key)
    if value is None:
        raise RecordError(f"missing {key!r}")
    if not isinstance(value, str):
        raise RecordError(f"{key!r} must be a string, got {type(value).__name__}")
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
    if not isinstance(content, str):
        raise RecordError(f"{where}: content must be text, got {type(content).__name__}")
    if not content.strip():
        raise RecordError(f"{where}: empty content")
    return content


def _messages_field(record: dict) -> Messages:
    turns = record["messages"]
    if not isinstance(turns, list) or not turns:
        raise RecordError("'messages' must be a non-empty list of {role, content}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn:
            raise RecordError(f"messages[{i}]: expected an object with 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise RecordError(f"messages[{i}]: unknown role {turn['role']!r} (expected {', '.join(ROLES)})")
        messages.append({"role": turn["role"], "content": _content_text(turn.get("content"), f"messages[{i}]")})
    return messages


def _conversations_field(record: dict) -> Messages:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise RecordError("'conversations' must be a non-empty list of {from, value}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn:
            raise RecordError(f"conversations[{i}]: expected an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise RecordError(f"conversations[{i}]: unknown 'from' {turn['from']!r} (expected human, gpt or system)")
        messages.append({"role": role, "content": _content_text(turn.get("value"), f"conversations[{i}]")})
    return messages


def _with_system(record: dict, messages: Messages) -> Messages:
    """Prepend an optional top-level 'system' string (LLaMA-Factory style records carry one)."""
    system = record.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}] + messages
    return messages


def _instruction_text(record: dict) -> str:
    instruction = _text_field(record, "instruction")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise RecordError(f"'input' must be a string, got {type(extra).__name__}")
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _answer(record: dict) -> str:
    for key in ANSWER_KEYS:
        if key in record:
            return _text_field(record, key)
    raise RecordError(f"no answer: expected one of {', '.join(ANSWER_KEYS)}")


def _record_dict(record: Any) -> dict:
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    return record


def _unknown_layout(record: dict, accepted: tuple[str, ...]) -> RecordError:
    keys = ", ".join(sorted(record)) or "none"
    return RecordError(f"unknown record layout (keys: {keys}); expected one of: {'; '.join(accepted)}")


def _example_content(record: dict) -> tuple[Messages | None, str | None]:
    """(messages, text) of one example record, whichever layout it uses."""
    if "messages" in record:
        messages = _messages_field(record)
    elif "conversations" in record:
        messages = _conversations_field(record)
    elif "instruction" in record:
        messages = [{"role": "user", "content": _instruction_text(record)}, {"role": "assistant", "content": _answer(record)}]
    elif "prompt" in record or "question" in record:
        key = "prompt" if "prompt" in record else "question"
        messages = [{"role": "user", "content": _text_field(record, key)}, {"role": "assistant", "content": _answer(record)}]
    elif "text" in record:
        return None, _text_field(record, "text")
    else:
        raise _unknown_layout(record, EXAMPLE_LAYOUTS)
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("conversation has no assistant turn to learn from")
    return _with_system(record, messages), None


def _prompt_messages(record: dict) -> Messages:
    """The conversation of one prompt record; trailing assistant turns (an answer already there) are dropped."""
    if "messages" in record:
        messages = _messages_field(record)
    elif "conversations" in record:
        messages = _conversations_field(record)
    elif "instruction" in record:
        messages = [{"role": "user", "content": _instruction_text(record)}]
    elif "prompt" in record or "question" in record:
        messages = [{"role": "user", "content": _text_field(record, "prompt" if "prompt" in record else "question")}]
    else:
        raise _unknown_layout(record, PROMPT_LAYOUTS)
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise RecordError("conversation does not end with a user turn to answer")
    return _with_system(record, messages)


def _record_id(record: dict, content: Any) -> tuple[str, bool]:
    """(id, explicit): the record's own 'id' or a hash of its content."""
    if record.get("id") is not None:
        return str(record["id"]), True
    return _content_id(content), False


class _IdRegistry:
    """Rejects repeated explicit ids; drops exact duplicates of content (counted, warned once)."""

    def __init__(self, path: Path):
        self.path, self.first_line, self.duplicates = path, {}, 0

    def admit(self, id_: str, explicit: bool, line: int) -> bool:
        if id_ not in self.first_line:
            self.first_line[id_] = line
            return True
        if explicit:
            raise DistillError(f"{self.path}:{line}: duplicate id {id_!r} (first at line {self.first_line[id_]})")
        self.duplicates += 1
        return False

    def report(self) -> None:
        if self.duplicates:
            log.warning("%s: skipped %d exact duplicate record(s)", self.path, self.duplicates)


# ---------------------------------------------------------------- public readers


def example_from_record(record: Any) -> Example:
    """One example from a parsed record of any supported layout; raises RecordError when it is unusable."""
    record = _record_dict(record)
    messages, text = _example_content(record)
    id_, _ = _record_id(record, messages if messages is not None else text)
    return Example(id=id_, messages=messages, text=text)


def read_examples(path: str | Path) -> list[Example]:
    """Training examples from a .jsonl/.json file (layouts auto-detected per record) or a .txt file (paragraphs)."""
    path = Path(path)
    _check_suffix(path, (".jsonl", ".json", ".txt"))
    if path.suffix.lower() == ".txt":
        examples = _text_examples(path)
    else:
        examples = _examples_from_records(path, _json_records(path))
    if not examples:
        raise DistillError(f"{path}: no examples")
    return examples


def _text_examples(path: Path) -> list[Example]:
    registry, examples = _IdRegistry(path), []
    for number, block in enumerate(_paragraphs(_read_text(path)), start=1):
        id_ = _content_id(block)
        if registry.admit(id_, False, number):
            examples.append(Example(id=id_, text=block))
    registry.report()
    return examples


def _examples_from_records(path: Path, records: Iterator[tuple[int, Any]]) -> list[Example]:
    registry, examples = _IdRegistry(path), []
    for line, record in records:
        try:
            example = example_from_record(record)
        except RecordError as err:
            raise DistillError(f"{path}:{line}: {err}") from None
        if registry.admit(example.id, isinstance(record, dict) and record.get("id") is not None, line):
            examples.append(example)
    registry.report()
    return examples


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a .jsonl/.json file (answers, if present, are ignored) or a .txt file (one prompt per line)."""
    path = Path(path)
    _check_suffix(path, (".jsonl", ".json", ".txt"))
    if path.suffix.lower() == ".txt":
        lines = enumerate(_read_text(path).splitlines(), start=1)
        records: Iterator[tuple[int, Any]] = ((n, {"prompt": s.strip()}) for n, s in lines if s.strip())
    else:
        records = _json_records(path)
    registry, prompts = _IdRegistry(path), []
    for line, record in records:
        try:
            record = _record_dict(record)
            messages = _prompt_messages(record)
        except RecordError as err:
            raise DistillError(f"{path}:{line}: {err}") from None
        id_, explicit = _record_id(record, messages)
        if registry.admit(id_, explicit, line):
            prompts.append(Prompt(id=id_, messages=messages))
    registry.report()
    if not prompts:
        raise DistillError(f"{path}: no prompts")
    return prompts


def load_teacher_data(path: str | Path) -> list[Example]:
    """Examples from a teacher_data.jsonl written by generate_responses; empty answers are skipped with a warning."""
    path = Path(path)
    empty = 0

    def answered() -> Iterator[tuple[int, Any]]:
        nonlocal empty
        for line, record in _jsonl_records(path, _read_text(path)):
            if isinstance(record, dict) and not str(record.get("response") or "").strip():
                empty += 1
                continue
            yield line, record

    kept = _examples_from_records(path, answered())
    if empty:
        log.warning("%s: skipped %d record(s) with an empty teacher response", path, empty)
    if not kept:
        raise DistillError(f"{path}: no examples" + (f" ({empty} empty teacher responses)" if empty else ""))
    return kept


# ---------------------------------------------------------------- split


def _unit_hash(seed: int, id_: str) -> float:
    """A uniform number in [0, 1) from (seed, id): an example's side of the split never depends on the others."""
    digest = hashlib.sha256(f"{seed}:{id_}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_train_eval(
    examples: list[Example], eval_fraction: float, seed: int, max_eval: int
) -> tuple[list[Example], list[Example]]:
    """Deterministic split by hashing ids: adding examples never moves an existing training example to eval."""
    if not examples:
        return [], []
    if eval_fraction <= 0 or len(examples) < 2:
        return list(examples), []
    ranked = sorted(examples, key=lambda e: (_unit_hash(seed, e.id), e.id))
    wanted = sum(1 for e in ranked if _unit_hash(seed, e.id) < eval_fraction)
    # At least one eval example when asked for any; at least one training example; the cap keeps the lowest hashes.
    count = min(max(wanted, 1), max_eval, len(examples) - 1)
    eval_ids = {e.id for e in ranked[:count]}
    train = [e for e in examples if e.id not in eval_ids]
    evals = [e for e in examples if e.id in eval_ids]
    return train, evals
