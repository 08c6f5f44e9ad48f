"""The eval stage's optional sections on a tiny run: before-training, calibration, suites, judge, contamination."""
from __future__ import annotations

import json

import pytest

from conftest import tiny_recipe
from distill import stages
from distill.recipe import recipe_from_dict
from distill.report.table import format_table


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_teacher_dir):
    tmp = tmp_path_factory.mktemp("eval_stage")
    rows = [{"id": f"q{i}", "prompt": f"Question {i}: what is {i} plus {i}?", "response": f"The answer is {2 * i}."}
            for i in range(16)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Eval: one item copied from training (a leak the guard must flag) and one new question.
    leaked = {**rows[5], "id": "leak"}
    fresh = {"id": "new", "prompt": "Name three colours of the rainbow, please.", "response": "Red, green, blue."}
    (tmp / "eval.jsonl").write_text(json.dumps(leaked) + "\n" + json.dumps(fresh) + "\n")
    (tmp / "sums.jsonl").write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                                            for i in range(3)))
    (tmp / "mc.jsonl").write_text(json.dumps({"question": "Sky colour?", "choices": ["blue", "green"], "answer": 0})
                                  + "\n")
    (tmp / "mini.yaml").write_text(
        "name: mini\ntasks:\n"
        "  - {name: sums, file: sums.jsonl, kind: generate, scorer: exact_match, fields: {prompt: question}, "
        "max_new_tokens: 4}\n"
        "  - {name: mc, file: mc.jsonl, kind: multiple_choice, fields: {prompt: question}}\n")
    raw = tiny_recipe(tmp / "run", tiny_teacher_dir, tmp / "train.jsonl",
                      eval={"suites": [str(tmp / "mini.yaml")], "judge": {"max_items": 2}, "contamination_ngram": 5,
                            "speed_batch_sizes": [1, 2]})
    raw["data"]["eval"] = str(tmp / "eval.jsonl")
    recipe = recipe_from_dict(raw)
    stages.prepare_run_dir(recipe)
    stages.build_student(recipe)
    stages.train(recipe, progress=False)
    return recipe, stages.evaluate(recipe, progress=False)


def test_before_training_general_text_and_calibration(evaluated):
    recipe, report = evaluated
    before, student = report["student_init"], report["student"]
    assert set(before) == {"perplexity", "perplexity_general", "bits_per_byte", "bits_per_byte_general",
                           "top1_agreement", "kl_to_teacher"}
    assert before["perplexity"] != student["perplexity"]  # training changed the student
    for side in ("teacher", "student"):
        assert report[side]["perplexity_general"] > 1
        assert 0 <= report[side]["ece"] <= 1
        bins = report["calibration"][side]["bins"]
        assert sum(b["count"] for b in bins) == report["calibration"][side]["n"] > 0
        assert report[side]["decode_tokens_per_s_b2"] > 0 and report[side]["time_to_first_token_s"] > 0
    assert "calibration" not in report["student"]  # the bins live in report["calibration"] only


def test_suites_judge_and_contamination(evaluated):
    recipe, report = evaluated
    for side in ("teacher", "student"):
        assert set(report["suites"][side]["mini"]) == {"sums", "mc"}
        assert 0 <= report["suites"][side]["mini"]["sums"] <= 1
    samples = [json.loads(x) for x in (recipe.run_dir / "suite_samples.jsonl").read_text().splitlines()]
    assert {s["model"] for s in samples} == {"teacher", "student"}
    judge = report["judge"]
    assert judge["n"] == 2 and judge["wins"] + judge["losses"] + judge["ties"] + judge["unparseable"] == 2
    assert judge["judge"] == recipe.teacher.model and "{" not in judge["prompt"][:0]
    assert len((recipe.run_dir / "judge.jsonl").read_text().splitlines()) == 2
    c = report["contamination"]
    assert (c["eval_items"], c["overlapping"], c["ngram"]) == (2, 1, 5)
    assert [e["id"] for e in c["examples"]] == ["leak"]
    table = format_table(report)
    assert "before training" in table and "task suites" in table and "judge (" in table
    assert "1 of 2 eval items share a 5-gram" in table


def test_lm_eval_section_scores_teacher_and_student(evaluated, tmp_path, tiny_teacher_dir):
    pytest.importorskip("lm_eval")
    from distill.eval.lm_eval_bridge import parse_task_specs
    from distill.stages.evaluation import lm_eval_section
    from distill.models import load_model, load_tokenizer

    recipe, _ = evaluated
    items = [{"question": f"{i} plus one is", "choices": [str(i + 1), str(i + 7)], "answer": 0} for i in range(3)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"lm_eval": f"mc={tmp_path}/mc.jsonl:multiple_choice"})})
    model, tokenizer = load_model(str(tiny_teacher_dir)), load_tokenizer(str(tiny_teacher_dir))
    section = lm_eval_section(recipe, parse_task_specs(recipe.eval.lm_eval), {"teacher": model, "student": model},
                              {"teacher": tokenizer, "student": tokenizer})
    lm = section["lm_eval"]
    assert lm["teacher"]["mc"]["n"] == 3 and 0 <= lm["teacher"]["mc"]["acc"] <= 1
    assert lm["teacher"] == lm["student"]  # the same model scores the same


def test_html_report_shows_before_training_contamination_suites_and_judge(evaluated):
    from distill.report.html import write_report

    recipe, _ = evaluated
    html = write_report(recipe.run_dir).read_text()
    assert "before training" in html and "Contamination: 1 of 2 eval items" in html
    assert "Task suites" in html and "Judge win rate" in html and "Calibration" in html


def test_speed_threads_times_with_that_many_threads_and_restores_them(tmp_path, tiny_teacher_dir, pairs_jsonl):
    import torch

    from distill.eval.measure import speed_row
    from distill.stages.evaluation import measure_settings
    from distill.models import load_model, load_tokenizer

    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl,
                                          eval={"speed_threads": 1, "speed_batch_sizes": [1, 2]}))
    model, tok = load_model(str(tiny_teacher_dir)), load_tokenizer(str(tiny_teacher_dir))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        row = speed_row(model, tok, torch.device("cpu"), 0, measure_settings(recipe))
        assert row["speed_threads"] == 1 and torch.get_num_threads() == 2
        assert row["decode_tokens_per_s"] > 0 and row["decode_tokens_per_s_b2"] > 0
    finally:
        torch.set_num_threads(before)
