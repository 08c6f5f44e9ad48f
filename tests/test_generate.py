"""The resumable teacher-responses stage on a tiny random teacher (its answers are garbage, which is fine)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.data import Prompt, quickstart_prompts_path, read_prompts
from distill.errors import DistillError
from distill.data.examples import load_teacher_data
from distill.teachers.generate import existing_records, generate_responses

FIELDS = {"id", "prompt", "messages", "response", "finish_reason", "new_tokens", "teacher"}


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir), AutoTokenizer.from_pretrained(tiny_teacher_dir)


@pytest.fixture(scope="module")
def prompts() -> list[Prompt]:
    return read_prompts(quickstart_prompts_path())[:9]


def run(teacher, prompts, path: Path, **kw):
    model, tok = teacher
    options = {"teacher_name": "tiny", "batch_size": 4, "max_new_tokens": 3, "progress": False, **kw}
    return generate_responses(model, tok, prompts, path, **options)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_records_and_resume(teacher, prompts, tmp_path):
    path = tmp_path / "teacher_data.jsonl"
    first = run(teacher, prompts[:5], path)
    assert (first.done, first.skipped_existing) == (5, 0)
    before = lines(path)
    records = [json.loads(line) for line in before]
    assert {r["id"] for r in records} == {p.id for p in prompts[:5]}
    by_id = {p.id: p for p in prompts}
    for r in records:
        assert set(r) == FIELDS and r["teacher"] == "tiny"
        assert r["prompt"] == by_id[r["id"]].user_text
        assert r["messages"] == by_id[r["id"]].messages + [{"role": "assistant", "content": r["response"]}]
        assert r["finish_reason"] in ("stop", "length") and 1 <= r["new_tokens"] <= 3
    assert first.new_tokens == sum(r["new_tokens"] for r in records)

    second = run(teacher, prompts, path)
    assert (second.done, second.skipped_existing) == (4, 5)
    after = lines(path)
    assert after[:5] == before  # earlier answers untouched
    assert sorted(json.loads(line)["id"] for line in after) == sorted(p.id for p in prompts)
    assert run(teacher, prompts, path).done == 0


def test_a_killed_write_is_truncated_and_regenerated(teacher, prompts, tmp_path):
    path = tmp_path / "teacher_data.jsonl"
    run(teacher, prompts[:4], path)
    complete = lines(path)
    victim = json.loads(complete[-1])["id"]
    # What a kill mid-write leaves: the last record cut in half, no newline.
    path.write_text("\n".join(complete[:-1]) + "\n" + complete[-1][: len(complete[-1]) // 2])
    assert victim not in existing_records(path)
    assert path.read_text().endswith("\n")  # the partial line is gone
    stats = run(teacher, prompts[:4], path)
    assert (stats.done, stats.skipped_existing) == (1, 3)
    ids = [json.loads(line)["id"] for line in lines(path)]
    assert sorted(ids) == sorted(p.id for p in prompts[:4]) and ids[-1] == victim


def test_system_prompt_and_teacher_mismatch(teacher, prompts, tmp_path, capsys):
    path = tmp_path / "teacher_data.jsonl"
    run(teacher, prompts[:2], path, system_prompt="Answer briefly.")
    assert capsys.readouterr().err == ""  # progress=False: no bar
    record = json.loads(lines(path)[0])
    assert record["messages"][0] == {"role": "system", "content": "Answer briefly."}
    assert record["messages"][-1]["role"] == "assistant"
    run(teacher, prompts[:3], path, progress=True)
    assert "3/3" in capsys.readouterr().err  # the bar: done/total, with tokens and tokens/s
    with pytest.raises(DistillError, match="holds answers from teacher 'tiny', not 'other'"):
        run(teacher, prompts[:3], path, teacher_name="other")


def test_repeated_prompt_ids_and_corrupt_lines_are_refused(teacher, prompts, tmp_path):
    path = tmp_path / "teacher_data.jsonl"
    with pytest.raises(DistillError, match="repeated ids"):
        run(teacher, [prompts[0], prompts[0]], path)
    path.write_text('{"id": "a", "teacher": "tiny"}\nnot json\n')
    with pytest.raises(DistillError, match=r"teacher_data.jsonl:2: not valid JSON"):
        run(teacher, prompts[:1], path)


def test_generated_records_read_back_as_chat_examples(teacher, prompts, tmp_path):
    path = tmp_path / "teacher_data.jsonl"
    run(teacher, prompts[:3], path)
    records = [json.loads(line) for line in lines(path)]
    for i, r in enumerate(records):  # the random teacher's text is arbitrary: make one answered, the rest empty
        r["response"] = r["messages"][-1]["content"] = "An answer." if i == 0 else ""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    [example] = load_teacher_data(path)
    assert example.id == records[0]["id"] and example.messages == records[0]["messages"]
