"""`distill serve`: the OpenAI-compatible server over a tiny random Llama, spoken to with plain HTTP."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.errors import DistillError
from distill.teachers.backend import SamplingParams
from distill.teachers.local import LocalBackend, generate_texts
from distill.teachers.server import is_loopback, make_server, serve

from conftest import make_tiny_llama

QUESTIONS = ["What is two plus two?", "Name a fruit.", "Write a poem about the sea.", "Why is the sky blue?",
             "Say hi.", "Who loves books?", "List three fruits.", "Where is Paris?"]


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def backend(tmp_path_factory, tiny_tokenizer_dir) -> LocalBackend:
    # Untied embeddings: a tied random model just repeats its last prompt token (a newline), an empty answer.
    model_dir = make_tiny_llama(tmp_path_factory.mktemp("talker"), tiny_tokenizer_dir, tie=False, seed=1)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return LocalBackend(model, AutoTokenizer.from_pretrained(model_dir), name="tiny", batch_size=8)


@pytest.fixture(scope="module")
def server(backend):
    # A wide window, so that requests sent together surely share a batch.
    with make_server(backend, batch_window_s=0.05) as running:
        yield running


def post(server, path: str, body: dict, **kw) -> requests.Response:
    return requests.post(f"{server.url}{path}", json=body, timeout=30, **kw)


def local(backend, question: str, **params) -> object:
    return generate_texts(backend.model, backend.tokenizer, [chat(question)], params=SamplingParams(**params))[0]


def raw_greedy(backend, prompt: str, new_tokens: int) -> str:
    """What the model writes after a raw text prompt, straight from model.generate."""
    ids = backend.tokenizer(prompt)["input_ids"]
    out = backend.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                 top_k=None, pad_token_id=backend.tokenizer.pad_token_id)
    return backend.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def test_models_and_unknown_routes(server):
    models = requests.get(f"{server.url}/models", timeout=5).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    missing = requests.get(f"{server.url}/nothing", timeout=5)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_chat_response_shape_and_greedy_answer(server, backend):
    reply = post(server, "/chat/completions", {"model": "tiny", "messages": chat(QUESTIONS[0]), "max_tokens": 6,
                                                 "temperature": 0})
    assert reply.status_code == 200
    body = reply.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "tiny"
    [choice] = body["choices"]
    expected = local(backend, QUESTIONS[0], max_new_tokens=6)
    assert expected.text and choice["index"] == 0 and choice["logprobs"] is None
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == expected.finish_reason
    assert body["usage"] == {"prompt_tokens": expected.prompt_tokens, "completion_tokens": expected.new_tokens,
                             "total_tokens": expected.prompt_tokens + expected.new_tokens}


def test_chat_logprobs_carry_the_local_top_k(server, backend):
    body = post(server, "/chat/completions", {"messages": chat(QUESTIONS[1]), "max_tokens": 5, "temperature": 0,
                                              "logprobs": True, "top_logprobs": 3,
                                              "return_tokens_as_token_ids": True}).json()
    content = body["choices"][0]["logprobs"]["content"]
    expected = local(backend, QUESTIONS[1], max_new_tokens=5, top_logprobs=3)
    assert [entry["token"] for entry in content] == [f"token_id:{i}" for i in expected.token_ids]
    for entry, top in zip(content, expected.top_logprobs):
        assert [alt["token"] for alt in entry["top_logprobs"]] == [f"token_id:{i}" for i, _ in top]
        assert [alt["logprob"] for alt in entry["top_logprobs"]] == pytest.approx([lp for _, lp in top], abs=1e-4)
        assert entry["logprob"] == pytest.approx(top[0][1], abs=1e-4)  # greedy: the chosen token is the best one
    as_text = post(server, "/chat/completions", {"messages": chat(QUESTIONS[1]), "max_tokens": 5, "temperature": 0,
                                                 "logprobs": True, "top_logprobs": 0}).json()
    entries = as_text["choices"][0]["logprobs"]["content"]
    assert all(entry["top_logprobs"] == [] for entry in entries)
    spelled = b"".join(bytes(entry["bytes"]) for entry in entries).decode("utf-8", errors="replace")
    assert spelled.strip().startswith(expected.text)


def test_n_choices_and_usage(server):
    body = post(server, "/chat/completions", {"messages": chat(QUESTIONS[2]), "max_tokens": 4, "n": 3,
                                              "temperature": 0.8, "seed": 1}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] <= 3 * 4
    assert body["usage"]["prompt_tokens"] < body["usage"]["total_tokens"]


def test_completions_endpoint_with_legacy_logprobs(server, backend):
    prompts = ["Once upon a time", "The quick brown fox"]
    body = post(server, "/completions", {"prompt": prompts, "max_tokens": 4, "temperature": 0, "logprobs": 2}).json()
    assert body["object"] == "text_completion" and len(body["choices"]) == 2
    for prompt, choice in zip(prompts, body["choices"]):
        assert choice["text"] == raw_greedy(backend, prompt, 4)
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"])
        assert all(1 <= len(top) <= 2 for top in logprobs["top_logprobs"])


def test_stop_strings_end_the_answer(server, backend):
    free = local(backend, QUESTIONS[0], max_new_tokens=12).text
    stop = re.search(r"[a-z]{3,}", free)[0]
    body = post(server, "/chat/completions", {"messages": chat(QUESTIONS[0]), "max_tokens": 12, "temperature": 0,
                                              "stop": [stop]}).json()
    choice = body["choices"][0]
    assert stop not in choice["message"]["content"] and choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == free[:free.index(stop)].strip()


def test_concurrent_requests_share_batches_and_keep_their_answers(server, backend):
    before = dict(server.stats)

    def ask(question: str) -> str:
        body = post(server, "/chat/completions", {"messages": chat(question), "max_tokens": 5, "temperature": 0})
        return body.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(ask, QUESTIONS))
    assert server.stats["requests"] - before["requests"] == len(QUESTIONS)
    assert server.stats["batches"] - before["batches"] < len(QUESTIONS)  # some requests ran together
    for question, answer in zip(QUESTIONS, answers):
        assert answer == local(backend, question, max_new_tokens=5).text


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"messages": chat("hi"), "temperature": 5}, "temperature"),
    ({"messages": chat("hi"), "max_tokens": 0}, "max_tokens"),
    ({"messages": chat("hi"), "n": "two"}, "n"),
    ({"messages": chat("hi"), "top_logprobs": 3}, "top_logprobs"),
    ({"messages": chat("hi"), "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": chat("hi"), "stop": [""]}, "stop"),
    ({"messages": chat("hi"), "stream": True}, "stream"),
])
def test_bad_requests_get_openai_errors(server, body, param):
    reply = post(server, "/chat/completions", body)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_body_that_is_not_json_and_unknown_model(server):
    broken = requests.post(f"{server.url}/chat/completions", data=b"{not json", timeout=5)
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    other = post(server, "/chat/completions", {"model": "gpt-9", "messages": chat("hi")})
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"


def test_api_key_is_checked(backend):
    with make_server(backend, api_key="sekrit-key") as guarded:
        body = {"messages": chat("hi"), "max_tokens": 2}
        assert post(guarded, "/chat/completions", body).status_code == 401
        wrong = post(guarded, "/chat/completions", body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "sekrit" not in wrong.text
        right = post(guarded, "/chat/completions", body, headers={"Authorization": "Bearer sekrit-key"})
        assert right.status_code == 200 and right.json()["choices"]


def test_busy_port_and_missing_key_variable_are_one_line_errors(server, backend, monkeypatch):
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(DistillError, match=f"cannot listen on 127.0.0.1:{port}"):
        make_server(backend, port=port)
    monkeypatch.delenv("DISTILL_TEST_UNSET_KEY", raising=False)
    with pytest.raises(DistillError, match=r"\$DISTILL_TEST_UNSET_KEY is not set"):
        serve("no/such-model", api_key_env="DISTILL_TEST_UNSET_KEY")


def test_keep_alive_connection_serves_several_requests(server):
    with requests.Session() as session:
        for question in QUESTIONS[:3]:
            reply = session.post(f"{server.url}/chat/completions", timeout=30,
                                 data=json.dumps({"messages": chat(question), "max_tokens": 2}))
            assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.slow
def test_serve_loads_a_model_answers_and_stops_on_ctrl_c(tiny_teacher_dir, monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_SERVE_KEY", "k-123")
    # A job started with `&` by a non-interactive shell (a CI script) inherits SIGINT ignored, and Python then keeps
    # ignoring it: restore Ctrl-C's default handler so the test does not depend on how the suite was launched.
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"from distill.teachers.server import serve; "
            f"serve({str(tiny_teacher_dir)!r}, port=0, batch_size=2, api_key_env='DISTILL_TEST_SERVE_KEY')")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        banner = process.stdout.readline()
        url = re.search(r"at (http://\S+/v1) \(batches of up to 2", banner)[1]
        reply = requests.post(f"{url}/chat/completions", json={"messages": chat("hi"), "max_tokens": 2}, timeout=30,
                              headers={"Authorization": "Bearer k-123"})
        assert reply.status_code == 200 and reply.json()["model"] == str(tiny_teacher_dir)
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("LOCALHOST", True),
                                            ("127.0.0.2", True), ("::1", True), ("0.0.0.0", False), ("::", False),
                                            ("", False), ("192.168.1.5", False), ("myhost.example", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_serve_beyond_loopback_needs_a_key_or_insecure(tmp_path, capsys, monkeypatch):
    from distill.cli import main

    missing = str(tmp_path / "no-model")  # past the host check, serving fails here: "model not found"
    assert main(["serve", missing, "--host", "0.0.0.0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distill: error: --host 0.0.0.0: without an API key")
    assert "--api-key-env VAR" in lines[0] and "--insecure" in lines[0]
    monkeypatch.setenv("DISTILL_TEST_SERVE_KEY", "k-123")
    for extra in (["--host", "0.0.0.0", "--insecure"], ["--host", "localhost"],
                  ["--host", "0.0.0.0", "--api-key-env", "DISTILL_TEST_SERVE_KEY"]):
        assert main(["serve", missing, *extra]) == 2
        assert "model not found" in capsys.readouterr().err, extra
    with pytest.raises(DistillError, match=r"--host 10\.1\.2\.3: without an API key"):
        serve(missing, host="10.1.2.3")
