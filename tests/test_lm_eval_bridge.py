"""distill.eval.lm_eval_bridge: the --lm-eval spec string, local JSONL tasks, and lm-eval's scores checked by hand."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.errors import DistillError
from distill.eval.lm_eval_bridge import (
    INSTALL_HINT,
    LmEvalTask,
    _load_named,
    local_task_config,
    parse_task_specs,
    run_lm_eval,
)


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_teacher_dir):
    """The fixture's random Llama (fp32, CPU) and its tokenizer (which adds no BOS token)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_teacher_dir)


@torch.inference_mode()
def _token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, from one plain forward pass."""
    logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def _choice_loglikelihood(model, tokenizer, question: str, choice: str) -> float:
    """lm-eval's multiple-choice score: the pair tokenised together, summed over the tokens after the question."""
    whole = tokenizer(question + " " + choice)["input_ids"]
    context = tokenizer(question)["input_ids"]
    assert whole[:len(context)] == context  # the question tokenises the same alone and in the pair
    return _token_logprobs(model, whole)[len(context) - 1:].sum().item()


# ---------------------------------------------------------------- the spec string


def test_parse_task_specs_mixes_names_and_local_files(tmp_path):
    facts = _jsonl(tmp_path / "facts.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    tasks = parse_task_specs(f"hellaswag, arc_*,facts={facts}:multiple_choice")
    assert tasks == [LmEvalTask("hellaswag"), LmEvalTask("arc_*"), LmEvalTask("facts", facts, "multiple_choice")]
    assert [t.is_local for t in tasks] == [False, False, True]


def test_parse_task_specs_keeps_a_colon_inside_the_path(tmp_path):
    odd = _jsonl(tmp_path / "a:b.jsonl", [{"text": "hello"}])
    assert parse_task_specs(f"story={odd}:perplexity") == [LmEvalTask("story", odd, "perplexity")]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty list"),
        ("hellaswag,,arc_easy", "empty task between commas"),
        ("facts={file}", "missing :KIND"),
        ("facts={file}:mc", "kind 'mc' is not one of multiple_choice, generate, perplexity"),
        ("facts=:generate", "missing the path"),
        ("facts={missing}:generate", "file not found"),
        ("bad name={file}:generate", "is not a task name"),
        ("hella swag", "not a task name"),
        ("facts={file}:generate,facts={file}:perplexity", "task name repeated: facts"),
    ],
)
def test_bad_specs_are_one_line_errors(tmp_path, spec, message):
    file = _jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(DistillError, match=re.escape(message)) as err:
        parse_task_specs(spec.format(file=file, missing=tmp_path / "nope.jsonl"))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- local task files


