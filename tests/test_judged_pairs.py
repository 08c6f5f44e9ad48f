"""Judged preference pairs (best vs worst of sampled answers, by a scripted pairwise judge or the final-number
verifier: ties and unreadable verdicts dropped and counted, resume after a kill) and the filter section on pairs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import STORIES260K, require_shared, tiny_recipe

from distill.cli import main
from distill.eval.best_worst import KEPT, TIE, UNPARSEABLE, judge_best_worst, verify_best_worst
from distill.eval.judge import DEFAULT_RUBRIC
from distill.models import load_model, load_tokenizer
from distill.recipe import recipe_from_dict
from distill.stages import build_pairs, generate
from distill.stages.pairs import pair_training_items
from distill.teachers.backend import Completion


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def shown(text: str) -> tuple[str, str]:
    """(answer A, answer B) as a judge prompt shows them."""
    a = text.split("[Answer A]\n", 1)[1].split("\n\n[Answer B]\n", 1)
    return a[0], a[1].split(f"\n\n{DEFAULT_RUBRIC}", 1)[0]


class ScriptedJudge:
    """Prefers the answer `better(a, b)` names ("A", "B" or "tie"), in whichever order it is shown; logs questions."""

    def __init__(self, better):
        self.better, self.questions = better, []

    def __call__(self, conversations):
        replies = []
        for messages in conversations:
            text = messages[-1]["content"]
            self.questions.append(text.split("[Question]\n", 1)[1].split("\n\n[Answer A]", 1)[0])
            verdict = self.better(*shown(text))
            replies.append(verdict if verdict.startswith("no ") else f"A reason.\nVerdict: {verdict}")
        return replies


def by_quality(a: str, b: str) -> str:
    qa, qb = (int(re.search(r"quality (\d+)", t).group(1)) for t in (a, b))
    return "tie" if qa == qb else ("A" if qa > qb else "B")


def by_length(a: str, b: str) -> str:
    return "tie" if len(a) == len(b) else ("A" if len(a) > len(b) else "B")


# ---------------------------------------------------------------- best vs worst (building block)


def test_the_judge_picks_the_best_and_the_worst_by_wins_minus_losses():
    answers = [[f"answer with quality {q}" for q in (2, 5, 1, 3)], ["quality 4", "quality 7"]]
    judge = ScriptedJudge(by_quality)
    choices = judge_best_worst(judge, ["q0", "q1"], answers)
    assert [(c.outcome, c.chosen, c.rejected) for c in choices] == [(KEPT, 1, 2), (KEPT, 1, 0)]
    assert choices[0].scores == [-1.0, 3.0, -3.0, 1.0]
    assert len(judge.questions) == 2 * (6 + 1)  # every two answers of a prompt, in both orders


@pytest.mark.parametrize("better, outcome", [
    (lambda a, b: "tie", TIE),
    (lambda a, b: "A", TIE),  # an order-biased judge: the two orders disagree on every comparison
    (lambda a, b: "no verdict here", UNPARSEABLE),
])
def test_ties_and_unreadable_verdicts_give_no_pair(better, outcome):
    (choice,) = judge_best_worst(ScriptedJudge(better), ["q"], [["quality 1", "quality 2", "quality 3"]])
    assert (choice.outcome, choice.chosen, choice.rejected) == (outcome, None, None)


def test_the_verifier_prefers_a_right_final_number_to_a_wrong_one():
    reference = "She sells 16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars.\n#### 18"
    answers = [["I think 17.\n#### 17", "9 * 2 = 18, so #### 18", "no idea", "#### 18"],
               ["#### 18", "The answer is 18."], ["#### 3", "#### 4"], ["#### 1", "#### 2"]]
    choices = verify_best_worst(answers, [reference, reference, reference, "no number"])
    assert [(c.outcome, c.chosen, c.rejected) for c in choices] == [
        (KEPT, 1, 0), (TIE, None, None), (TIE, None, None), (UNPARSEABLE, None, None)]
    assert choices[0].scores == [0.0, 1.0, 0.0, 1.0]


# ---------------------------------------------------------------- the pairs stage, judged


def judged_recipe(tmp_path: Path, model_dir: Path, prompts: Path, name: str, **pairs) -> dict:
    raw = tiny_recipe(tmp_path / name, model_dir, prompts)
    raw["student"] = {"model": str(model_dir)}
    raw["data"] = {"prompts": str(prompts), "max_length": 96, "eval_fraction": 0.2}
    raw["method"] = {"kind": "dpo", "beta": 0.5, "chunk_size": 16}
    raw["generate"] = {"max_new_tokens": 8, "batch_size": 4}
    raw["pairs"] = {"source": "judged", "max_new_tokens": 12, "batch_size": 2, **pairs}
    return raw


def records_on_disk(run_dir: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((run_dir / "pairs").glob("shard-*.jsonl"))
            for line in f.read_text().splitlines()]


STORY_PROMPTS = [{"prompt": f"Tell me about {w}."} for w in
                 ("the sea", "the sky", "a fox", "a robot", "Paris", "fruit", "a poem", "a dog", "snow")]


def test_judged_pairs_hold_the_best_and_worst_sample_and_resume_after_a_kill(tmp_path):
    model_dir = require_shared(STORIES260K)  # a real (tiny) model writes real, varied answers
    prompts = write_jsonl(tmp_path / "prompts.jsonl", STORY_PROMPTS)
    recipe = recipe_from_dict(judged_recipe(tmp_path, model_dir, prompts, "run", sample_from="student", samples=3))
    generate(recipe, progress=False)
    first_judge = ScriptedJudge(by_length)
    first = build_pairs(recipe, progress=False, stop_after=1, judge=first_judge)  # killed after one batch
    assert first.built + sum(first.dropped.values()) == 2
    rest_judge = ScriptedJudge(by_length)
    rest = build_pairs(recipe, progress=False, judge=rest_judge)
    assert rest.existing == 2 and rest.existing + rest.built + sum(rest.dropped.values()) == rest.planned
    assert not set(first_judge.questions) & set(rest_judge.questions)  # the resume judged only the missing pairs
    lines = records_on_disk(recipe.run_dir)
    assert len(lines) == len({r["id"] for r in lines}) == rest.planned  # nothing lost, nothing twice
    kept = [r for r in lines if r["status"] == "ok"]
    assert kept, "no pair kept: the samples were all the same length"
    for record in lines:
        texts = [s["text"] for s in record["samples"]]
        assert all(s["from"] == "student" for s in record["samples"]) and len(set(texts)) == len(texts) <= 3
        if record["status"] == "ok":  # the longest answer beats every other: chosen; the shortest: rejected
            assert len(record["chosen"]) == max(map(len, texts)) > len(record["rejected"]) == min(map(len, texts))
            assert {"ref_chosen", "ref_rejected", "chosen_tokens", "rejected_tokens"} <= set(record)
        else:
            assert record["reason"] in (TIE, "fewer than 2 distinct answers")
    assert rest.totals == {k: sum(1 for r in lines if r.get("reason", "ok") == k) for k in rest.totals}
    assert sum(rest.totals.values()) == rest.planned
    # The samples come from the student at pairs.temperature, one seed per sample number, as generate_texts draws.
    assert build_pairs(recipe, progress=False, judge=ScriptedJudge(by_length)).built == 0  # all there: no work


def test_a_judge_that_ties_or_cannot_be_read_drops_every_pair_and_counts_it(tmp_path):
    model_dir = require_shared(STORIES260K)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", STORY_PROMPTS[:6])
    for name, better, reason in (("tie", lambda a, b: "tie", TIE), ("bad", lambda a, b: "no idea", UNPARSEABLE)):
        recipe = recipe_from_dict(judged_recipe(tmp_path, model_dir, prompts, name, sample_from="student",
                                                samples=3))
        generate(recipe, progress=False)
        stats = build_pairs(recipe, progress=False, judge=ScriptedJudge(better))
        judged = sum(len(r["samples"]) >= 2 for r in records_on_disk(recipe.run_dir))
        assert stats.built == 0 and judged > 0 and stats.dropped.get(reason) == stats.totals.get(reason) == judged
        with pytest.raises(Exception, match="no usable preference pairs"):
            model = load_model(str(model_dir), None, dtype=torch.float32, device=torch.device("cpu"))
            pair_training_items(recipe, model, load_tokenizer(str(model_dir), None))


class ArithmeticTeacher:
    """A served-teacher stand-in: answers "What is A plus B?" right on even seeds, off by one on odd ones."""

    name, batch_size = "arithmetic", 4

    def __init__(self):
        self.seeds = []

    def generate(self, conversations, params):
        self.seeds.append(params.seed)
        out = []
        for messages in conversations:
            a, b = map(int, re.findall(r"\d+", messages[-1]["content"])[:2])
            right = a + b if params.seed % 2 == 0 or a == 0 else a + b + 1  # question 0: every sample right
            out.append(Completion(f"Sample {params.seed}: {a} + {b} = {right}.\n#### {right}", "stop", 5, 5))
        return out


def test_the_verifier_scores_gsm8k_style_answers_against_the_reference(tmp_path, monkeypatch):
    model_dir = require_shared(STORIES260K)
    rows = [{"question": f"What is {i} plus {i + 1}?", "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}"}
            for i in range(10)]
    prompts = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    raw = judged_recipe(tmp_path, model_dir, prompts, "run", scorer="verifier", samples=2, sample_from="teacher")
    raw["data"]["max_eval_examples"] = 2  # the hashed split depends on the model's path: at most 2 of 10 held out
    recipe = recipe_from_dict(raw)
    generate(recipe, progress=False)
    teacher = ArithmeticTeacher()
    monkeypatch.setattr("distill.stages.pairs.teacher_backend", lambda recipe: teacher)
    stats = build_pairs(recipe, progress=False)
    assert set(teacher.seeds) == {recipe.seed, recipe.seed + 1}  # one seed per sample number
    lines = records_on_disk(recipe.run_dir)
    assert len(lines) == stats.planned >= 8
    for record in lines:
        a = int(re.findall(r"\d+", record["messages"][-1]["content"])[0])
        if a == 0:  # both samples right: a tie, dropped and counted
            assert (record["status"], record["reason"], record["scores"]) == ("dropped", TIE, [1.0, 1.0])
            continue
        assert record["status"] == "ok" and record["chosen"].endswith(f"#### {2 * a + 1}")
        assert record["rejected"].endswith(f"#### {2 * a + 2}")
        assert sorted(record["scores"]) == [0.0, 1.0] and all(s["from"] == "teacher" for s in record["samples"])
    assert stats.totals.get(TIE, 0) == sum(r.get("reason") == TIE for r in lines)
    assert stats.totals["ok"] == stats.built == len(lines) - stats.totals.get(TIE, 0)


# ---------------------------------------------------------------- the filter section on pairs


def test_the_filter_section_drops_a_duplicate_and_an_over_long_pair(tmp_path, tiny_teacher_dir, tiny_student_dir):
    rows = [{"prompt": f"Question {i}: name a colour number {i}.", "chosen": f"Colour {i} is blue.",
             "rejected": f"I do not know colour {i}."} for i in range(8)]
    rows.append({"prompt": "question 3: NAME a colour number 3.", "chosen": "colour 3 is BLUE.",
                 "rejected": "I do not  know colour 3."})  # the same pair but for case and spacing
    rows.append({"prompt": "Question 9: describe the sky.", "chosen": " ".join(["word"] * 40),
                 "rejected": "Blue."})
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "Held out?", "response": "Yes."}])
    raw = tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs)
    raw["student"] = {"model": str(tiny_student_dir)}
    raw["data"] = {"pairs": str(pairs), "eval": str(held_out), "max_length": 64}
    raw["method"] = {"kind": "dpo", "chunk_size": 16}
    raw["filter"] = {"length": {"max_words": 30}}
    recipe = recipe_from_dict(raw)
    stats = build_pairs(recipe, progress=False)
    assert stats.planned == stats.built == 10 and stats.filtered == {"length": 1, "exact_dedup": 1}
    report = json.loads((recipe.run_dir / "pairs.filter.report.json").read_text())
    by_name = {f["name"]: f for f in report["filters"]}
    assert report["total_in"] == 10 and report["total_out"] == 8
    assert "chosen: 40 words (bounds 1..30)" == by_name["length"]["examples"][0]["reason"]
    assert by_name["exact_dedup"]["examples"][0]["reason"].startswith("same text as")
    model = load_model(str(tiny_student_dir), None, dtype=torch.float32, device=torch.device("cpu"))
    items = pair_training_items(recipe, model, load_tokenizer(str(tiny_student_dir), None))
    assert len(items) == 8
    raw["filter"] = {"length": False, "exact_dedup": False, "near_dedup": False}
    assert len(pair_training_items(recipe_from_dict(raw), model, load_tokenizer(str(tiny_student_dir), None))) == 10


# ---------------------------------------------------------------- bad recipes


@pytest.mark.parametrize("pairs, data, message", [
    ({"source": "file", "samples": 3}, None, "pairs.samples: only pairs.source: judged reads it"),
    ({"source": "judged", "scorer": "oracle"}, None, "pairs.scorer: Input should be 'judge' or 'verifier'"),
    ({"source": "judged", "sample_from": "crowd"}, None, "pairs.sample_from: Input should be"),
    ({"source": "judged", "temperature": 0}, None, "pairs.temperature: pairs.samples > 1 needs temperature > 0"),
    ({"source": "judged", "samples": 1}, None, "pairs.samples: judged pairs need at least 2 answers"),
    ({"source": "judged", "judge": {"modle": "x"}}, None, "pairs.judge.modle: unknown key"),
    ({"source": "judged", "scorer": "verifier", "judge": {}}, None, "pairs.judge: only pairs.scorer: judge"),
    ({"source": "judged"}, "pairs", "pairs.source: judged needs data.prompts"),
])
def test_bad_judged_recipes_are_one_line_naming_the_key_and_exit_2(tmp_path, tiny_teacher_dir, capsys, pairs, data,
                                                                   message):
    import yaml

    prompts = write_jsonl(tmp_path / "prompts.jsonl", STORY_PROMPTS)
    raw = judged_recipe(tmp_path, tiny_teacher_dir, prompts, "run")
    raw["pairs"] = pairs
    if data == "pairs":
        raw["data"] = {"pairs": str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b",
                                                                        "rejected": "c"}]))}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["pairs", str(path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_distill_pairs_samples_teacher_and_student_and_asks_the_teacher_as_judge(tmp_path, capsys):
    import yaml

    model_dir = require_shared(STORIES260K)  # teacher, student and (by default) judge: the real plumbing, no script
    prompts = write_jsonl(tmp_path / "prompts.jsonl", STORY_PROMPTS[:5])
    raw = judged_recipe(tmp_path, model_dir, prompts, "run", sample_from="both", samples=1,
                        judge={"max_new_tokens": 8, "rubric": "Prefer the kinder story."})
    recipe = recipe_from_dict(raw)
    generate(recipe, progress=False)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["pairs", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = records_on_disk(recipe.run_dir)
    assert lines and all(r["source"] == "judged" for r in lines)
    assert {s["from"] for r in lines for s in r["samples"]} == {"teacher", "student"}
    counts = re.search(r"judged: (\d+) kept, (\d+) ties, (\d+) unparseable", out)
    assert counts, out
    reasons = [r.get("reason", "ok") for r in lines]
    assert [int(c) for c in counts.groups()] == [reasons.count(k) for k in ("ok", TIE, UNPARSEABLE)]
