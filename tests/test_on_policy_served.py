"""On-policy distillation from a served teacher: `distill serve` scores text (echo) exactly as the in-process
teacher does, and training against it matches training against the local teacher."""
import json

import pytest
import torch
from conftest import STORIES260K, require_shared, tiny_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.errors import DistillError
from distill.recipe import recipe_from_dict
from distill.signals.teacher_signal import LiveTeacher, ServedTeacher
from distill.stages import train
from distill.teachers.local import LocalBackend, score_token_ids
from distill.teachers.openai_client import OpenAIBackend
from distill.teachers.server import make_server


def _backend(model_dir) -> LocalBackend:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return LocalBackend(model, AutoTokenizer.from_pretrained(model_dir), name="teacher", batch_size=4)


def test_served_scores_equal_the_in_process_teacher_on_stories260k():
    local = _backend(require_shared(STORIES260K))
    rows = [local.tokenizer("Once upon a time there was a little dog.")["input_ids"],
            local.tokenizer("Lily liked to play in the park with her ball")["input_ids"][:7]]
    with make_server(local) as server:
        client = OpenAIBackend(server.url, "teacher", tokenizer=local.tokenizer, max_retries=0)
        served = client.score(rows, 5)
        assert client.echoed_ids("Once upon a time") == list(local.tokenizer("Once upon a time")["input_ids"])
    direct = score_token_ids(local.model, rows, 5)
    logits = local.model(input_ids=torch.tensor([rows[0]])).logits[0].double()
    exact = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(rows[0][1:])[:, None])[:, 0]
    for got, want in zip(served, direct):
        assert got.token_ids == want.token_ids and got.token_log_probs[0] is None and got.top_logprobs[0] is None
        assert got.token_log_probs[1:] == pytest.approx(want.token_log_probs[1:], abs=1e-4)
        for a, b in zip(got.top_logprobs[1:], want.top_logprobs[1:]):
            assert [i for i, _ in a] == [i for i, _ in b]
            assert [v for _, v in a] == pytest.approx([v for _, v in b], abs=1e-4)
    assert served[0].token_log_probs[1:] == pytest.approx(exact.tolist(), abs=1e-4)


def test_served_teacher_signal_equals_the_live_teachers(tiny_teacher_dir):
    local = _backend(tiny_teacher_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, 10], [-100, -100, 13, 14, -100, -100]])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with make_server(local) as server:
        client = OpenAIBackend(server.url, "teacher", tokenizer=local.tokenizer, max_retries=0)
        served, _ = ServedTeacher(client, 20, len(local.tokenizer)).for_batch(batch)
    dense, _ = LiveTeacher(local.model).for_batch(batch)
    flat = labels[:, 1:].reshape(-1)
    want = dense.token_log_probs(flat, chunk_size=4)
    torch.testing.assert_close(served.token_log_probs(flat, 4), want, atol=1e-4, rtol=0)
    logits = torch.log_softmax(dense.hidden @ dense.head.t(), -1)[flat != -100]
    top = logits.topk(20, -1)
    assert torch.equal(served.sparse.ids, top.indices)
    torch.testing.assert_close(served.sparse.log_probs, top.values, atol=1e-4, rtol=0)
    rest = torch.log1p(-top.values.exp().sum(-1))
    torch.testing.assert_close(served.sparse.tail, rest, atol=1e-3, rtol=0)


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("split") != "eval"]


@pytest.mark.parametrize("estimator", ["sampled_token", "full"])
def test_training_against_a_served_teacher(tmp_path, tiny_teacher_dir, pairs_jsonl, estimator):
    """Sampled-token: the same losses as with the in-process teacher (the scores are the same to 1e-4).
    Full: the served top-20 + tail bucket trains, close to the dense loss on the same samples."""
    method = {"kind": "on_policy", "divergence": "reverse_kl", "estimator": estimator,
              "sampling": {"max_new_tokens": 6}}
    local = recipe_from_dict(tiny_recipe(tmp_path / "local", tiny_teacher_dir, pairs_jsonl, method=method))
    train(local, progress=False)
    with make_server(_backend(tiny_teacher_dir), model_name=str(tiny_teacher_dir)) as server:
        teacher = {"model": str(tiny_teacher_dir), "endpoint": server.url, "max_retries": 0}
        served = recipe_from_dict(tiny_recipe(tmp_path / "served", tiny_teacher_dir, pairs_jsonl, method=method,
                                              teacher=teacher))
        train(served, progress=False)
    a, b = _losses(tmp_path / "local"), _losses(tmp_path / "served")
    assert len(a) == len(b) == 6
    if estimator == "sampled_token":
        assert b == pytest.approx(a, abs=1e-4)
    else:  # top-20 of 320 ids + one tail bucket: a coarser divergence, the same order of magnitude
        assert all(0 <= y <= x + 1e-4 for x, y in zip(a, b))


def test_a_served_teacher_with_another_tokenizer_is_refused(tmp_path, tiny_teacher_dir, pairs_jsonl):
    other = _backend(require_shared(STORIES260K))
    with make_server(other, model_name=str(tiny_teacher_dir)) as server:
        recipe = recipe_from_dict(tiny_recipe(
            tmp_path / "r", tiny_teacher_dir, pairs_jsonl, method={"kind": "on_policy"},
            teacher={"model": str(tiny_teacher_dir), "endpoint": server.url, "max_retries": 0}))
        with pytest.raises(DistillError, match="tokenizes text differently"):
            train(recipe, progress=False)


def test_a_server_that_cannot_score_is_refused(tmp_path, tiny_teacher_dir, pairs_jsonl):
    with make_server(_backend(tiny_teacher_dir), model_name=str(tiny_teacher_dir)) as server:
        recipe = recipe_from_dict(tiny_recipe(
            tmp_path / "r", tiny_teacher_dir, pairs_jsonl, method={"kind": "on_policy"},
            teacher={"model": str(tiny_teacher_dir), "endpoint": server.url.replace("/v1", "/nowhere"),
                     "max_retries": 0}))
        with pytest.raises(DistillError, match="teacher.endpoint: the server cannot score text"):
            train(recipe, progress=False)
