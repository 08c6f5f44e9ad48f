"""The resumable teacher-data stage on a tiny random teacher (its answers are garbage, which is fine)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.data import Prompt, quickstart_prompts_path, read_prompts
from distill.data.examples import load_teacher_data
from distill.errors import DistillError
from distill.teachers.backend import Completion, Failure, SamplingParams
from distill.teachers.local import LocalBackend, generate_texts
from distill.data.teacher_records import latest_records, shard_paths
from distill.teachers.generate import Reasoning, generate_responses, plan_requests, split_reasoning

OK_FIELDS = {"id", "prompt_id", "sample", "teacher", "prompt", "tags", "reference", "status", "messages", "response",
             "reasoning", "finish_reason", "prompt_tokens", "new_tokens"}


@pytest.fixture(scope="module")
def backend(tiny_teacher_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    return LocalBackend(model, AutoTokenizer.from_pretrained(tiny_teacher_dir), name="tiny", batch_size=4)


@pytest.fixture(scope="module")
def prompts() -> list[Prompt]:
    return read_prompts(quickstart_prompts_path())[:9]


def run(backend, prompts, out: Path, **kw):
    options = {"params": SamplingParams(max_new_tokens=3), "progress": False, **kw}
    return generate_responses(backend, prompts, out, **options)


def all_lines(out: Path) -> list[str]:
    return [line for path in shard_paths(out) for line in path.read_text().splitlines()]


class Flaky:
    """A backend whose listed prompts fail until `heal()`; it wraps a real one."""

    def __init__(self, inner, failing: set[str]):
        self.inner, self.failing, self.name, self.batch_size = inner, failing, inner.name, inner.batch_size

    def generate(self, conversations, params):
        results = self.inner.generate(conversations, params)
        return [Failure("HTTP 503 from server") if c[-1]["content"] in self.failing else r
                for c, r in zip(conversations, results)]


def test_records_and_resume(backend, prompts, tmp_path):
    out = tmp_path / "teacher_data"
    first = run(backend, prompts[:5], out)
    assert (first.done, first.skipped_existing, first.failed) == (5, 0, 0)
    before = all_lines(out)
    records = [json.loads(line) for line in before]
    by_id = {p.id: p for p in prompts}
    for r in records:
        assert set(r) == OK_FIELDS and r["teacher"] == "tiny" and r["status"] == "ok" and r["sample"] == 0
        assert r["prompt"] == by_id[r["prompt_id"]].user_text
        assert r["messages"] == by_id[r["prompt_id"]].messages + [{"role": "assistant", "content": r["response"]}]
        assert r["finish_reason"] in ("stop", "length") and 1 <= r["new_tokens"] <= 3 and r["prompt_tokens"] > 0
    assert first.new_tokens == sum(r["new_tokens"] for r in records)

    second = run(backend, prompts, out)
    assert (second.done, second.skipped_existing) == (4, 5)
    assert all_lines(out)[:5] == before  # earlier answers untouched (a new shard per run)
    assert len(shard_paths(out)) == 2
    assert sorted(r["prompt_id"] for r in latest_records(out).values()) == sorted(p.id for p in prompts)
    assert run(backend, prompts, out).done == 0


def test_content_address_changes_with_teacher_params_and_sample(prompts):
    base = plan_requests(prompts[:2], "t", SamplingParams(max_new_tokens=8), samples=1)
    assert [r.id for r in base] == [r.id for r in plan_requests(prompts[:2], "t", SamplingParams(max_new_tokens=8), 1)]
    others = [
        plan_requests(prompts[:2], "other", SamplingParams(max_new_tokens=8), 1),
        plan_requests(prompts[:2], "t", SamplingParams(max_new_tokens=9), 1),
        plan_requests(prompts[:2], "t", SamplingParams(max_new_tokens=8), 1, system_prompt="Be brief."),
    ]
    for other in others:
        assert not {r.id for r in base} & {r.id for r in other}
    sampled = plan_requests(prompts[:2], "t", SamplingParams(temperature=0.7), samples=3)
    assert len({r.id for r in sampled}) == 6 and [r.sample for r in sampled[:3]] == [0, 1, 2]
    # The seed only matters when sampling: greedy ids ignore it.
    assert ([r.id for r in plan_requests(prompts[:1], "t", SamplingParams(seed=1), 1)]
            == [r.id for r in plan_requests(prompts[:1], "t", SamplingParams(seed=2), 1)])


def test_failures_are_recorded_counted_and_retried(backend, prompts, tmp_path):
    out = tmp_path / "teacher_data"
    failing = {prompts[1].user_text, prompts[3].user_text}
    stats = run(Flaky(backend, failing), prompts[:5], out)
    assert (stats.done, stats.failed) == (3, 2) and stats.errors == {"HTTP 503 from server": 2}
    failed = [r for r in latest_records(out).values() if r["status"] == "failed"]
    assert sorted(r["prompt_id"] for r in failed) == sorted([prompts[1].id, prompts[3].id])
    assert all(r["error"] == "HTTP 503 from server" for r in failed)
    with pytest.raises(DistillError, match="no examples$"):  # failed ones never become training examples
        load_teacher_data(out, ids=[r["id"] for r in failed])

    again = run(backend, prompts[:5], out)
    assert (again.done, again.failed, again.retried, again.skipped_existing) == (2, 0, 2, 3)
    latest = latest_records(out)
    assert len(latest) == 5 and all(r["status"] == "ok" for r in latest.values())


def test_killed_mid_write_then_resumed_equals_uninterrupted(backend, prompts, tmp_path):
    whole = tmp_path / "whole"
    run(backend, prompts[:6], whole)
    cut = tmp_path / "cut"
    run(backend, prompts[:6], cut)
    [shard] = shard_paths(cut)
    text = shard.read_text().splitlines()
    # What a kill mid-write leaves: two whole records and the third cut in half, no newline.
    shard.write_text("\n".join(text[:2]) + "\n" + text[2][: len(text[2]) // 2])
    assert len(latest_records(cut)) == 2 and shard.read_text().endswith("\n")
    stats = run(backend, prompts[:6], cut)
    assert (stats.done, stats.skipped_existing) == (4, 2)
    strip = lambda out: sorted(json.dumps(r, sort_keys=True) for r in latest_records(out).values())
    assert strip(cut) == strip(whole)  # same records, none lost, none twice


def test_shards_rotate_and_progress_bar(backend, prompts, tmp_path, capsys):
    out = tmp_path / "teacher_data"
    run(backend, prompts[:5], out, shard_records=2)
    assert [len(p.read_text().splitlines()) for p in shard_paths(out)] == [2, 2, 1]
    assert capsys.readouterr().err == ""  # progress=False: no bar
    run(backend, prompts[:7], out, progress=True)
    assert "7/7" in capsys.readouterr().err  # the bar: done/total, with failures and tokens/s


def test_system_prompt_samples_and_seeds(backend, prompts, tmp_path):
    out = tmp_path / "teacher_data"
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=3)
    run(backend, prompts[:2], out, params=params, samples=3, system_prompt="Answer briefly.")
    records = list(latest_records(out).values())
    assert len(records) == 6 and sorted({r["sample"] for r in records}) == [0, 1, 2]
    assert all(r["messages"][0] == {"role": "system", "content": "Answer briefly."} for r in records)
    # Each sample number has its own seed (3 + s): the same run elsewhere writes the same texts,
    # and the samples of one prompt differ from each other.
    again = tmp_path / "again"
    run(backend, prompts[:2], again, params=params, samples=3, system_prompt="Answer briefly.")
    texts = lambda out: sorted((r["id"], r["response"]) for r in latest_records(out).values())
    assert texts(again) == texts(out)
    assert len({r["response"] for r in records if r["prompt_id"] == prompts[0].id}) > 1


def test_reasoning_keep_and_strip(prompts, tmp_path):
    class Thinker:
        name, batch_size = "thinker", 8

        def generate(self, conversations, params):
            assert all("step by step" in c[-1]["content"] for c in conversations)
            return [Completion("First 2+2 is 4.\nAnswer: 4", "stop", 10, 9) for _ in conversations]

    reasoning = Reasoning(mode="strip", prompt="Think step by step.", marker="Answer:")
    run(Thinker(), prompts[:2], tmp_path / "strip", reasoning=reasoning)
    r = next(iter(latest_records(tmp_path / "strip").values()))
    assert (r["response"], r["reasoning"]) == ("4", "First 2+2 is 4.")
    assert "step by step" not in r["messages"][-2]["content"]  # trains on the question as the user asked it
    reasoning.mode = "keep"
    run(Thinker(), prompts[:2], tmp_path / "keep", reasoning=reasoning)
    r = next(iter(latest_records(tmp_path / "keep").values()))
    assert r["response"] == "First 2+2 is 4.\nAnswer: 4"
    assert split_reasoning("no marker here", "Answer:") == (None, None)


def test_repeated_prompt_ids_and_corrupt_lines_are_refused(backend, prompts, tmp_path):
    out = tmp_path / "teacher_data"
    with pytest.raises(DistillError, match="repeated ids"):
        run(backend, [prompts[0], prompts[0]], out)
    out.mkdir()
    (out / "shard-00000.jsonl").write_text('{"id": "a", "teacher": "tiny"}\nnot json\n')
    with pytest.raises(DistillError, match=r"shard-00000.jsonl:2: not valid JSON"):
        run(backend, prompts[:1], out)


def test_generated_records_read_back_as_chat_examples(backend, prompts, tmp_path):
    out = tmp_path / "teacher_data"
    run(backend, prompts[:3], out)
    [shard] = shard_paths(out)
    records = [json.loads(line) for line in shard.read_text().splitlines()]
    for i, r in enumerate(records):  # the random teacher's text is arbitrary: make one answered, the rest empty
        r["response"] = r["messages"][-1]["content"] = "An answer." if i == 0 else ""
    shard.write_text("".join(json.dumps(r) + "\n" for r in records))
    [example] = load_teacher_data(out)
    assert example.id == records[0]["id"] and example.messages == records[0]["messages"]
    with pytest.raises(DistillError, match="no examples"):
        load_teacher_data(out, ids=[records[1]["id"]])  # chosen, but its answer is empty


def test_local_generation_stop_strings_and_top_logprobs(backend, prompts):
    conversation = prompts[0].messages
    [plain] = generate_texts(backend.model, backend.tokenizer, [conversation], params=SamplingParams(max_new_tokens=6))
    [scored] = generate_texts(backend.model, backend.tokenizer, [conversation],
                              params=SamplingParams(max_new_tokens=6, top_logprobs=5))
    assert scored.text == plain.text and scored.token_ids == plain.token_ids
    cut = scored.finish_reason == "length"  # one more row: the distribution after the last token
    assert len(scored.top_logprobs) == scored.new_tokens + cut and all(len(row) == 5 for row in scored.top_logprobs)
    for token, row in zip(scored.token_ids, scored.top_logprobs):  # greedy: the chosen token is the top-1
        assert row[0][0] == token and row[0][1] >= row[1][1] and row[0][1] <= 0
    if len(plain.text) > 2:
        stop = plain.text[1:3]
        [cut] = generate_texts(backend.model, backend.tokenizer, [conversation],
                               params=SamplingParams(max_new_tokens=6, stop=(stop,)))
        assert stop not in cut.text and plain.text.startswith(cut.text) and cut.finish_reason == "stop"


@pytest.mark.parametrize("mixture", ["route", "all"])
def test_mixture_of_teachers_routes_by_tag_or_asks_all(tmp_path, tiny_teacher_dir, tiny_student_dir, mixture):
    from conftest import tiny_recipe
    from distill import stages
    from distill.stages.data import planned_ids
    from distill.stages.facts import run_files
    from distill.recipe import recipe_from_dict

    rows = [{"id": f"p{i}", "prompt": f"Question {i}?", "tags": ["math"] if i % 2 else []} for i in range(4)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = tiny_recipe(tmp_path / "run", tiny_teacher_dir, tmp_path / "prompts.jsonl")
    raw["data"] = {"prompts": str(tmp_path / "prompts.jsonl"), "max_length": 48}
    raw["generate"] = {"max_new_tokens": 3, "batch_size": 4, "mixture": mixture,
                       "teachers": [{"model": str(tiny_student_dir), "tags": ["math"]}]}
    recipe = recipe_from_dict(raw)
    stages.generate(recipe, progress=False)
    latest = latest_records(run_files(recipe).teacher_data)
    by_teacher = {}
    for r in latest.values():
        by_teacher.setdefault(r["teacher"], set()).add(r["prompt_id"])
    if mixture == "route":
        assert by_teacher == {str(tiny_student_dir): {"p1", "p3"}, str(tiny_teacher_dir): {"p0", "p2"}}
    else:
        assert by_teacher == {str(tiny_student_dir): {"p0", "p1", "p2", "p3"},
                              str(tiny_teacher_dir): {"p0", "p1", "p2", "p3"}}
    assert sorted(planned_ids(recipe)) == sorted(latest)  # training takes exactly these answers


def test_raise_if_all_failed_only_when_nothing_was_answered():
    from distill.teachers.generate import GenerationStats, raise_if_all_failed

    raise_if_all_failed(GenerationStats(teacher="t", done=1, failed=3, errors={"HTTP 400": 3}))
    raise_if_all_failed(GenerationStats(teacher="t", failed=3, skipped_existing=2, errors={"HTTP 400": 3}))
    raise_if_all_failed(GenerationStats(teacher="t"))  # nothing left to do
    stats = GenerationStats(teacher="t", failed=3, errors={"HTTP 400: bad\nsecond line": 2, "timeout": 1})
    with pytest.raises(DistillError, match=r"^generate: all 3 requests to teacher t failed, .*first error: "
                                           r"HTTP 400: bad$"):
        raise_if_all_failed(stats)


def test_cli_generate_exits_2_when_every_request_fails(tmp_path, tiny_teacher_dir, pairs_jsonl, capsys):
    import yaml

    from conftest import tiny_recipe
    from distill.cli import main
    from fault_server import FaultServer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Say {i}."}) + "\n" for i in range(4)))
    with FaultServer(default=["400"]) as server:  # each prompt's first attempt gets an HTTP 400, later ones an answer
        recipe = tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl,
                             teacher={"model": "served-teacher", "endpoint": server.url, "max_retries": 0})
        recipe["data"] = {"prompts": str(prompts), "max_length": 48}
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))

        assert main(["generate", str(path), "--no-progress"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distill: error:")]
        assert len(errors) == 1 and errors[0].startswith(
            "distill: error: generate: all 4 requests to teacher served-teacher failed")
        assert "first error: " in errors[0] and "400" in errors[0], errors
        records = latest_records(tmp_path / "run" / "teacher_data")
        assert len(records) == 4 and all(r["status"] == "failed" for r in records.values())  # kept for the retry

        assert main(["generate", str(path), "--no-progress"]) == 0  # the re-run retries them, and they succeed
        assert all(r["status"] == "ok" for r in latest_records(tmp_path / "run" / "teacher_data").values())
