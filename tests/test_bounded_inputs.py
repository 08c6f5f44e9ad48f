"""Inputs are bounded before they cost anything: prompts by the teacher's context, training lines by max_length."""
from __future__ import annotations

import json

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.cli import main
from distill.data.examples import Example, Prompt
from distill.data.tokenize import MAX_CHARS_PER_TOKEN, encode_example, example_token_ids
from distill.errors import DistillError
from distill.teachers.backend import Completion, SamplingParams
from distill.teachers.local import LocalBackend, count_prompt_tokens, prompt_ids
from distill.data.teacher_records import latest_records
from distill.teachers.generate import generate_responses, plan_requests, prompt_limit

CONTEXT = 256  # the fixture teacher's max_position_embeddings


class RecordingTokenizer:
    """A tokenizer that remembers the longest text it was given (to tokenise or to render with its template)."""

    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def __call__(self, text, **options):
        self.longest = max(self.longest, len(text))
        return self.inner(text, **options)

    def apply_chat_template(self, messages, **options):
        self.longest = max(self.longest, sum(len(m["content"]) for m in messages))
        return self.inner.apply_chat_template(messages, **options)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class ByWords:
    """A teacher whose prompt tokens are its words, recording the batches it is given; answers echo the prompt."""

    name, batch_size, context_length = "by-words", 2, 64

    def __init__(self):
        self.batches: list[list[str]] = []

    def prompt_tokens(self, conversation, at_most=None):
        return len(conversation[-1]["content"].split())

    def generate(self, conversations, params):
        self.batches.append([c[-1]["content"] for c in conversations])
        return [Completion(text=c[-1]["content"][:5], finish_reason="stop", prompt_tokens=1, new_tokens=1)
                for c in conversations]


