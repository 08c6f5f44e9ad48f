"""The vLLM teacher backend against a fake `vllm` module (the real one needs a CUDA GPU)."""
from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from distill.errors import DistillError
from distill.teachers.backend import Completion, Failure, SamplingParams
from distill.teachers.vllm_backend import NOT_INSTALLED, VLLMBackend

CONVERSATIONS = [[{"role": "user", "content": "Hi?"}], [{"role": "user", "content": "Two plus two?"}]]


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[dict[int, Logprob]] | None = None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


@dataclass
class FakeLLM:
    """Records what it was built with and asked; answers with `canned` (or raises `fail`)."""

    kwargs: dict
    chats: list = field(default_factory=list)
    canned: list = field(default_factory=list)
    fail: Exception | None = None
    fail_on: list | None = None  # raise only for calls that hold this conversation (None: every call)

    def chat(self, messages, sampling_params, use_tqdm=True):
        self.chats.append((messages, sampling_params, use_tqdm))
        if self.fail is not None and (self.fail_on is None or self.fail_on in messages):
            raise self.fail
        return [self.canned[CONVERSATIONS.index(m)] for m in messages]


def canned_outputs() -> list[RequestOutput]:
    steps = [  # the sampled token (9) is not among the best two at the second step: vLLM adds it as a third
        {5: Logprob(-0.1, 1), 6: Logprob(-2.5, 2)},
        {7: Logprob(-1.2, 2), 8: Logprob(-0.4, 1), 9: Logprob(-3.0, 3)},
    ]
    return [
        RequestOutput([1, 2, 3], [CompletionOutput(" Hello there. ", [5, 9], "stop", steps)]),
        RequestOutput([1, 2, 3, 4, 5], [CompletionOutput("Four", [11, 12, 13], "length", steps + steps[:1])]),
    ]


@pytest.fixture()
def fake_vllm(monkeypatch):
    """A `vllm` module with LLM and SamplingParams of the real shapes; `.built` holds every LLM made."""
    module = types.ModuleType("vllm")
    module.built = []

    def llm(**kwargs):
        module.built.append(FakeLLM(kwargs, canned=canned_outputs()))
        return module.built[-1]

    module.LLM = llm
    module.SamplingParams = lambda **kw: ("SamplingParams", kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_engine_and_sampling_parameters_are_mapped(fake_vllm):
    backend = VLLMBackend("/models/teacher", name="teacher", batch_size=4, dtype="bfloat16", seed=7,
                          trust_remote_code=True, max_logprobs=32)
    assert (backend.name, backend.batch_size) == ("teacher", 4)
    assert fake_vllm.built[0].kwargs == {"model": "/models/teacher", "dtype": "bfloat16", "seed": 7,
                                         "trust_remote_code": True, "max_logprobs": 32}
    backend.generate(CONVERSATIONS, SamplingParams(max_new_tokens=9, temperature=0.7, top_p=0.9, seed=3,
                                                   stop=("\n\n",), top_logprobs=2))
    messages, (_, options), use_tqdm = fake_vllm.built[0].chats[0]
    assert messages == CONVERSATIONS and use_tqdm is False
    assert options == {"max_tokens": 9, "temperature": 0.7, "top_p": 0.9, "stop": ["\n\n"], "seed": 3,
                       "logprobs": 2}
    backend.generate(CONVERSATIONS, SamplingParams(max_new_tokens=5))  # greedy, no log-probs
    _, (_, options), _ = fake_vllm.built[0].chats[1]
    assert options == {"max_tokens": 5, "temperature": 0.0, "top_p": 1.0, "stop": []}
    assert "max_logprobs" not in VLLMBackend("m").llm.kwargs  # vLLM's own default unless asked


def test_outputs_become_completions_with_best_first_logprobs(fake_vllm):
    backend = VLLMBackend("m")
    first, second = backend.generate(CONVERSATIONS, SamplingParams(max_new_tokens=3, top_logprobs=2))
    assert isinstance(first, Completion) and isinstance(second, Completion)
    assert (first.text, first.finish_reason, first.prompt_tokens, first.new_tokens) == ("Hello there.", "stop", 3, 2)
    assert (second.finish_reason, second.prompt_tokens, second.new_tokens, second.token_ids) == \
        ("length", 5, 3, [11, 12, 13])
    assert first.top_logprobs == [[(5, -0.1), (6, -2.5)], [(8, -0.4), (7, -1.2)]]  # the sampled 9th cut off
    assert all(len(step) == 2 for step in second.top_logprobs) and len(second.top_logprobs) == 3
    [only] = backend.generate(CONVERSATIONS[:1], SamplingParams(top_logprobs=1))
    assert only.top_logprobs == [[(5, -0.1)], [(8, -0.4)]]
    [plain] = backend.generate(CONVERSATIONS[:1], SamplingParams())
    assert plain.top_logprobs is None and plain.token_ids == [5, 9]


def test_a_failing_engine_call_fails_each_conversation(fake_vllm):
    backend = VLLMBackend("m")
    backend.llm.fail = ValueError("The decoder prompt (length 9000) is longer than the maximum model length\nmore")
    results = backend.generate(CONVERSATIONS, SamplingParams())
    assert [type(r) for r in results] == [Failure, Failure]
    assert results[0].error == "ValueError: The decoder prompt (length 9000) is longer than the maximum model length"
    assert backend.generate([], SamplingParams()) == []


def test_one_bad_conversation_fails_alone(fake_vllm):
    backend = VLLMBackend("m")
    backend.llm.fail, backend.llm.fail_on = ValueError("prompt too long"), CONVERSATIONS[0]
    first, second = backend.generate(CONVERSATIONS, SamplingParams())
    assert isinstance(first, Failure) and first.error == "ValueError: prompt too long"
    assert isinstance(second, Completion) and second.text == "Four"
    assert [len(messages) for messages, _, _ in backend.llm.chats] == [2, 1, 1]  # the batch, then one by one


def test_missing_vllm_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ModuleNotFoundError
    with pytest.raises(DistillError) as err:
        VLLMBackend("m")
    assert str(err.value) == NOT_INSTALLED
    assert "pip install vllm" in NOT_INSTALLED and "GPU" in NOT_INSTALLED


def test_an_engine_that_cannot_load_is_one_line(fake_vllm):
    def refuse(**kwargs):
        raise RuntimeError("No CUDA GPUs are available\ntraceback...")

    fake_vllm.LLM = refuse
    with pytest.raises(DistillError, match=r"^teacher.model: vllm could not load m \(RuntimeError: No CUDA GPUs"):
        VLLMBackend("m")


def _recipe(tmp_path: Path, teacher: dict, **data):
    from conftest import tiny_recipe
    from distill.recipe import recipe_from_dict

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "prompt": "Hi?"}) + "\n")
    raw = tiny_recipe(tmp_path / "run", Path("unused"), prompts)
    raw["teacher"] = teacher
    raw["data"] = {"prompts": str(prompts), "max_length": 48}
    raw["generate"] = {"batch_size": 5}
    return recipe_from_dict(raw, base_dir=tmp_path)


