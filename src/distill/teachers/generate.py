"""The resumable teacher-responses stage: answer every prompt once, appending to a JSONL file batch by batch."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.data.examples import Messages, Prompt
from distill.errors import DistillError
from distill.teachers.local import Generation, generate_texts, prompt_ids


@dataclass
class GenerationStats:
    """What one run of the stage did."""

    done: int  # prompts answered in this run
    skipped_existing: int  # prompts already answered in out_path
    new_tokens: int
    seconds: float
    empty: int = 0  # answers with no text (kept in the file; load_teacher_data skips them)


def _drop_partial_line(path: Path) -> None:
    """Truncate a trailing line without its newline: the remains of a write cut short by a kill."""
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            f.truncate(keep)


def existing_records(path: Path) -> dict[str, dict]:
    """Records already in a teacher_data.jsonl, by id (a partial last line is removed first)."""
    if not path.exists():
        return {}
    _drop_partial_line(path)
    records = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DistillError(f"{path}:{number}: not valid JSON ({err.msg}); delete the file to regenerate") from None
        if not isinstance(record, dict) or "id" not in record:
            raise DistillError(f"{path}:{number}: not a teacher record (no 'id')")
        records[str(record["id"])] = record
    return records


def _check_same_teacher(path: Path, records: dict[str, dict], teacher_name: str) -> None:
    others = {r.get("teacher") for r in records.values()} - {teacher_name}
    if others:
        raise DistillError(
            f"{path}: holds answers from teacher {sorted(map(str, others))[0]!r}, not {teacher_name!r}; "
            "delete it or use another output_dir"
        )


def _conversation(prompt: Prompt, system_prompt: str | None) -> Messages:
    if system_prompt and prompt.messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + prompt.messages
    return prompt.messages


def _append(path: Path, records: list[dict]) -> None:
    """Append whole lines and make them durable before the next batch starts."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    out_path: Path,
    *,
    teacher_name: str,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    system_prompt: str | None = None,
    progress: bool = True,
) -> GenerationStats:
    """Answer the prompts not yet in out_path and append them; killing and re-running loses and repeats nothing."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if len({p.id for p in prompts}) != len(prompts):
        raise DistillError("prompts have repeated ids; every prompt needs its own id")
    existing = existing_records(out_path)
    _check_same_teacher(out_path, existing, teacher_name)
    todo = [(p, _conversation(p, system_prompt)) for p in prompts if p.id not in existing]
    # Longest first: similar lengths share a batch (less padding) and memory trouble shows up at once.
    todo.sort(key=lambda item: (-len(prompt_ids(tokenizer, item[1])), item[0].id))
    stats = GenerationStats(done=0, skipped_existing=len(prompts) - len(todo), new_tokens=0, seconds=0.0)
    bar = tqdm(total=len(prompts), initial=stats.skipped_existing, desc="teacher answers", unit="prompt",
               disable=not progress)
    start = time.perf_counter()
    for first in range(0, len(todo), batch_size):
        batch = todo[first:first + batch_size]
        answers = generate_texts(
            model, tokenizer, [conv for _, conv in batch], max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, seed=seed + first,
        )
        records = [_record(p, conv, a, teacher_name) for (p, conv), a in zip(batch, answers)]
        _append(out_path, records)
        stats.done += len(records)
        stats.new_tokens += sum(a.new_tokens for a in answers)
        stats.empty += sum(not a.text for a in answers)
        stats.seconds = time.perf_counter() - start
        bar.update(len(records))
        bar.set_postfix(tokens=stats.new_tokens, tok_per_s=f"{stats.new_tokens / max(stats.seconds, 1e-9):.1f}")
    bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _record(prompt: Prompt, conversation: Messages, answer: Generation, teacher_name: str) -> dict:
    return {
        "id": prompt.id,
        "prompt": prompt.user_text,
        "messages": conversation + [{"role": "assistant", "content": answer.text}],
        "response": answer.text,
        "finish_reason": answer.finish_reason,
        "new_tokens": answer.new_tokens,
        "teacher": teacher_name,
    }