@pytest.fixture(scope="module")
def backend(tiny_teacher_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    return LocalBackend(model, AutoTokenizer.from_pretrained(tiny_teacher_dir), name="tiny", batch_size=4)


def _prompts(long_words: int) -> list[Prompt]:
    short = [Prompt(id=f"p{i}", messages=[{"role": "user", "content": f"Question {i}?"}]) for i in range(3)]
    long = Prompt(id="long", messages=[{"role": "user", "content": "the quick brown fox " * long_words}])
    return short[:2] + [long] + short[2:]


# ---------------------------------------------------------------- prompts and the teacher's context


def test_prompt_limit_is_the_context_less_the_answer_unless_given():
    assert prompt_limit(SamplingParams(max_new_tokens=56), CONTEXT)[0] == 200
    assert prompt_limit(SamplingParams(max_new_tokens=56, max_prompt_tokens=30), CONTEXT)[0] == 30
    assert prompt_limit(SamplingParams(max_new_tokens=56), None)[0] is None  # a served teacher: unknown
    assert prompt_limit(SamplingParams(max_new_tokens=56, max_prompt_tokens=30), None)[0] == 30
    with pytest.raises(DistillError, match="generate.max_new_tokens=256 leaves no room for a prompt"):
        prompt_limit(SamplingParams(max_new_tokens=256), CONTEXT)


def test_the_prompt_limit_is_not_part_of_an_answers_address():
    assert SamplingParams(max_prompt_tokens=12).identity() == SamplingParams().identity()


def test_local_backend_knows_its_context_and_counts_prompts(backend):
    conversation = [{"role": "user", "content": "Paris is the capital of France."}]
    assert backend.context_length == CONTEXT
    exact = len(prompt_ids(backend.tokenizer, conversation))
    assert backend.prompt_tokens(conversation) == exact
    assert backend.prompt_tokens(conversation, at_most=exact) == exact
    assert backend.prompt_tokens(conversation, at_most=exact - 3) == exact - 2  # "more than at_most"


def test_a_20_mb_prompt_is_counted_without_tokenising_it_whole(backend):
    recording = RecordingTokenizer(backend.tokenizer)
    huge = [{"role": "user", "content": "x" * 20_000_000}]
    assert count_prompt_tokens(recording, huge, at_most=200) == 201
    assert recording.longest <= 201 * MAX_CHARS_PER_TOKEN


def test_too_long_prompts_are_skipped_and_counted(backend, tmp_path, caplog):
    params = SamplingParams(max_new_tokens=6)
    prompts = _prompts(long_words=200)  # ~800 tokens: far past the 250 that fit
    with caplog.at_level("WARNING", logger="distill"):
        stats = generate_responses(backend, prompts, tmp_path, params=params, progress=False)
    assert (stats.done, stats.too_long, stats.failed) == (3, 1, 0)
    assert "skipped 1 prompt(s) longer than 250 tokens" in caplog.text and "'long'" in caplog.text
    latest = latest_records(tmp_path)
    expected = {r.id for r in plan_requests(prompts, "tiny", params, 1) if r.prompt.id != "long"}
    assert set(latest) == expected  # the same content addresses as without a limit
    again = generate_responses(backend, prompts, tmp_path, params=params, progress=False)
    assert (again.done, again.skipped_existing, again.too_long) == (0, 3, 1)  # counted again, never written


def test_an_explicit_limit_applies_below_the_context(backend, tmp_path):
    prompts = _prompts(long_words=5)
    longest_short = max(backend.prompt_tokens(p.messages) for p in prompts if p.id != "long")
    assert backend.prompt_tokens(prompts[2].messages) > longest_short  # the 5 long words
    params = SamplingParams(max_new_tokens=6, max_prompt_tokens=longest_short)
    stats = generate_responses(backend, prompts, tmp_path, params=params, progress=False)
    assert (stats.done, stats.too_long) == (3, 1)
    assert all(r["prompt_tokens"] <= longest_short for r in latest_records(tmp_path).values())


def test_too_long_prompt_refused_with_on_error_stop_before_anything_is_written(backend, tmp_path):
    with pytest.raises(DistillError, match=r"prompt 'long': longer than 250 tokens \(the teacher's context of "
                                           r"256 tokens less generate.max_new_tokens=6\)") as err:
        generate_responses(backend, _prompts(long_words=200), tmp_path / "out", params=SamplingParams(max_new_tokens=6),
                           progress=False, on_long_prompt="stop")
    assert "\n" not in str(err.value) and "data.on_error: skip" in str(err.value)
    assert not list((tmp_path / "out").glob("shard-*"))


def test_batches_are_formed_by_token_length(tmp_path):
    # Character lengths disagree with token lengths: long words make few tokens, short words many.
    words = {"a": 9, "b": 2, "c": 8, "d": 1, "e": 7, "f": 3}
    prompts = [Prompt(id=k, messages=[{"role": "user", "content": " ".join([k * (40 // n)] * n)}])
               for k, n in words.items()]
    teacher = ByWords()
    stats = generate_responses(teacher, prompts, tmp_path, params=SamplingParams(max_new_tokens=4), progress=False)
    assert stats.done == 6
    batched = [[words[text[0]] for text in batch] for batch in teacher.batches]
    assert batched == [[9, 8], [7, 3], [2, 1]]


def test_generate_stage_refuses_or_skips_by_data_on_error(tmp_path, tiny_teacher_dir, capsys):
    from conftest import tiny_recipe

    rows = [{"id": "short", "prompt": "Question?"}, {"id": "huge", "prompt": "word " * 400}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = tiny_recipe(tmp_path / "run", tiny_teacher_dir, tmp_path / "prompts.jsonl")
    raw["data"] = {"prompts": str(tmp_path / "prompts.jsonl"), "max_length": 48}
    raw["generate"] = {"max_new_tokens": 3, "max_prompt_tokens": 100}
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    assert main(["generate", str(recipe_path), "--no-progress"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert "prompt 'huge': longer than 100 tokens (generate.max_prompt_tokens=100)" in line
    raw["data"]["on_error"] = "skip"
    recipe_path.write_text(yaml.safe_dump(raw))
    assert main(["generate", str(recipe_path), "--no-progress"]) == 0
    answered = {r["prompt_id"] for r in latest_records(tmp_path / "run" / "teacher_data").values()}
    assert answered == {"short"}


# ---------------------------------------------------------------- training lines and data.max_length


def _full_ids(tokenizer, text: str, max_length: int) -> list[int]:
    ids = tokenizer(text)["input_ids"]
    return (ids + [tokenizer.eos_token_id])[:max_length]


def test_long_text_is_cut_by_characters_with_the_same_tokens(tiny_teacher_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    text = "Distillation trains a small student to imitate a large teacher. " * 200  # > 16 * 64 characters
    recording = RecordingTokenizer(tokenizer)
    encoded = encode_example(Example(id="t", text=text), recording, max_length=16)
    assert encoded.input_ids == _full_ids(tokenizer, text, 16)
    assert recording.longest <= 16 * MAX_CHARS_PER_TOKEN < len(text)
    assert example_token_ids(Example(id="t", text=text), recording, 16) == encoded.input_ids


def test_a_20_mb_training_line_is_never_tokenised_whole(tiny_teacher_dir):
    tokenizer = RecordingTokenizer(AutoTokenizer.from_pretrained(tiny_teacher_dir))
    huge = "Once upon a time there was a cat. " * 600_000  # ~20 MB
    cases = [
        Example(id="text", text=huge),
        Example(id="answer", messages=[{"role": "user", "content": "Tell a story."},
                                       {"role": "assistant", "content": huge}]),
        Example(id="prompt", messages=[{"role": "user", "content": huge}, {"role": "assistant", "content": "ok"}]),
    ]
    text, answer, prompt = (encode_example(e, tokenizer, max_length=48) for e in cases)
    assert len(text.input_ids) == 48 and len(answer.input_ids) == 48
    shorter = [{"role": "user", "content": "Tell a story."}, {"role": "assistant", "content": huge[:5000]}]
    reference = encode_example(Example(id="answer", messages=shorter), tokenizer.inner, max_length=48)
    assert answer.labels == reference.labels and sum(label != -100 for label in answer.labels) > 10
    assert prompt is None  # no answer token within max_length: dropped, as before
    assert tokenizer.longest <= 48 * MAX_CHARS_PER_TOKEN + 100  # (+ the chat template's own text)


def test_cut_chat_examples_train_the_same_tokens(tiny_teacher_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    answer = "The answer is four, because two plus two is four. " * 60  # more than 40 * 64 characters
    messages = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": answer},
                {"role": "user", "content": "And three plus three?"}, {"role": "assistant", "content": "Six."}]
    assert len(answer) > 40 * MAX_CHARS_PER_TOKEN
    cut = encode_example(Example(id="c", messages=messages), tokenizer, max_length=40)
    whole = encode_example(Example(id="c", messages=messages), tokenizer, max_length=10_000)
    assert cut.input_ids == whole.input_ids[:40] and cut.labels == whole.labels[:40]