def test_local_task_config_normalises_records(tmp_path):
    rows = [
        {"prompt": "Sky?", "choices": ["blue", "green"], "answer": "B"},  # `prompt` as in distill's suites
        {"question": "Grass?", "choices": ["blue", "green"], "answer": "green"},
        {"question": "Sea?", "choices": ["blue", "green"], "answer": 0},
    ]
    config = local_task_config("colours", _jsonl(tmp_path / "c.jsonl", rows), "multiple_choice", work_dir=tmp_path)
    assert config["task"] == "colours" and config["output_type"] == "multiple_choice"
    written = [json.loads(line) for line in Path(config["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()]
    assert [r["answer"] for r in written] == [1, 1, 0]
    assert [r["question"] for r in written] == ["Sky?", "Grass?", "Sea?"]


def test_local_task_config_takes_other_field_names(tmp_path):
    path = _jsonl(tmp_path / "g.jsonl", [{"q": "2+2?", "a": 4}])
    config = local_task_config("sums", path, "generate", {"question": "q", "answer": "a"}, work_dir=tmp_path)
    written = json.loads(Path(config["dataset_kwargs"]["data_files"]["test"]).read_text())
    assert written == {"question": "2+2?", "answer": "4"}


@pytest.mark.parametrize(
    ("kind", "row", "message"),
    [
        ("multiple_choice", {"question": "q", "choices": ["a"], "answer": 0}, ":2: 'choices' must be a list of at least two"),
        ("multiple_choice", {"question": "q", "choices": ["a", "b"], "answer": 5}, ":2: 'answer' must be a choice's index"),
        ("generate", {"question": "q"}, ":2: missing key 'answer'"),
        ("perplexity", {"words": "x"}, ":2: missing key 'text'"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, kind, row, message):
    good = {"question": "q", "choices": ["a", "b"], "answer": 0, "text": "t"}
    path = _jsonl(tmp_path / "t.jsonl", [good, row])
    with pytest.raises(DistillError, match=re.escape(f"t.jsonl{message}")):
        local_task_config("t", path, kind, work_dir=tmp_path)


def test_empty_task_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DistillError, match="no records"):
        local_task_config("e", path, "perplexity", work_dir=tmp_path)


@pytest.mark.parametrize(("module", "message"), [
    ("lm_eval", "lm-evaluation-harness is not installed: "),
    ("lm_eval.evaluator", "not installed completely (its dependency 'lm_eval.evaluator' is missing): "),
])
def test_missing_lm_eval_names_the_extra(monkeypatch, tmp_path, module, message):
    if module != "lm_eval":
        pytest.importorskip("lm_eval")  # a partial install can only be faked where lm_eval itself is there
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules: importing it fails as if absent
    with pytest.raises(DistillError, match=re.escape(message + INSTALL_HINT)):
        run_lm_eval(None, None, [f"t={_jsonl(tmp_path / 't.jsonl', [{'text': 'x'}])}:perplexity"])


# ---------------------------------------------------------------- lm-eval's scores, checked by hand


def test_multiple_choice_accuracy_matches_hand_loglikelihoods(tiny, tmp_path):
    pytest.importorskip("lm_eval")
    model, tokenizer = tiny
    items = [
        ("The quick brown fox jumps over the", ["lazy dog.", "sea", "capital of France and Germany"]),
        ("Paris is the capital of", ["France.", "Germany.", "the sky"]),
        ("Two plus two is", ["four", "nine, and three", "blue"]),
        ("List three fruits:", ["apple, banana, cherry.", "robot"]),
        ("Once upon a time there was a little", ["robot", "poem about the sea", "fox"]),
    ]
    rows, correct, correct_norm = [], 0, 0
    for number, (question, choices) in enumerate(items):
        scores = [_choice_loglikelihood(model, tokenizer, question, c) for c in choices]
        best = max(range(len(choices)), key=scores.__getitem__)
        worst = min(range(len(choices)), key=scores.__getitem__)
        answer = best if number < 3 else worst  # 3 of 5 right, whatever the random weights prefer
        best_norm = max(range(len(choices)), key=lambda i: scores[i] / len(choices[i]))
        correct += best == answer
        correct_norm += best_norm == answer
        rows.append({"question": question, "choices": choices, "answer": choices[answer]})
    path = _jsonl(tmp_path / "mc.jsonl", rows)

    results = run_lm_eval(model, tokenizer, [LmEvalTask("mc", path, "multiple_choice")], batch_size=4)

    assert results["mc"]["n"] == 5
    assert correct == 3
    assert results["mc"]["acc"] == pytest.approx(correct / 5)
    assert results["mc"]["acc_norm"] == pytest.approx(correct_norm / 5)
    assert results["mc"]["acc_stderr"] > 0


def test_perplexity_matches_hand_computation(tiny, tmp_path):
    pytest.importorskip("lm_eval")
    model, tokenizer = tiny
    texts = ["The quick brown fox jumps over the lazy dog.", "Two plus two is four, and three times three is nine."]
    path = _jsonl(tmp_path / "ppl.jsonl", [{"text": t} for t in texts])
    # lm-eval scores every token of a text, the first one after the BOS token.
    loglikelihood = sum(
        _token_logprobs(model, [tokenizer.bos_token_id] + tokenizer(t)["input_ids"]).sum().item() for t in texts
    )
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    text_bytes = sum(len(t.encode()) for t in texts)

    results = run_lm_eval(model, tokenizer, [f"ppl={path}:perplexity"], batch_size=2)["ppl"]

    assert math.isfinite(results["word_perplexity"]) and results["word_perplexity"] > 1
    assert results["word_perplexity"] == pytest.approx(math.exp(-loglikelihood / words), rel=1e-4)
    assert results["byte_perplexity"] == pytest.approx(math.exp(-loglikelihood / text_bytes), rel=1e-4)
    assert results["bits_per_byte"] == pytest.approx(-loglikelihood / text_bytes / math.log(2), rel=1e-4)


def test_generate_exact_match_matches_greedy_answers(tiny, tmp_path):
    pytest.importorskip("lm_eval")
    model, tokenizer = tiny
    questions = ["Paris is the capital of", "Two plus two is", "The quick brown fox"]
    answers = []
    for question in questions:
        ids = tokenizer(question, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:])
        answers.append(text.split("\n")[0].split(tokenizer.eos_token)[0].strip())
    answers[2] = "certainly not " + answers[2]  # two of three right
    path = _jsonl(tmp_path / "gen.jsonl", [{"question": q, "answer": a} for q, a in zip(questions, answers)])

    results = run_lm_eval(model, tokenizer, [f"gen={path}:generate"], batch_size=1)["gen"]

    assert results["exact_match"] == pytest.approx(2 / 3)


def test_limit_and_fewshot_run(tiny, tmp_path):
    pytest.importorskip("lm_eval")
    model, tokenizer = tiny
    rows = [{"question": f"Item {i} is", "choices": ["apple", "robot"], "answer": i % 2} for i in range(6)]
    path = _jsonl(tmp_path / "mc.jsonl", rows)
    results = run_lm_eval(model, tokenizer, [f"mc={path}:multiple_choice"], limit=4, num_fewshot=2)
    assert results["mc"]["n"] == 4
    assert 0 <= results["mc"]["acc"] <= 1


def test_run_leaves_the_tokenizer_alone(tiny, tiny_teacher_dir, tmp_path):
    pytest.importorskip("lm_eval")
    model, _ = tiny
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    tokenizer.pad_token = None  # lm-eval would set one on the tokenizer it is given
    run_lm_eval(model, tokenizer, [f"p={_jsonl(tmp_path / 'p.jsonl', [{'text': 'Two plus two.'}])}:perplexity"])
    assert tokenizer.pad_token is None


# ---------------------------------------------------------------- lm-eval's own tasks, offline


@pytest.fixture()
def hub_only_task_manager(tmp_path, monkeypatch):
    """A task manager that knows one task whose dataset lives on the Hub, with the Hub switched off."""
    pytest.importorskip("lm_eval")
    import datasets.config
    import huggingface_hub.constants
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "hub.yaml").write_text(
        "task: hub_task\ndataset_path: distill-tests/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: question\ndoc_to_choice: choices\ndoc_to_target: answer\n"
    )
    return TaskManager(include_path=str(tmp_path), include_defaults=False)


def test_hub_task_offline_says_how_to_use_a_local_file(hub_only_task_manager):
    with pytest.raises(DistillError, match="need network access.*NAME=PATH.jsonl:KIND") as err:
        _load_named(["hub_task"], hub_only_task_manager)
    assert "\n" not in str(err.value)


def test_unknown_task_name_is_an_error(hub_only_task_manager):
    with pytest.raises(DistillError, match="'nope': not an lm-eval task"):
        _load_named(["nope"], hub_only_task_manager)
