"""Reading records from files: JSONL, JSON arrays, CSV, Parquet, text paragraphs, and Hugging Face Hub datasets.

Every record comes with where it is ("file:line") for error messages; what a record means is distill.data.layouts'.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from distill.errors import DistillError

Records = Iterator[tuple[str, Any]]  # (where: "file:line", parsed record)

HUB_DATASET = "hf://"  # a prompts source on the Hugging Face Hub, not a file
PROMPT_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".parquet")


class Malformed(str):
    """A line that is not JSON at all: an error, or one counted skip with on_error="skip"."""


def read_text(path: Path) -> str:
    """A UTF-8 text file's contents; a one-line error if it is missing or not UTF-8."""
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


def jsonl_records(path: Path, text: str) -> Records:
    """Records of JSON Lines text; a line that is not JSON comes back as a Malformed record."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            record = Malformed(f"not valid JSON ({err.msg} at column {err.colno})")
        yield f"{path}:{number}", record


def json_records(path: Path) -> Records:
    """Records of a .json/.jsonl file: a JSON array of objects, or one object per line (either extension)."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        return _json_array_records(path, text)
    return jsonl_records(path, text)


def check_suffix(path: Path) -> None:
    """Refuse a file that is not .jsonl, .json or .txt (the types examples and eval texts are read from)."""
    if path.suffix.lower() not in (".jsonl", ".json", ".txt"):
        raise DistillError(f"{path}: unsupported file type {path.suffix!r} (expected .jsonl, .json or .txt)")


def text_blocks(path: Path, text: str) -> Iterator[tuple[str, str]]:
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


def _csv_records(path: Path) -> Records:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}


def _parquet_records(path: Path) -> Records:
    try:
        import pyarrow.parquet as pq  # optional: only Parquet prompt files need it
    except ImportError:
        raise DistillError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    for index, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"{path}: row {index}", row


def prompt_records(path: Path) -> Records:
    """Records of a prompts file: .jsonl/.json, .csv, .parquet, or .txt (one prompt per line)."""
    suffix = path.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        raise DistillError(f"{path}: unsupported file type {path.suffix!r} (expected {', '.join(PROMPT_SUFFIXES)})")
    if suffix == ".txt":
        lines = enumerate(read_text(path).splitlines(), start=1)
        return ((f"{path}:{n}", {"prompt": line.strip()}) for n, line in lines if line.strip())
    if suffix == ".csv":
        return _csv_records(_existing(path))
    if suffix == ".parquet":
        return _parquet_records(_existing(path))
    return json_records(path)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise DistillError(f"{path}: file not found")
    return path


def hub_records(source: str, split: str, config: str | None) -> Records:
    """Rows of a Hugging Face Hub dataset named hf://OWNER/NAME (needs the datasets package and the network)."""
    try:
        import datasets  # optional (the hub extra), and slow to import
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