def test_teacher_backend_picks_vllm_from_the_recipe(fake_vllm, tmp_path, tiny_teacher_dir):
    from distill.stages.facts import teacher_backend

    recipe = _recipe(tmp_path, {"model": str(tiny_teacher_dir), "engine": "vllm", "dtype": "float16",
                                "trust_remote_code": True})
    backend = teacher_backend(recipe)
    assert isinstance(backend, VLLMBackend)
    assert (backend.name, backend.batch_size) == (str(tiny_teacher_dir), 5)
    assert backend.llm.kwargs == {"model": str(tiny_teacher_dir), "dtype": "float16", "seed": 3,
                                  "trust_remote_code": True, "max_logprobs": 64}  # room for teacher.cache_k
    default = _recipe(tmp_path, {"model": str(tiny_teacher_dir)})
    assert default.teacher.engine == "transformers"
    assert not isinstance(teacher_backend(default), VLLMBackend)


def test_gguf_teacher_is_given_to_vllm_as_its_file(fake_vllm, tmp_path):
    folder = tmp_path / "gguf_teacher"
    folder.mkdir()
    (folder / "model.Q4.gguf").write_bytes(b"GGUF")
    recipe = _recipe(tmp_path, {"model": "gguf_teacher", "engine": "vllm"})  # relative to the recipe's folder
    from distill.stages.facts import teacher_backend

    backend = teacher_backend(recipe)
    assert backend.llm.kwargs["model"] == str(folder / "model.Q4.gguf") and backend.name == "gguf_teacher"


def test_engine_vllm_with_an_endpoint_is_refused(tmp_path):
    with pytest.raises(DistillError) as err:
        _recipe(tmp_path, {"model": "org/name", "engine": "vllm", "endpoint": "http://127.0.0.1:8000/v1"})
    message = str(err.value)
    assert "teacher.engine" in message and "teacher.endpoint" in message and "\n" not in message
    with pytest.raises(DistillError, match="teacher.engine"):
        _recipe(tmp_path, {"model": "org/name", "engine": "sglang"})
