"""The teacher-records format: append-only JSONL shards of answers and the top-k log-probs kept beside them.

The generate stage writes it (teachers.generate); training data loading, filtering and the teacher cache read it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from distill.errors import DistillError
from distill.runtime import atomic_file

SHARD_GLOB = "shard-*.jsonl"
TOPK_DIR = "topk"  # <data_dir>/topk/<record id>.npz: the teacher's top-k log-probs at the tokens it wrote


def _drop_partial_line(path: Path) -> None:
    """Truncate a trailing line without its newline: the remains of a write cut short by a kill."""
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            f.truncate(keep)


def shard_paths(data_dir: Path) -> list[Path]:
    """The shards of a teacher-data directory, in write order."""
    return sorted(Path(data_dir).glob(SHARD_GLOB))


def read_records(data_dir: Path) -> Iterator[tuple[str, dict]]:
    """(file:line, record) for every line of every shard; a partial last line is removed first."""
    for path in shard_paths(data_dir):
        _drop_partial_line(path)
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DistillError(f"{path}:{number}: not valid JSON ({err.msg}); delete the shard to redo it")
                if not isinstance(record, dict) or "id" not in record:
                    raise DistillError(f"{path}:{number}: not a teacher record (no 'id')")
                yield f"{path}:{number}", record


def latest_records(data_dir: Path) -> dict[str, dict]:
    """The current record of each id: an answer beats any failure; the newest of equals wins."""
    current: dict[str, dict] = {}
    for _, record in read_records(data_dir):
        old = current.get(record["id"])
        if old is None or old.get("status", "ok") != "ok":
            current[record["id"]] = record
    return current


class ShardWriter:
    """Appends whole, fsynced lines to a fresh shard per run, starting a new one every `shard_records` lines.

    With `rank` (one of several processes writing at once) the shards are named shard-NNNNN-rankR.jsonl: no two
    processes write one file, and a later run's shards still sort after this run's.
    """

    def __init__(self, data_dir: Path, shard_records: int, rank: int | None = None):
        self.data_dir, self.shard_records = Path(data_dir), shard_records
        self.data_dir.mkdir(parents=True, exist_ok=True)
        existing = shard_paths(self.data_dir)
        self.next_index = max(int(p.stem.split("-")[1]) for p in existing) + 1 if existing else 0
        self.suffix = "" if rank is None else f"-rank{rank}"
        self.path: Path | None = None
        self.lines = 0

    def append(self, records: list[dict]) -> None:
        """Write records, so that a kill at any moment leaves every earlier record whole on disk."""
        while records:
            if self.path is None or self.lines >= self.shard_records:
                self.path = self.data_dir / f"shard-{self.next_index:05d}{self.suffix}.jsonl"
                self.next_index, self.lines = self.next_index + 1, 0
            room = self.shard_records - self.lines
            chunk, records = records[:room], records[room:]
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chunk))
                f.flush()
                os.fsync(f.fileno())
            self.lines += len(chunk)


# ---------------------------------------------------------------- top-k log-probs kept at generation


@dataclass
class GeneratedTopK:
    """The teacher's top-k log-probs at each token of one answer, kept so the teacher cache needs no second pass."""

    prompt_ids: np.ndarray  # the prompt as the teacher saw it; empty when the backend did not say
    prompt_tokens: int
    token_ids: np.ndarray  # [n] the tokens the teacher wrote (its end-of-turn token included)
    ids: np.ndarray  # [r, k] best first; row j is the distribution after token_ids[:j] (r = n, or n + 1 when cut)
    log_probs: np.ndarray  # [r, k] log-softmax over the whole vocabulary at temperature 1
    tail: np.ndarray  # [r] log of the mass outside the k ids
    vocab_size: int  # rows of the teacher's head; 0 when the backend did not say


def topk_path(data_dir: Path, record_id: str) -> Path:
    return Path(data_dir) / TOPK_DIR / f"{record_id}.npz"


def tail_from_top(log_probs: np.ndarray) -> np.ndarray:
    """log(1 - sum exp(top)) per row, for backends that only report the top entries (-inf when they hold it all)."""
    rest = 1.0 - np.exp(np.asarray(log_probs, dtype=np.float64)).sum(axis=-1)
    with np.errstate(divide="ignore"):
        return np.log(np.clip(rest, 0.0, None))


def write_topk(path: Path, rows: GeneratedTopK) -> None:
    """Write one answer's kept rows atomically."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f, prompt_ids=rows.prompt_ids.astype(np.int32), prompt_tokens=np.int64(rows.prompt_tokens),
            token_ids=rows.token_ids.astype(np.int32), ids=rows.ids.astype(np.int32),
            log_probs=rows.log_probs.astype(np.float32), tail=rows.tail.astype(np.float32),
            vocab_size=np.int64(rows.vocab_size),
        )


def load_topk(path: Path) -> GeneratedTopK:
    """One answer's kept rows; a damaged file is one clear error."""
    try:
        with np.load(path) as z:
            return GeneratedTopK(**{key: z[key] for key in ("prompt_ids", "token_ids", "ids", "log_probs", "tail")},
                                 prompt_tokens=int(z["prompt_tokens"]), vocab_size=int(z["vocab_size"]))
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise DistillError(f"{path}: unreadable generation log-probs ({err}); delete it (the answer's log-probs "
                           "are then captured by teacher forcing)") from None
