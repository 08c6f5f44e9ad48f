"""Record layouts: prompt/response, Alpaca instruction/input/output, messages, ShareGPT conversations and text,
turned into our training examples and prompts (one parsed record at a time; reading files is distill.data.readers')."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

Messages = list[dict[str, str]]

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
ANSWER_KEYS = ("response", "completion", "output", "answer")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One training example: a conversation (`messages`) or plain text (`text`)."""

    id: str
    messages: Messages | None = None
    text: str | None = None
    tags: list[str] = field(default_factory=list)  # the prompt's tags (route to a scoring teacher: method.teachers)


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


class RecordError(Exception):
    """What is wrong with one record; the reader adds file:line."""


class EmptyAnswer(RecordError):
    """A record whose answer is empty: skipped with a counted warning (real datasets and teachers produce them)."""


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
        return Example(id=_record_id(record, text), text=text, tags=_tags(record))
    else:
        raise _unknown_layout(record, EXAMPLE_LAYOUTS)
    messages = _with_system(record, messages)
    return Example(id=_record_id(record, messages), messages=messages, tags=_tags(record))


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


# ---------------------------------------------------------------- preference pairs

PAIR_LAYOUTS = (
    "prompt/chosen/rejected (strings, or message lists)",
    "instruction/input/chosen/rejected (Alpaca)",
    "messages or conversations (ShareGPT) + chosen + rejected",
    "chosen/rejected as whole conversations sharing their prompt",
)


@dataclass
class PreferencePair:
    """A prompt (`messages`, ending with a user turn) and two answers to it, the preferred one first."""

    id: str
    messages: Messages
    chosen: str
    rejected: str


def _side_turns(value: Any, key: str) -> Messages:
    """A chosen/rejected value as turns: a string is one assistant turn; a dict one turn; a list several."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    turns = [value] if isinstance(value, dict) else value
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        raise RecordError(f"{key!r} must be a string, a message or a list of messages")
    sharegpt = all("from" in t for t in turns)
    messages, _ = _turns({key: turns}, key, *(("from", "value", SHAREGPT_ROLES) if sharegpt
                                               else ("role", "content", {r: r for r in ROLES})))
    return messages


def _pair_prompt(record: dict) -> Messages | None:
    """The prompt of a pair record given apart from its answers (None when the answers carry it)."""
    conversation = _conversation(record)
    if conversation is None and isinstance(record.get("prompt"), list):
        conversation = _turns(record, "prompt", "role", "content", {r: r for r in ROLES})
    if conversation is not None:
        messages, names = conversation
        _check_contents(messages, names)
        return messages
    question = _question(record)
    return None if question is None else [{"role": "user", "content": question}]


def _answer_of(turns: Messages, key: str) -> str:
    if turns[-1]["role"] != "assistant":
        raise RecordError(f"{key!r} does not end with an assistant answer")
    answer = turns[-1]["content"]
    if not answer.strip():
        raise RecordError(f"empty {key!r}")
    return answer


def pair_from_record(record: Any) -> PreferencePair:
    """One preference pair from a parsed record of any PAIR_LAYOUTS; raises RecordError naming what is wrong."""
    record = _as_dict(record)
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise RecordError(f"missing {key!r} (a preference pair needs chosen and rejected)")
    chosen, rejected = _side_turns(record["chosen"], "chosen"), _side_turns(record["rejected"], "rejected")
    prompt = _pair_prompt(record)
    if prompt is None:  # implicit prompt: both answers are whole conversations that share it
        prompt, rest = chosen[:-1], rejected[:-1]
        if not prompt or prompt != rest:
            raise _unknown_layout(record, PAIR_LAYOUTS) if not prompt else \
                RecordError("chosen and rejected conversations do not share their prompt")
    while prompt and prompt[-1]["role"] == "assistant":
        prompt = prompt[:-1]  # an answer left in the prompt is not part of the question
    if not prompt or prompt[-1]["role"] != "user":
        raise RecordError("the prompt does not end with a user turn")
    better, worse = _answer_of(chosen, "chosen"), _answer_of(rejected, "rejected")
    if better.strip() == worse.strip():
        raise RecordError("chosen equals rejected (a pair needs two different answers)")
    messages = _with_system(record, prompt)
    return PreferencePair(id=_record_id(record, [messages, better, worse]), messages=messages, chosen=better,
                          rejected=worse)


# ---------------------------------------------------------------- labelled single answers (KTO)

LABELLED_LAYOUTS = (
    "prompt/completion/label (TRL's unpaired format; prompt a string or messages, completion a string or message)",
    "instruction/input/output + label (Alpaca)",
    "messages or conversations (ShareGPT) ending with the answer + label or kto_tag (LLaMA-Factory)",
)
LABEL_KEYS = ("label", "kto_tag")  # TRL's and LLaMA-Factory's names of the desirable flag


@dataclass
class LabelledExample:
    """A prompt (`messages`, ending with a user turn), one answer to it, and whether the answer is desirable."""

    id: str
    messages: Messages
    answer: str
    desirable: bool


def _label(record: dict) -> bool:
    for key in LABEL_KEYS:
        if key in record:
            value = record[key]
            if not isinstance(value, bool):
                raise RecordError(f"{key!r} must be true or false, got {json.dumps(value)}")
            return value
    raise RecordError("missing 'label' (a KTO example needs a boolean label or kto_tag: true = desirable)")


def labelled_from_record(record: Any) -> LabelledExample:
    """One KTO example from a parsed record of any LABELLED_LAYOUTS; raises RecordError naming what is wrong
    (an empty answer is an error here, not a skipped record: its label would say nothing)."""
    record = _as_dict(record)
    desirable = _label(record)
    if "completion" in record:
        prompt = _pair_prompt(record)
        if prompt is None:
            raise _unknown_layout(record, LABELLED_LAYOUTS)
        turns = _side_turns(record["completion"], "completion")
        answer = _answer_of(turns, "completion")
    else:
        conversation = _conversation(record)
        if conversation is not None:
            messages, names = conversation
            if messages[-1]["role"] != "assistant":
                raise RecordError("the conversation does not end with the assistant answer the label is about")
            if not messages[-1]["content"].strip():
                raise RecordError(f"{names[-1]}: empty answer")
            _check_contents(messages[:-1], names[:-1])
            prompt, answer = messages[:-1], messages[-1]["content"]
        elif (question := _question(record)) is not None:
            try:
                answer = _answer(record)
            except EmptyAnswer as err:
                raise RecordError(f"{err} (an empty answer)") from None
            prompt = [{"role": "user", "content": question}]
        else:
            raise _unknown_layout(record, LABELLED_LAYOUTS)
    if not prompt or prompt[-1]["role"] != "user":
        raise RecordError("the prompt does not end with a user turn")
    messages = _with_system(record, prompt)
    return LabelledExample(id=_record_id(record, [messages, answer, desirable]), messages=messages, answer=answer,
                           desirable=desirable)
