"""distill.eval.scorers and distill.eval.suites: answer extraction, choice log-likelihoods, suite files, running."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import STORIES260K, require_shared
from distill.answers import extract_answer, normalize_number
from distill.data.layouts import Example
from distill.data.tokenize import encode_example
from distill.errors import DistillError
from distill.eval import suites
from distill.eval.metrics import rouge_l
from distill.eval.scorers import choice_logprobs, choice_token_ids, exact_match, mc_accuracy
from distill.eval.suites import load_suite, run_suite, shipped_suites
from distill.teachers.backend import Completion
from distill.teachers.local import prompt_ids

# ---------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("text", "pattern", "expected"),
    [
        ("48 / 2 = 24 in May.\n48 + 24 = 72 in all.\n#### 72", "gsm8k", "72"),
        ("#### 7\nThen 9 more.", "gsm8k", "7"),  # the marked answer beats a later number
        ("So the total is 1,234.\n#### 1,234", "gsm8k", "1234"),
        ("She pays $5.00 in total.", "gsm8k", "5"),  # no marker: the last number
        ("#### $10.50", "gsm8k", "10.5"),
        ("It fell to -3 degrees.", "gsm8k", "-3"),
        ("3 apples and 4.50 pears", "last_number", "4.5"),
        ("values 1, 2, 3", "last_number", "3"),  # commas in a list are not thousands separators
        ("#### 12\nanswer 13", "last_number", "13"),
        ("no numbers here", "gsm8k", None),
        ("\n  Paris is the capital.\nRome", "first_line", "Paris is the capital."),
        ("   ", "first_line", None),
    ],
)
def test_extract_answer(text, pattern, expected):
    assert extract_answer(text, pattern) == expected


def test_extract_answer_rejects_an_unknown_pattern():
    with pytest.raises(ValueError, match="unknown answer pattern"):
        extract_answer("1", "regex")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("72", "72"), ("72.0", "72"), ("$1,000", "1000"), ("0.50", "0.5"), ("100", "100"), ("-0.0", "0"),
     ("5.", "5"), ("abc", None), ("nan", None)],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "same"),
    [("72", "72.0", True), ("1,000", "1000", True), ("Paris.", "  paris", True), ("New  York", "new york", True),
     ("7", "8", False), ("Paris", "Rome", False), (None, "1", False), ("1", None, False)],
)
def test_exact_match(prediction, reference, same):
    assert exact_match(prediction, reference) is same


def test_mc_accuracy_hand_computed():
    # the third row is a tie: the first choice wins it, which is wrong
    assert mc_accuracy([[0.0, 1.0], [2.0, 1.0], [1.0, 1.0]], [1, 0, 1]) == pytest.approx(2 / 3)
    assert mc_accuracy([], []) is None
    with pytest.raises(ValueError, match="2 score rows but 1 answers"):
        mc_accuracy([[0.0], [1.0]], [0])


# ---------------------------------------------------------------- choice log-likelihoods


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def model(tiny_teacher_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()


@pytest.fixture()
def plain_tokenizer(tiny_tokenizer_dir):
    """The fixture tokenizer without its chat template: prompts use the plain User:/Assistant: format."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = None
    return tok


