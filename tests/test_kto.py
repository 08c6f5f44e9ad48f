"""method.kind: kto on labelled single answers: reading the record layouts (and LLaMA-Factory's kto_en_demo.json),
stored reference log-probs against a live computation, training that lowers the loss and resumes exactly, LoRA's
adapter-free reference, a kto stage in a `stages:` recipe, and bad input refused at the command line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SHARED, STORIES260K, require_shared, tiny_recipe

from distill.cli import main
from distill.data.examples import read_labelled, read_pairs
from distill.data.layouts import Example
from distill.data.teacher_records import latest_records
from distill.data.tokenize import encode_example
from distill.errors import DistillError
from distill.losses.preference import KtoSettings, kto_batch_loss
from distill.models import load_model, load_tokenizer
from distill.recipe import recipe_from_dict
from distill.report.html import write_report
from distill.report.table import format_table, preference_note
from distill.stages import build_preference_data, evaluate, generate, recipe_examples, train, train_stages
from distill.stages.held_out_pairs import held_out_pairs, reward_accuracy_section
from distill.stages.kto import planned_answers
from distill.stages.pairs import weights_fingerprint
from distill.teachers.backend import SamplingParams
from distill.teachers.local import generate_texts

KTO_DEMO = SHARED / "data" / "llamafactory" / "kto_en_demo.json"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def labelled_rows(n: int = 16) -> list[dict]:
    """Alternating desirable (the right sum) and undesirable (a wrong one) answers."""
    return [{"prompt": f"Question {i}: what is {i} plus {i}?",
             "completion": f"The answer is {2 * i}." if i % 2 == 0 else f"I think it is {2 * i + 1}, or maybe not.",
             "label": i % 2 == 0} for i in range(n)]


# ---------------------------------------------------------------- reading labelled answers


def test_every_labelled_layout_reads_to_the_same_example(tmp_path):
    q, a = "What is two plus two?", "Four."
    rows = [
        {"prompt": q, "completion": a, "label": False},
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}],
         "label": False},
        {"instruction": q, "input": "", "output": a, "label": False},
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "label": False},
        {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], "kto_tag": False},
    ]
    for i, row in enumerate(rows):
        (example,) = read_labelled(write_jsonl(tmp_path / f"l{i}.jsonl", [row]))
        assert (example.messages, example.answer, example.desirable) == \
            ([{"role": "user", "content": q}], a, False), row
    (good,) = read_labelled(write_jsonl(tmp_path / "good.jsonl", [{**rows[0], "label": True}]))
    assert good.desirable and good.id != example.id  # the label is part of the content address


def test_llamafactory_kto_demo_reads():
    examples = read_labelled(require_shared(KTO_DEMO))
    raw = json.loads(KTO_DEMO.read_text())
    assert len(examples) == len(raw) and sum(e.desirable for e in examples) == sum(r["label"] for r in raw)
    first = raw[0]["messages"]
    assert examples[0].messages == first[:-1] and examples[0].answer == first[-1]["content"]
    multi = next(i for i, r in enumerate(raw) if len(r["messages"]) > 2)  # earlier turns stay in the prompt
    assert examples[multi].messages == raw[multi]["messages"][:-1]


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "Hi", "completion": "An answer."}, "missing 'label'"),
    ({"prompt": "Hi", "completion": "  ", "label": True}, "empty 'completion'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}], "kto_tag": False},
     "messages\\[1\\]: empty answer"),
    ({"prompt": "Hi", "completion": "An answer.", "label": "yes"}, "'label' must be true or false"),
    ({"messages": [{"role": "user", "content": "Hi"}], "label": True}, "does not end with the assistant answer"),
    ('{"prompt": "Hi", "completion": "x", ', "not valid JSON"),
])
def test_a_bad_labelled_record_is_refused_with_its_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "kto.jsonl", labelled_rows(3) + [bad])
    with pytest.raises(DistillError, match=f"kto.jsonl:4: .*{message}"):
        read_labelled(path)


# ---------------------------------------------------------------- reference log-probs


def kto_recipe(tmp_path: Path, teacher_dir: Path, student_dir: Path, data: Path, **sections) -> dict:
    raw = tiny_recipe(tmp_path / "run", teacher_dir, data, **sections)
    raw["student"] = {"model": str(student_dir)}
    raw["data"] = {"pairs": str(data), "max_length": 48, "eval_fraction": 0.2}
    raw["method"] = {"kind": "kto", "beta": 0.5, "chunk_size": 16, **sections.get("method", {})}
    raw["pairs"] = {"batch_size": 3}
    return raw


def live_log_prob(model, tokenizer, messages: list, answer: str, max_length: int = 48) -> float:
    """The summed answer log-prob from full float64 logits: the simple path the stored value must equal."""
    encoded = encode_example(Example(id="", messages=messages + [{"role": "assistant", "content": answer}]),
                             tokenizer, max_length)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([encoded.input_ids])).logits[0, :-1].double()
    labels = torch.tensor(encoded.labels[1:])
    logp = torch.log_softmax(logits, -1).gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    return float((logp * (labels != -100)).sum())


def test_stored_reference_log_probs_equal_a_live_computation_and_resume(tmp_path, tiny_teacher_dir,
                                                                        tiny_student_dir):
    data = write_jsonl(tmp_path / "kto.jsonl", labelled_rows())
    recipe = recipe_from_dict(kto_recipe(tmp_path, tiny_teacher_dir, tiny_student_dir, data))
    first = build_preference_data(recipe, progress=False, stop_after=1)  # killed after one batch
    assert first.built == 3
    stats = build_preference_data(recipe, progress=False)
    assert stats.existing == 3 and first.built + stats.built == stats.planned and 0 < stats.planned < 16
    lines = [json.loads(line) for f in sorted((recipe.run_dir / "pairs").glob("shard-*.jsonl"))
             for line in f.read_text().splitlines()]
    assert len(lines) == len({r["id"] for r in lines}) == stats.planned  # nothing lost, nothing twice
    model = load_model(str(tiny_student_dir), None, dtype=torch.float32, device=torch.device("cpu"))
    tokenizer = load_tokenizer(str(tiny_student_dir), None)
    planned = planned_answers(recipe, weights_fingerprint(model))
    records = latest_records(recipe.run_dir / "pairs")
    for index, p in enumerate(planned):
        record = records[p.id]
        assert record["kl_answer"] == planned[index - 1].answer != record["answer"]  # another example's answer
        assert record["ref_logp"] == pytest.approx(live_log_prob(model, tokenizer, p.messages, p.answer), abs=2e-4)
        assert record["ref_kl"] == pytest.approx(live_log_prob(model, tokenizer, p.messages, p.kl_answer), abs=2e-4)
    _, held_out = recipe_examples(recipe)  # eval text: held-out desirable answers only
    desirable = {f"The answer is {2 * i}." for i in range(0, 16, 2)}
    assert held_out and all(e.messages[-1]["content"] in desirable for e in held_out)


# ---------------------------------------------------------------- training


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") != "eval"]


def test_kto_trains_the_loss_falls_and_resumes_exactly(tmp_path, tiny_teacher_dir, tiny_student_dir):
    data = write_jsonl(tmp_path / "kto.jsonl", labelled_rows())
    raw = kto_recipe(tmp_path, tiny_teacher_dir, tiny_student_dir, data,
                     train={"steps": 12, "lr": 1e-2, "batch_size": 4, "checkpoint_every": 6})
    whole = recipe_from_dict(raw)
    build_preference_data(whole, progress=False)
    train(whole, progress=False)
    logged = metrics(whole.run_dir)
    assert [m["step"] for m in logged] == list(range(1, 13))
    assert {"loss", "kl", "desirable_reward", "undesirable_reward"} <= set(logged[0])
    assert all(m["kl"] >= 0 for m in logged)
    losses = [m["loss"] for m in logged]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.02
    last = [m for m in logged[-4:] if m["desirable_reward"] == m["desirable_reward"]
            and m["undesirable_reward"] == m["undesirable_reward"]]  # nan: no such answer in that step's batch
    assert last and all(m["desirable_reward"] > m["undesirable_reward"] for m in last)

    raw["output_dir"] = str(tmp_path / "killed")
    killed = recipe_from_dict(raw)
    build_preference_data(killed, progress=False)
    assert train(killed, progress=False, stop_after=6) is None
    train(killed, progress=False)
    assert [m["loss"] for m in metrics(killed.run_dir)] == pytest.approx(losses, rel=1e-6)


def test_kto_with_lora_uses_the_adapter_free_reference(tmp_path, tiny_teacher_dir, tiny_student_dir):
    data = write_jsonl(tmp_path / "kto.jsonl", labelled_rows())
    recipe = recipe_from_dict(kto_recipe(tmp_path, tiny_teacher_dir, tiny_student_dir, data,
                                         train={"steps": 2, "lr": 1e-2, "lora": {"r": 4, "alpha": 8}}))
    build_preference_data(recipe, progress=False)
    train(recipe, progress=False)
    first = metrics(recipe.run_dir)[0]
    # LoRA's B starts at zero: at step 1 the policy is the reference, so the KL estimate and every reward are 0
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)
    assert first["loss"] == pytest.approx(0.5, abs=1e-5)  # 1 - sigmoid(0) for every answer
    for key in ("desirable_reward", "undesirable_reward"):
        assert first[key] != first[key] or first[key] == pytest.approx(0.0, abs=1e-5)


def test_the_kl_reference_point_is_the_clamped_mean_log_ratio_of_the_mismatched_rows():
    torch.manual_seed(0)
    logp, ref, kl_logp, kl_ref = (torch.randn(6, dtype=torch.float64) * 3 for _ in range(4))
    desirable = torch.tensor([True, False, True, True, False, False])
    settings = KtoSettings(beta=0.3, desirable_weight=1.5, undesirable_weight=0.5)
    out = kto_batch_loss(logp, ref, desirable, kl_logp, kl_ref, settings)
    z = max(float((kl_logp - kl_ref).mean()), 0.0)
    r = logp - ref
    expected = [1.5 * (1 - torch.sigmoid(0.3 * (r[i] - z))) if desirable[i]
                else 0.5 * (1 - torch.sigmoid(0.3 * (z - r[i]))) for i in range(6)]
    assert float(out.kl) == pytest.approx(z)
    assert float(out.loss) == pytest.approx(float(sum(expected)) / (1.5 * 3 + 0.5 * 3))
    assert float(out.desirable_reward) == pytest.approx(float(0.3 * r[desirable].mean()))
    assert float(out.undesirable_reward) == pytest.approx(float(0.3 * r[~desirable].mean()))


def test_a_kto_stage_trains_from_the_stage_before(tmp_path, tiny_teacher_dir, tiny_student_dir):
    data = write_jsonl(tmp_path / "kto.jsonl", labelled_rows())
    raw = kto_recipe(tmp_path, tiny_teacher_dir, tiny_student_dir, data, train={"steps": 2})
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Q{i}?", "response": f"A{i}."} for i in range(8)])
    raw["method"] = {"kind": "sft", "chunk_size": 16}
    raw["data"] = {"train": str(sft), "max_length": 48, "eval_fraction": 0.2}
    raw["stages"] = [{"name": "sft"}, {"name": "kto", "method": {"kind": "kto", "beta": 0.5},
                                       "data": {"pairs": str(data)}}]
    recipe = recipe_from_dict(raw)
    train_stages(recipe, progress=False)
    stage_dir = recipe.run_dir / "stages" / "kto"
    records = latest_records(stage_dir / "pairs")
    sft_student = load_model(str(recipe.run_dir / "stages" / "sft" / "student"), None, dtype=torch.float32,
                             device=torch.device("cpu"))
    assert {r["reference"] for r in records.values()} == {weights_fingerprint(sft_student)}
    assert [m["step"] for m in metrics(stage_dir)] == [1, 2] and "kl" in metrics(stage_dir)[0]
    assert (recipe.run_dir / "student" / "config.json").is_file()


# ---------------------------------------------------------------- bad input at the command line


def run_cli(tmp_path: Path, raw: dict, command: str, capsys) -> tuple[int, str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main([command, str(path), "--no-progress"])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("change, message", [
    (lambda raw, sft: raw["data"].pop("pairs") and raw["data"].update(train=sft),
     "method.kind: kto needs labelled answers"),
    (lambda raw, sft: raw["pairs"].update(source="teacher_vs_student"), "method.kind: kto needs labelled answers"),
    (lambda raw, sft: raw["method"].update(desirable_weight=0), "method.desirable_weight: Input should be greater"),
    (lambda raw, sft: raw["train"].update(packing=True), "labelled answers are not packed"),
])
def test_bad_kto_recipes_are_one_line_and_exit_2_before_writing(tmp_path, tiny_teacher_dir, tiny_student_dir,
                                                                capsys, change, message):
    data = write_jsonl(tmp_path / "kto.jsonl", labelled_rows())
    raw = kto_recipe(tmp_path, tiny_teacher_dir, tiny_student_dir, data)
    change(raw, str(write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}])))
    code, err = run_cli(tmp_path, raw, "pairs", capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "x", "completion": "y"}, "missing 'label'"),
    ({"prompt": "x", "completion": "", "label": True}, "empty 'completion'"),
])
def test_a_bad_labelled_file_stops_the_pairs_command_with_file_and_line(tmp_path, tiny_teacher_dir,
                                                                        tiny_student_dir, capsys, bad, message):
    data = write_jsonl(tmp_path / "kto.jsonl", labelled_rows(5) + [bad] + labelled_rows(2))
    raw = kto_recipe(tmp_path, tiny_teacher_dir, tiny_student_dir, data)
    code, err = run_cli(tmp_path, raw, "pairs", capsys)
    assert code == 2 and f"{data}:6: {message}" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "pairs").exists()


# ---------------------------------------------------------------- reward accuracy on held-out pairs (dpo eval)


def pair_rows(n: int) -> list[dict]:
    return [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"The answer is {2 * i}.",
             "rejected": f"I think it is {2 * i + 1}, or maybe not."} for i in range(n)]


def test_reward_accuracy_on_held_out_pairs_equals_a_direct_computation(tmp_path, tiny_teacher_dir, tiny_student_dir):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(30))
    raw = kto_recipe(tmp_path, tiny_teacher_dir, tiny_student_dir, pairs, method={"kind": "dpo", "beta": 0.5},
                     train={"steps": 4, "lr": 1e-2, "batch_size": 4})
    raw["data"]["eval_fraction"] = 0.3
    raw["eval"].update(measure_speed=False, general_text=False)
    recipe = recipe_from_dict(raw)
    build_preference_data(recipe, progress=False)
    train(recipe, progress=False)
    report = evaluate(recipe, progress=False)

    _, held_out = recipe_examples(recipe)
    wanted = {e.id for e in held_out}
    held = [p for p in read_pairs(pairs) if p.id in wanted]
    policy = load_model(str(recipe.run_dir / "student"), None, dtype=torch.float32, device=torch.device("cpu"))
    reference = load_model(str(tiny_student_dir), None, dtype=torch.float32, device=torch.device("cpu"))
    tokenizer = load_tokenizer(str(tiny_student_dir), None)

    def reward(p, answer: str) -> float:
        return 0.5 * (live_log_prob(policy, tokenizer, p.messages, answer)
                      - live_log_prob(reference, tokenizer, p.messages, answer))

    margins = [reward(p, p.chosen) - reward(p, p.rejected) for p in held]
    section = report["preference"]
    assert section["pairs"] == len(held) >= 3 and section["beta"] == 0.5
    assert section["reward_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(held))
    assert section["reward_margin"] == pytest.approx(sum(margins) / len(held), abs=1e-3)
    assert report["student"]["reward_accuracy"] == section["reward_accuracy"]
    assert "reward accuracy, held-out pairs" in format_table(report)
    assert "reward accuracy, held-out pairs" in write_report(recipe.run_dir).read_text()  # the HTML report's table
    saved = json.loads((recipe.run_dir / "report.json").read_text())
    assert saved["preference"]["reward_margin"] == pytest.approx(section["reward_margin"])
    # what it trained on: every training pair of the file built (none dropped), said in the table and the HTML
    assert section["source"] == "file" and section["training_pairs"] == {"built": 30 - len(held), "dropped": {}}
    note = f"preference pairs (file): {30 - len(held)} built; reward accuracy on {len(held)} held-out pairs"
    assert note in format_table(report) and note in write_report(recipe.run_dir).read_text()


def test_teacher_vs_student_held_out_pairs_reject_the_references_greedy_answer(tmp_path):
    model_dir = require_shared(STORIES260K)  # a real (tiny) model writes real answers; random ones write blanks
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about {w}."} for w in
                                                       ("the sea", "the sky", "a fox", "a robot", "Paris", "fruit",
                                                        "a poem", "a cat", "the moon", "a tree")])
    raw = kto_recipe(tmp_path, model_dir, model_dir, prompts, method={"kind": "dpo"}, train={"steps": 2})
    raw["data"] = {"prompts": str(prompts), "max_length": 64, "eval_fraction": 0.3}
    raw["generate"] = {"max_new_tokens": 8, "batch_size": 4, "temperature": 1.0}  # sampled: unlike greedy
    raw["pairs"] = {"source": "teacher_vs_student", "max_new_tokens": 8, "batch_size": 4}
    recipe = recipe_from_dict(raw)
    generate(recipe, progress=False)
    build_preference_data(recipe, progress=False)
    train(recipe, progress=False)
    model = load_model(str(model_dir), None, dtype=torch.float32, device=torch.device("cpu"))
    tokenizer = load_tokenizer(str(model_dir), None)
    pairs = held_out_pairs(recipe, model, tokenizer)
    _, held_out = recipe_examples(recipe)
    greedy = generate_texts(model, tokenizer, [e.messages[:-1] for e in held_out],
                            params=SamplingParams(max_new_tokens=8, temperature=0.0))
    expected = [(e.messages[:-1], e.messages[-1]["content"], a.text) for e, a in zip(held_out, greedy)
                if a.text.strip() and a.text.strip() != e.messages[-1]["content"].strip()]
    assert pairs == expected and pairs
    section = reward_accuracy_section(recipe)
    assert section["pairs"] == len(pairs) and section["source"] == "teacher_vs_student"
    assert 0.0 <= section["reward_accuracy"] <= 1.0


def test_preference_note_says_what_was_dropped_and_filtered():
    report = {"preference": {"source": "judged", "training_pairs": {"built": 5, "dropped": {"tie": 2,
                                                                                        "unparseable": 1},
                                                                     "after_filter": 4}}}
    assert preference_note(report) == ("preference pairs (judged): 5 built; dropped: tie 2, unparseable 1; "
                                       "4 after the filter; no held-out pair")
    assert preference_note({}) == "" and "preference pairs" not in format_table({"teacher": {}, "student": {}})
