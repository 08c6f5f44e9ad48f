"""Preference pairs (every file layout, refusals with file:line), the pairs stage (stored reference log-probs equal a
live reference, teacher_vs_student answers, resume), and method.kind: dpo training (metrics, exact resume, CLI)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SHARED, STORIES260K, require_shared, tiny_recipe

from distill.cli import main
from distill.data.examples import read_pairs
from distill.data.teacher_records import latest_records
from distill.data.tokenize import encode_example
from distill.data.layouts import Example
from distill.errors import DistillError
from distill.models import load_model, load_tokenizer
from distill.recipe import recipe_from_dict
from distill.stages import build_pairs, generate, train
from distill.teachers.backend import SamplingParams
from distill.teachers.local import generate_texts

DPO_DEMO = SHARED / "data" / "llamafactory" / "dpo_en_demo.json"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pair_rows(n: int = 16) -> list[dict]:
    return [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"The answer is {2 * i}.",
             "rejected": f"I think it is {2 * i + 1}, or maybe not."} for i in range(n)]


# ---------------------------------------------------------------- reading pairs


def test_every_pair_layout_reads_to_the_same_pair(tmp_path):
    q, good, bad = "What is two plus two?", "Four.", "Five."
    rows = [
        {"prompt": q, "chosen": good, "rejected": bad},
        {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
         "rejected": [{"role": "assistant", "content": bad}]},
        {"instruction": q, "input": "", "chosen": good, "rejected": bad},
        {"conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": good},
         "rejected": {"from": "gpt", "value": bad}},
        {"messages": [{"role": "user", "content": q}], "chosen": good, "rejected": bad},
        {"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
         "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}]},
    ]
    for i, row in enumerate(rows):
        (pair,) = read_pairs(write_jsonl(tmp_path / f"p{i}.jsonl", [row]))
        assert (pair.messages, pair.chosen, pair.rejected) == ([{"role": "user", "content": q}], good, bad), row


def test_llamafactory_dpo_demo_reads():
    pairs = read_pairs(require_shared(DPO_DEMO))
    raw = json.loads(DPO_DEMO.read_text())
    assert len(pairs) > 250
    assert pairs[0].messages[-1] == {"role": "user", "content": raw[0]["conversations"][-1]["value"]}
    assert (pairs[0].chosen, pairs[0].rejected) == (raw[0]["chosen"]["value"], raw[0]["rejected"]["value"])


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "Hi", "chosen": "Same answer.", "rejected": " Same answer. "}, "chosen equals rejected"),
    ({"prompt": "Hi", "chosen": "An answer."}, "missing 'rejected'"),
    ({"prompt": "Hi", "chosen": "An answer.", "rejected": ""}, "empty 'rejected'"),
    ('{"prompt": "Hi", "chosen": "x", ', "not valid JSON"),
])
def test_a_bad_pair_is_refused_with_its_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(3) + [bad])
    with pytest.raises(DistillError, match=f"pairs.jsonl:4: .*{message}"):
        read_pairs(path)


# ---------------------------------------------------------------- the pairs stage


def dpo_recipe(tmp_path: Path, teacher_dir: Path, student_dir: Path, pairs: Path, **sections) -> dict:
    raw = tiny_recipe(tmp_path / "run", teacher_dir, pairs, **sections)
    raw["student"] = {"model": str(student_dir)}
    raw["data"] = {"pairs": str(pairs), "max_length": 48, "eval_fraction": 0.2}
    raw["method"] = {"kind": "dpo", "beta": 0.5, "chunk_size": 16, **sections.get("method", {})}
    raw["pairs"] = {"batch_size": 3}
    return raw


def live_reference(model, tokenizer, record: dict, side: str, max_length: int = 48) -> float:
    """The summed response log-prob from full logits: the simple path the stored value must equal."""
    example = Example(id="", messages=record["messages"] + [{"role": "assistant", "content": record[side]}])
    encoded = encode_example(example, tokenizer, max_length)
    ids = torch.tensor([encoded.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    labels = torch.tensor(encoded.labels[1:])
    logp = torch.log_softmax(logits, -1).gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    return float((logp * (labels != -100)).sum())


def test_stored_reference_log_probs_equal_a_live_reference(tmp_path, tiny_teacher_dir, tiny_student_dir):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    recipe = recipe_from_dict(dpo_recipe(tmp_path, tiny_teacher_dir, tiny_student_dir, pairs))
    stats = build_pairs(recipe, progress=False)
    records = latest_records(recipe.run_dir / "pairs")
    assert stats.built == len(records) == stats.planned and 0 < stats.planned < 16  # the held-out split is eval's
    model = load_model(str(tiny_student_dir), None, dtype=torch.float32, device=torch.device("cpu"))
    tokenizer = load_tokenizer(str(tiny_student_dir), None)
    for record in records.values():
        for side in ("chosen", "rejected"):
            assert record[f"ref_{side}"] == pytest.approx(live_reference(model, tokenizer, record, side), abs=2e-4)
    again = build_pairs(recipe, progress=False)
    assert (again.existing, again.built) == (stats.planned, 0)


def test_teacher_vs_student_pairs_resume_and_hold_the_students_greedy_answer(tmp_path):
    model_dir = require_shared(STORIES260K)  # a real (tiny) model writes real answers; random ones write blanks
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about {w}."} for w in
                                                       ("the sea", "the sky", "a fox", "a robot", "Paris", "fruit",
                                                        "a poem")])
    raw = dpo_recipe(tmp_path, model_dir, model_dir, prompts)
    raw["data"] = {"prompts": str(prompts), "max_length": 64, "eval_fraction": 0.2}
    raw["generate"] = {"max_new_tokens": 8, "batch_size": 4, "temperature": 1.0}  # sampled: unlike greedy
    raw["pairs"] = {"source": "teacher_vs_student", "max_new_tokens": 8, "batch_size": 2}
    recipe = recipe_from_dict(raw)
    generate(recipe, progress=False)
    first = build_pairs(recipe, progress=False, stop_after=1)  # killed after one batch
    assert first.built + sum(first.dropped.values()) == 2
    rest = build_pairs(recipe, progress=False)
    assert first.built + rest.built > 0
    assert rest.existing == 2 and rest.existing + rest.built + sum(rest.dropped.values()) == rest.planned
    lines = [json.loads(line) for f in sorted((recipe.run_dir / "pairs").glob("shard-*.jsonl"))
             for line in f.read_text().splitlines()]
    assert len(lines) == len({r["id"] for r in lines}) == rest.planned  # nothing lost, nothing twice
    model = load_model(str(model_dir), None, dtype=torch.float32, device=torch.device("cpu"))
    tokenizer = load_tokenizer(str(model_dir), None)
    answers = generate_texts(model, tokenizer, [r["messages"] for r in lines],
                             params=SamplingParams(max_new_tokens=8, temperature=0.0))
    assert [r["rejected"] for r in lines] == [a.text for a in answers]
    teacher = {json.dumps(r["messages"][:-1]): r["messages"][-1]["content"]
               for r in latest_records(recipe.run_dir / "teacher_data").values()}
    assert all(r["chosen"] == teacher[json.dumps(r["messages"])] for r in lines)


# ---------------------------------------------------------------- dpo training


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") != "eval"]  # training rows (held-out evaluation rows left out)


@pytest.mark.parametrize("loss", ["sigmoid", "simpo"])
def test_dpo_trains_logs_pair_metrics_and_resumes_exactly(tmp_path, tiny_teacher_dir, tiny_student_dir, loss):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    raw = dpo_recipe(tmp_path, tiny_teacher_dir, tiny_student_dir, pairs, method={"loss": loss, "sft_weight": 0.1},
                     train={"steps": 8, "lr": 1e-2, "batch_size": 4, "checkpoint_every": 4})
    whole = recipe_from_dict(raw)
    build_pairs(whole, progress=False)
    train(whole, progress=False)
    logged = metrics(whole.run_dir)
    assert [m["step"] for m in logged] == list(range(1, 9))
    assert {"loss", "margin", "accuracy", "chosen_logp", "rejected_logp", "sft"} <= set(logged[0])
    assert logged[-1]["margin"] > logged[0]["margin"] and logged[-1]["accuracy"] >= 0.75

    raw["output_dir"] = str(tmp_path / "killed")
    killed = recipe_from_dict(raw)
    build_pairs(killed, progress=False)
    assert train(killed, progress=False, stop_after=4) is None
    train(killed, progress=False)
    assert [m["loss"] for m in metrics(killed.run_dir)] == pytest.approx([m["loss"] for m in logged], rel=1e-6)


def test_dpo_with_lora_uses_the_adapter_free_reference(tmp_path, tiny_teacher_dir, tiny_student_dir):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    raw = dpo_recipe(tmp_path, tiny_teacher_dir, tiny_student_dir, pairs,
                     train={"steps": 2, "lr": 1e-2, "lora": {"r": 4, "alpha": 8}})
    recipe = recipe_from_dict(raw)
    build_pairs(recipe, progress=False)
    train(recipe, progress=False)
    first = metrics(recipe.run_dir)[0]
    # LoRA's B starts at zero: at step 1 the policy is the reference, so every reward (and the margin) is 0
    assert first["margin"] == pytest.approx(0.0, abs=1e-5)


def test_training_refuses_pairs_not_built_yet(tmp_path, tiny_teacher_dir, tiny_student_dir):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    recipe = recipe_from_dict(dpo_recipe(tmp_path, tiny_teacher_dir, tiny_student_dir, pairs))
    with pytest.raises(DistillError, match="distill pairs"):
        train(recipe, progress=False)


# ---------------------------------------------------------------- bad input at the command line


def run_cli(tmp_path: Path, raw: dict, command: str, capsys) -> tuple[int, str]:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main([command, str(path), "--no-progress"])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw["data"].pop("pairs") and raw["data"].update(train=raw["data"]["eval_file"]),
     "method.kind: dpo needs preference pairs"),
    (lambda raw: raw["method"].update(kind="orpo"), "method.kind: Input should be 'kd', 'on_policy', 'sft', 'dpo' or 'kto'"),
    (lambda raw: raw["method"].update(loss="hinge", label_smoothing=0.1), "method.label_smoothing applies"),
])
def test_bad_dpo_recipes_are_one_line_and_exit_2_before_writing(tmp_path, tiny_teacher_dir, tiny_student_dir,
                                                                capsys, change, message):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    raw = dpo_recipe(tmp_path, tiny_teacher_dir, tiny_student_dir, pairs)
    raw["data"]["eval_file"] = str(write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}]))
    change(raw)
    raw["data"].pop("eval_file", None)
    code, err = run_cli(tmp_path, raw, "pairs", capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_malformed_pair_file_stops_the_pairs_command_with_file_and_line(tmp_path, tiny_teacher_dir,
                                                                          tiny_student_dir, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(5) + ['{"prompt": "x", "chosen": "y"}'] + pair_rows(2))
    raw = dpo_recipe(tmp_path, tiny_teacher_dir, tiny_student_dir, pairs)
    code, err = run_cli(tmp_path, raw, "pairs", capsys)
    assert code == 2 and f"{pairs}:6: missing 'rejected'" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "pairs").exists()