def reference_logprob(model, prompt: list[int], choice: list[int]) -> float:
    """log p(choice | prompt) from one unpadded forward pass in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + choice])).logits[0].double()
    logp = F.log_softmax(logits[len(prompt) - 1: -1], dim=-1)
    return float(logp[torch.arange(len(choice)), torch.tensor(choice)].sum())


def test_text_prompt_and_choice_tokenise_like_the_whole_text(tokenizer):
    head, choice = choice_token_ids(tokenizer, "The cat sat on the ", "mat.")
    assert head + choice == tokenizer("The cat sat on the mat.")["input_ids"]
    assert tokenizer.decode(choice).startswith(" mat")  # the prompt's trailing space moved into the choice


def test_chat_choices_are_what_training_would_label(tokenizer):
    messages = [{"role": "user", "content": "Name a fruit."}]
    head, choice = choice_token_ids(tokenizer, messages, "An apple.")
    assert head == prompt_ids(tokenizer, messages)
    trained = encode_example(Example("x", messages=[*messages, {"role": "assistant", "content": "An apple."}]),
                             tokenizer, 256)
    assert trained.input_ids[: len(head) + len(choice)] == head + choice
    assert trained.labels[len(head): len(head) + len(choice)] == choice


def test_plain_format_choices_are_what_training_would_label(plain_tokenizer):
    messages = [{"role": "user", "content": "Name a fruit."}]
    head, choice = choice_token_ids(plain_tokenizer, messages, "An apple.")
    trained = encode_example(Example("x", messages=[*messages, {"role": "assistant", "content": "An apple."}]),
                             plain_tokenizer, 256)
    # training appends eos after a plain-format answer; the choice is scored without it
    end = len(head) + len(choice)
    assert trained.input_ids[: end + 1] == head + choice + [plain_tokenizer.eos_token_id]
    assert trained.labels[len(head): end] == choice


@pytest.mark.parametrize("prompt", ["Two plus two is", [{"role": "user", "content": "What is two plus two?"}]])
def test_choice_logprobs_match_unbatched_forward_passes(model, tokenizer, prompt):
    choices = [" four", " four hundred and two", " nine, and three times three"]
    scores = choice_logprobs(model, tokenizer, prompt, choices, batch_size=2)  # padding and two batches
    expected = [reference_logprob(model, *choice_token_ids(tokenizer, prompt, c)) for c in choices]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert all(s < 0 for s in scores)
    normalized = choice_logprobs(model, tokenizer, prompt, choices, length_normalized=True)
    assert normalized == pytest.approx([s / len(c) for s, c in zip(expected, choices)], abs=1e-4)


def test_choice_logprobs_need_a_prompt_token(model, tokenizer):
    with pytest.raises(ValueError, match="no tokens to predict"):
        choice_logprobs(model, tokenizer, "", ["a", "b"])


def test_stories260k_prefers_the_sensible_continuation():
    path = require_shared(STORIES260K)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    scores = choice_logprobs(model, tokenizer, "Once upon a time, there was a little girl named Lily. She liked to",
                             [" play with her toys.", " seven quantum bureaucracy xylophone."])
    assert scores[0] > scores[1]


# ---------------------------------------------------------------- suite files


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_suite(tmp_path: Path, tasks: list[dict], name: str = "mine", **extra) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(json.dumps({"name": name, "tasks": tasks, **extra}))  # JSON is YAML
    return path


@pytest.fixture()
def qa_file(tmp_path) -> Path:
    rows = [{"q": "What is 2 + 3?", "a": "2 + 3 = 5\n#### 5"}, {"q": "What is 10 - 4?", "a": 6},
            {"q": "What is 3 * 3?", "a": "#### 9"}]
    return write_jsonl(tmp_path / "qa.jsonl", rows)


def test_shipped_suites_load():
    assert {"arithmetic", "basic", "everyday", "instructions"} <= set(shipped_suites())
    for name in shipped_suites():
        suite = load_suite(name)
        assert suite.name == name and suite.tasks and all(t.items for t in suite.tasks)
    basic = load_suite("basic")
    assert {t.spec.kind for t in basic.tasks} == {"generate", "multiple_choice", "rouge", "perplexity"}
    problems = next(t for t in basic.tasks if t.spec.name == "word_problems")
    assert all(item.reference.lstrip("-").isdigit() for item in problems.items)  # "#### N" became N


def test_load_suite_reads_fields_limits_and_answers(tmp_path, qa_file):
    write_jsonl(tmp_path / "mc.jsonl", [
        {"question": "Sky?", "options": ["blue", "green"], "answer": "B"},
        {"question": "Grass?", "options": ["blue", "green"], "answer": "green"},
        {"question": "Sea?", "options": ["blue", "green"], "answer": 0},
    ])
    path = write_suite(tmp_path, [
        {"name": "qa", "file": "qa.jsonl", "kind": "generate", "fields": {"prompt": "q", "answer": "a"}, "limit": 2},
        {"name": "mc", "file": "mc.jsonl", "kind": "multiple_choice",
         "fields": {"prompt": "question", "choices": "options"}},
    ])
    qa, mc = load_suite(path).tasks
    assert [(i.prompt, i.reference) for i in qa.items] == [("What is 2 + 3?", "5"), ("What is 10 - 4?", "6")]
    assert qa.spec.metric == "exact_match" and qa.items[0].where == f"{qa_file}:1"
    assert [i.answer_index for i in mc.items] == [1, 1, 0]
    assert mc.items[1].reference == "green" and mc.spec.metric == "accuracy"


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ([{"name": "t", "file": "qa.jsonl", "kind": "generate", "colour": "red"}],
         r"tasks\.0\.colour \(task 't'\): unknown key"),
        ([{"name": "t", "file": "nope.jsonl", "kind": "generate"}], r"tasks\.0\.file \(task 't'\): file not found"),
        ([{"name": "t", "file": "qa.jsonl", "kind": "generate", "scorer": "bleu"}],
         r"tasks\.0\.scorer.*'bleu' is not one of"),
        ([{"name": "t", "file": "qa.jsonl", "kind": "essay"}], r"tasks\.0\.kind.*'essay' is not one of"),
        ([{"name": "t", "file": "qa.jsonl", "kind": "multiple_choice", "scorer": "rouge_l"}],
         r"tasks\.0 \(task 't'\): scorer 'rouge_l' does not apply to kind 'multiple_choice'"),
        ([{"name": "t", "file": "qa.jsonl", "kind": "generate", "prompt_format": "text"}], "multiple_choice only"),
        ([{"name": "t", "file": "qa.jsonl"}], r"tasks\.0\.kind.*missing required key"),
        ([{"name": "t", "file": "qa.jsonl", "kind": "rouge"}] * 2, "task names must be unique; repeated: t"),
        ([], r"tasks: List should have at least 1 item"),
    ],
)
def test_bad_suites_name_the_file_and_the_key(tmp_path, qa_file, tasks, message):
    path = write_suite(tmp_path, tasks)
    with pytest.raises(DistillError, match=message) as err:
        load_suite(path)
    assert str(err.value).startswith(f"{path}: ")
    assert "\n" not in str(err.value)


def test_unknown_top_level_key_and_unknown_suite(tmp_path, qa_file):
    with pytest.raises(DistillError, match=r"suite.yaml: version: unknown key"):
        load_suite(write_suite(tmp_path, [{"name": "t", "file": "qa.jsonl", "kind": "rouge"}], version=2))
    with pytest.raises(DistillError, match="suite file not found.*shipped suites: arithmetic"):
        load_suite(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(DistillError, match="broken.yaml: not valid YAML"):
        load_suite(tmp_path / "broken.yaml")


@pytest.mark.parametrize(
    ("rows", "task", "message"),
    [
        ([{"q": "hi"}], {"fields": {"prompt": "q"}}, r"data.jsonl:1: missing key 'answer'"),
        ([{"prompt": "a", "answer": "1"}, "not an object"], {}, r"data.jsonl:2: expected a JSON object"),
        ([{"prompt": "How many?", "answer": "many"}], {}, r"data.jsonl:1: no answer in 'answer' for extract: gsm8k"),
        ([{"prompt": "Pick", "choices": ["x"], "answer": 0}], {"kind": "multiple_choice"}, "at least two"),
        ([{"prompt": "Pick", "choices": ["x", "y"], "answer": "C"}], {"kind": "multiple_choice"},
         r"data.jsonl:1: 'answer' must be a choice's index"),
        ([], {}, "no items"),
    ],
)
def test_bad_items_name_the_line_and_the_key(tmp_path, rows, task, message):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_suite(tmp_path, [{"name": "t", "file": "data.jsonl", "kind": "generate", **task}])
    with pytest.raises(DistillError, match=message):
        load_suite(path)


def test_a_broken_json_line_is_named(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"prompt": "a", "answer": "1"}\n{"prompt": \n')
    with pytest.raises(DistillError, match=r"data.jsonl:2: not valid JSON"):
        load_suite(write_suite(tmp_path, [{"name": "t", "file": "data.jsonl", "kind": "generate"}]))


# ---------------------------------------------------------------- running suites


def scripted_generation(answers: dict[str, str]):
    """A stand-in for generate_texts that answers each prompt from a table."""
    def generate(model, tokenizer, conversations, *, max_new_tokens):
        return [Completion(answers[c[-1]["content"]], "stop", prompt_tokens=5, new_tokens=3) for c in conversations]
    return generate


def test_generate_tasks_score_exact_match_and_rouge(tmp_path, qa_file, monkeypatch, model, tokenizer):
    write_jsonl(tmp_path / "ins.jsonl", [{"prompt": "Say hi.", "answer": "Hello there, friend."}])
    path = write_suite(tmp_path, [
        {"name": "qa", "file": "qa.jsonl", "kind": "generate", "fields": {"prompt": "q", "answer": "a"}},
        {"name": "ins", "file": "ins.jsonl", "kind": "rouge"},
    ])
    monkeypatch.setattr(suites, "generate_texts", scripted_generation({
        "What is 2 + 3?": "2 + 3 = 5.\n#### 5", "What is 10 - 4?": "It is 7.", "What is 3 * 3?": "9.0",
        "Say hi.": "Hello, friend.",
    }))
    result = run_suite(load_suite(path), model, tokenizer, batch_size=2)
    qa = result["tasks"]["qa"]
    assert [(r["extracted"], r["reference"], r["correct"]) for r in qa["items"]] == [
        ("5", "5", True), ("7", "6", False), ("9", "9", True)]
    assert qa["score"] == pytest.approx(2 / 3) and qa["n"] == 3 and qa["metric"] == "exact_match"
    assert qa["items"][1]["prediction"] == "It is 7." and qa["items"][1]["prompt"] == "What is 10 - 4?"
    ins = result["tasks"]["ins"]
    assert ins["score"] == pytest.approx(rouge_l("Hello, friend.", "Hello there, friend."))
    assert ins["metric"] == "rouge_l"
    assert ins["items"][0]["correct"] is None
    assert result["scores"] == {"qa": qa["score"], "ins": ins["score"]}


def test_the_basic_suite_runs_on_a_tiny_model(tiny_student_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_student_dir)
    suite = load_suite("basic")
    for task in suite.tasks:
        task.items, task.spec.max_new_tokens = task.items[:3], 8
    result = run_suite(suite, model, tokenizer, batch_size=2)
    assert set(result["scores"]) == {"word_problems", "everyday_mc", "instructions_rouge", "stories_perplexity"}
    for name, task in result["tasks"].items():
        assert task["n"] == 3
        if task["kind"] == "perplexity":
            assert task["items"] == [] and task["tokens"] > 0
            assert task["score"] == pytest.approx(math.exp(task["nll"]))
            continue
        assert 0.0 <= task["score"] <= 1.0
        assert task["score"] == pytest.approx(sum(r["score"] for r in task["items"]) / 3)
        assert all({"prompt", "prediction", "reference", "correct"} <= set(r) for r in task["items"])
    mc = result["tasks"]["everyday_mc"]
    for row in mc["items"]:
        assert row["prediction"] == row["choices"][max(range(4), key=row["logprobs"].__getitem__)]
        assert row["correct"] == (row["prediction"] == row["reference"])
        assert 0.25 <= row["confidence"] <= 1.0  # the chosen one of four choices has at least a quarter
    assert 0.0 <= mc["accuracy_norm"] <= 1.0 and 0.0 <= mc["ece"] <= 1.0


def test_stories260k_multiple_choice_as_text(tmp_path):
    path = require_shared(STORIES260K)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    write_jsonl(tmp_path / "mc.jsonl", [
        {"prompt": "Once upon a time, there was a little girl named Lily. She liked to",
         "choices": [" seven quantum bureaucracy xylophone.", " play with her toys."], "answer": 1},
        {"prompt": "Tom saw a big dog in the park. The dog was",
         "choices": [" very happy and wagged its tail.", " a prime number of invoices."], "answer": 0},
        {"prompt": "Mom said, \"It is time to go to",
         "choices": [" bed,\" and Lily went to sleep.", " amortized logarithmic heaps.\""], "answer": 0},
    ])
    suite = load_suite(write_suite(tmp_path, [{"name": "mc", "file": "mc.jsonl", "kind": "multiple_choice",
                                               "prompt_format": "text"}]))
    result = run_suite(suite, model, tokenizer)
    assert result["scores"]["mc"] == 1.0
    assert all(r["correct"] for r in result["tasks"]["mc"]["items"])
