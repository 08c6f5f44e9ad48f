"""The OpenAI-compatible HTTP teacher: against a fault-injecting server, and against `distill serve` on a real model."""
from __future__ import annotations

import email.utils
import logging
import socket
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import STORIES260K, make_tiny_llama, require_shared
from distill.errors import DistillError
from distill.teachers.backend import Completion, Failure, SamplingParams
from distill.teachers.local import LocalBackend, generate_texts
from distill.teachers.openai_client import OpenAIBackend, token_bytes_table, token_ids_from_logprobs
from distill.teachers.server import make_server
from fault_server import FaultServer

KEY_ENV = "DISTILL_TEST_TEACHER_KEY"
SECRET = "sk-test-SECRET-4242"
FAST = {"backoff_s": 0.001, "timeout_s": 0.5}  # retries without waiting; a "hang" (2 s) times out


def chats(*questions: str) -> list[list[dict]]:
    return [[{"role": "user", "content": q}] for q in questions]


def client(url: str, **kw) -> OpenAIBackend:
    return OpenAIBackend(url, "fake", **{**FAST, **kw})


# --- against the fault server -------------------------------------------------------------------------------------

def test_every_conversation_ends_with_one_completion_or_one_counted_failure():
    script = {"a": ["429", "ok"], "b": ["500", "503"], "c": ["hang"], "d": ["malformed"], "e": ["drop"],
              "f": ["400"], "g": ["500"] * 10, "h": []}
    with FaultServer(script) as server:
        backend = client(server.url, max_retries=3, concurrency=3)
        results = backend.generate(chats(*script), SamplingParams(max_new_tokens=4))
    by_key = dict(zip(script, results))
    for key in "abcdeh":
        assert isinstance(by_key[key], Completion) and by_key[key].text == f"echo: {key}"
        assert by_key[key].finish_reason == "stop" and by_key[key].new_tokens == 2
    assert isinstance(by_key["f"], Failure) and by_key["f"].attempts == 1
    assert by_key["f"].error.startswith(f"400 Bad Request from {server.url}: Incorrect API key")
    assert isinstance(by_key["g"], Failure) and by_key["g"].attempts == 4
    assert by_key["g"].error.startswith(f"500 Internal Server Error from {server.url}: the model fell over")
    assert backend.stats["failures"] == {"bad_request": 1, "server": 1}
    assert backend.stats["completions"] == 6
    assert [len(server.hits_for(key)) for key in script] == [2, 3, 2, 2, 2, 1, 4, 1]
    assert backend.stats["requests"] == len(server.hits) and backend.stats["retries"] == len(server.hits) - len(script)
    assert backend.stats["prompt_tokens"] == 6 and backend.stats["completion_tokens"] == 12


@pytest.mark.parametrize("retry_after", [
    lambda: "1",
    lambda: email.utils.formatdate(time.time() + 2, usegmt=True),  # one-second resolution: 1 to 2 s away
], ids=["seconds", "http-date"])
def test_retry_after_is_honoured(retry_after):
    with FaultServer({"x": ["429"], "y": ["503"]}, retry_after=retry_after) as server:
        results = client(server.url, concurrency=2).generate(chats("x", "y"), SamplingParams())
    assert all(isinstance(r, Completion) for r in results)
    for key in "xy":
        first, second = server.hits_for(key)
        assert second.time - first.time > 0.9  # the backoff alone would have waited about a millisecond


def test_concurrency_is_respected():
    with FaultServer(answer_delay_s=0.1) as server:
        backend = client(server.url, concurrency=4)
        results = backend.generate(chats(*(f"q{i}" for i in range(20))), SamplingParams())
    assert [r.text for r in results] == [f"echo: q{i}" for i in range(20)]
    assert server.max_in_flight == 4
    assert backend.batch_size == 16


def test_the_key_is_sent_but_never_leaks(monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    with FaultServer({"bad": ["400"], "auth": ["401"], "flaky": ["500", "500"]}) as server:
        backend = client(server.url, api_key_env=KEY_ENV, max_retries=1)
        results = backend.generate(chats("ok", "bad", "auth", "flaky"), SamplingParams())
    assert {hit.authorization for hit in server.hits} == {f"Bearer {SECRET}"}
    errors = [r.error for r in results if isinstance(r, Failure)]
    assert len(errors) == 3 and "***" in errors[0]  # the server echoed the key; the failure shows it masked
    assert errors[1] == f"401 Unauthorized from {server.url}: check the key in ${KEY_ENV}"
    for text in [*errors, caplog.text, repr(backend), str(backend.stats), str(vars(backend).get("stats"))]:
        assert SECRET not in text


def test_wrong_key_is_one_error_after_one_request(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with FaultServer(default=["401"]) as server:
        backend = client(server.url, api_key_env=KEY_ENV)
        with pytest.raises(DistillError) as raised:
            backend.generate(chats(*(f"q{i}" for i in range(10))), SamplingParams())
    assert str(raised.value) == f"401 Unauthorized from {server.url}: check the key in ${KEY_ENV}"
    assert len(server.hits) == 1 and SECRET not in str(raised.value)


def test_every_request_rejected_mid_run_raises(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with FaultServer() as server:
        backend = client(server.url, api_key_env=KEY_ENV)
        assert isinstance(backend.generate(chats("first"), SamplingParams())[0], Completion)
        server.default = ["401"]  # the key was revoked
        with pytest.raises(DistillError, match="^401 Unauthorized"):
            backend.generate(chats("x", "y", "z"), SamplingParams())
    assert len(server.hits) == 4


def test_unreachable_server_fails_at_once():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = client(f"http://127.0.0.1:{port}")
    with pytest.raises(DistillError, match=rf"^cannot reach http://127.0.0.1:{port}/v1: .*refused"):
        backend.generate(chats("a", "b", "c"), SamplingParams())
    assert backend.stats["requests"] == 1 and backend.stats["retries"] == 0


def test_configuration_errors_are_one_line(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(DistillError, match=rf"\${KEY_ENV} is not set"):
        OpenAIBackend("http://127.0.0.1:1/v1", "m", api_key_env=KEY_ENV)
    with pytest.raises(DistillError, match="expected http"):
        OpenAIBackend("localhost:8000", "m")
    assert OpenAIBackend("http://h:1", "m").base_url == "http://h:1/v1"
    assert OpenAIBackend("https://api.example.com/v1/", "m", name="t").base_url == "https://api.example.com/v1"


# --- token ids from logprob entries ---------------------------------------------------------------------------------

def entry(table: list[bytes], token: int, top: list[tuple[int, float]]) -> dict:
    spell = lambda i: {"token": table[i].decode("utf-8", errors="replace"), "bytes": list(table[i])}  # noqa: E731
    return {**spell(token), "logprob": top[0][1], "top_logprobs": [{**spell(i), "logprob": lp} for i, lp in top]}


def test_token_ids_from_logprobs(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ids = tok("The quick brown fox")["input_ids"]
    table = token_bytes_table(tok)
    assert b"".join(table[i] for i in ids) == b"The quick brown fox"
    entries = [entry(table, i, [(i, -0.5), ((i + 7) % len(tok), -1.5)]) for i in ids]
    chosen, tops = token_ids_from_logprobs(tok, entries, "The quick brown fox")
    assert chosen == ids and tops[1] == [(ids[1], -0.5), ((ids[1] + 7) % len(tok), -1.5)]
    assert token_ids_from_logprobs(tok, entries, "A different answer") is None
    unknown = [*entries[:-1], {**entries[-1], "bytes": list(b"\xff\xfe not a token")}]
    assert token_ids_from_logprobs(tok, unknown, None) is None
    numbered = [{"token": f"token_id:{i}", "logprob": -1.0,
                 "top_logprobs": [{"token": f"token_id:{i}", "logprob": -1.0}]} for i in ids]
    assert token_ids_from_logprobs(None, numbered)[0] == ids


# --- against `distill serve` on a real (tiny, random) model ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer_dir) -> LocalBackend:
    # Untied embeddings: a tied random model only repeats its last prompt token (a newline).
    model_dir = make_tiny_llama(tmp_path_factory.mktemp("talker"), tiny_tokenizer_dir, tie=False, seed=1)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return LocalBackend(model, AutoTokenizer.from_pretrained(model_dir), name="tiny", batch_size=8)


# A server that names tokens only by their text (as a hosted API): the client's bytes-to-id path
BY_TEXT = {"return_tokens_as_token_ids": False}
QUESTIONS = ["What is two plus two?", "Name a fruit.", "Write a poem about the sea.", "Why is the sky blue?",
             "Say hi.", "Where is Paris?"]


def assert_same(remote: list, local: list[Completion], logprobs: bool = True) -> None:
    for got, want in zip(remote, local, strict=True):
        assert isinstance(got, Completion)
        assert (got.text, got.finish_reason, got.new_tokens) == (want.text, want.finish_reason, want.new_tokens)
        assert got.prompt_tokens == want.prompt_tokens
        if logprobs:
            assert got.token_ids == want.token_ids
            # One row per token over HTTP; locally an answer cut at max_new_tokens has one more (after its end).
            assert len(got.top_logprobs) == len(want.token_ids)
            for got_top, want_top in zip(got.top_logprobs, want.top_logprobs):
                assert [i for i, _ in got_top] == [i for i, _ in want_top]
                assert [lp for _, lp in got_top] == pytest.approx([lp for _, lp in want_top], abs=1e-4)


def test_greedy_answers_and_top_logprobs_match_local_generation(tiny):
    params = SamplingParams(max_new_tokens=6, top_logprobs=3)
    local = [generate_texts(tiny.model, tiny.tokenizer, [c], params=params)[0] for c in chats(*QUESTIONS)]
    assert all(c.text for c in local)
    with make_server(tiny) as server:
        backend = OpenAIBackend(server.url, "tiny", concurrency=3, tokenizer=tiny.tokenizer)
        remote = backend.generate(chats(*QUESTIONS), params)
    assert_same(remote, local)
    assert backend.stats["logprobs_unrecovered"] == 0 and backend.stats["failures"] == {}
    assert backend.stats["completion_tokens"] == sum(c.new_tokens for c in local)


def test_completions_endpoint_with_a_rendered_prompt(tiny):
    params = SamplingParams(max_new_tokens=5, top_logprobs=2)
    local = generate_texts(tiny.model, tiny.tokenizer, chats(*QUESTIONS[:3]), params=params)
    with make_server(tiny) as server:
        by_bytes = OpenAIBackend(server.url, "tiny", use_chat=False, tokenizer=tiny.tokenizer, extra_body=BY_TEXT)
        by_strings = by_bytes.generate(chats(*QUESTIONS[:3]), params)
        by_id = OpenAIBackend(server.url, "tiny", use_chat=False, tokenizer=tiny.tokenizer)  # asks: distill serve
        assert_same(by_id.generate(chats(*QUESTIONS[:3]), params), local)
    # Legacy logprobs spell tokens as text only: a partial UTF-8 token reads "\ufffd" and cannot be told apart.
    assert_same(by_strings, local, logprobs=False)
    assert by_bytes.stats["logprobs_unrecovered"] == sum(r.top_logprobs is None for r in by_strings)


@pytest.mark.slow
def test_stories260k_ids_are_recovered_or_counted_never_guessed():
    model_dir = require_shared(STORIES260K)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    params = SamplingParams(max_new_tokens=12, top_logprobs=5)
    questions = ["Once upon a time", "Tom had a dog", "The sun was hot", "Lily saw a bird"]
    local = [generate_texts(model, tokenizer, [c], params=params)[0] for c in chats(*questions)]
    with make_server(LocalBackend(model, tokenizer, name="stories")) as server:
        by_bytes = OpenAIBackend(server.url, "stories", tokenizer=tokenizer, concurrency=2, extra_body=BY_TEXT)
        plain = by_bytes.generate(chats(*questions), params)
        by_id = OpenAIBackend(server.url, "stories", tokenizer=tokenizer)
        assert_same(by_id.generate(chats(*questions), params), local)
    # SentencePiece byte fallback: "<0x2C>" and "," are both b",", so a top list with either cannot be mapped back
    # from bytes (here: every answer); what is recovered must be right, and the rest counted.
    recovered = [(got, want) for got, want in zip(plain, local) if got.top_logprobs is not None]
    assert_same([got for got, _ in recovered], [want for _, want in recovered])
    assert by_bytes.stats["logprobs_unrecovered"] == len(plain) - len(recovered)
    assert_same(plain, local, logprobs=False)
