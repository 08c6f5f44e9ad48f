"""On-policy distillation (method.kind: on_policy): the sampled-token loss, the sampler, and training runs."""
import json
import logging
import math

import pytest
import torch
import yaml
from conftest import tiny_recipe

from distill.cli import main
from distill.eval.metrics import repetition
from distill.losses.kd import DenseTeacher, kd_loss
from distill.losses.objective import LossSettings
from distill.losses.on_policy import sampled_token_loss, sampled_token_loss_chunked
from distill.recipe import recipe_from_dict
from distill.stages import train
from distill.training.on_policy import ResponseSampler, SamplingSettings, prompt_parts
from distill.training.step import BatchObjective, loss_on_batch

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


def _metrics(run_dir):
    """The training rows of metrics.jsonl (held-out evaluation rows left out)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") != "eval"]


# ---------------------------------------------------------------- the sampled-token loss


def _reference_sampled_token(logits, teacher, labels):
    """The estimator in float64 by hand: mean over valid rows of stopgrad(s - t) * s."""
    logits = logits.double()
    valid = labels != -100
    log_s = torch.log_softmax(logits[valid], -1).gather(1, labels[valid][:, None]).squeeze(1)
    gap = (log_s - teacher[valid].double()).detach()
    return (gap * log_s).mean(), gap.mean()


def test_sampled_token_loss_matches_a_float64_reference_and_the_chunked_path():
    g = torch.Generator().manual_seed(0)
    n, d, v = 37, 16, 50
    hidden = (0.5 * torch.randn(n, d, generator=g)).requires_grad_()
    head = (0.5 * torch.randn(v, d, generator=g)).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    teacher = torch.log_softmax(torch.randn(n, v, generator=g), -1).gather(1, labels.clamp(min=0)[:, None])[:, 0]

    reference, gap = _reference_sampled_token(hidden.double() @ head.double().t(), teacher, labels)
    ref_grads = torch.autograd.grad(reference, (hidden, head))
    naive = sampled_token_loss(hidden @ head.t(), teacher, labels)
    naive_grads = torch.autograd.grad(naive.loss, (hidden, head))
    chunked = sampled_token_loss_chunked(hidden, head, labels, teacher, chunk_size=8)
    chunked_grads = torch.autograd.grad(chunked.loss, (hidden, head))

    for out, grads in ((naive, naive_grads), (chunked, chunked_grads)):
        assert float(out.loss.detach()) == pytest.approx(reference.item(), rel=1e-5)
        assert float(out.kd) == pytest.approx(float(gap), rel=1e-5)
        assert out.n_tokens == int((labels != -100).sum())
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-4)


def test_sampled_token_estimator_averages_to_the_exact_reverse_kl_and_its_gradient():
    """On samples from the student, mean(log p_s - log p_t) -> KL(s || t), and the loss's mean gradient -> its
    gradient (score-function estimator). 200k samples: the standard error is ~1e-3, the tolerance 1e-2."""
    g = torch.Generator().manual_seed(1)
    v, n = 6, 200_000
    student_logits = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_log_probs = torch.log_softmax(torch.randn(v, generator=g, dtype=torch.float64), -1)
    log_s = torch.log_softmax(student_logits, -1)
    exact = (log_s.exp() * (log_s - teacher_log_probs)).sum()
    (exact_grad,) = torch.autograd.grad(exact, student_logits)

    samples = torch.multinomial(log_s.detach().exp(), n, replacement=True, generator=g)
    logits = student_logits[None].expand(n, v)
    out = sampled_token_loss(logits, teacher_log_probs[samples], samples)
    (estimated_grad,) = torch.autograd.grad(out.loss, student_logits)
    assert out.kd.item() == pytest.approx(exact.item(), abs=1e-2)
    torch.testing.assert_close(estimated_grad, exact_grad, atol=1e-2, rtol=0)


def test_dense_teacher_token_log_probs_equal_the_full_log_softmax():
    g = torch.Generator().manual_seed(2)
    hidden, head = torch.randn(11, 8, generator=g), torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 30, (11,), generator=g)
    labels[3] = -100
    got = DenseTeacher(hidden, head).token_log_probs(labels, chunk_size=4)
    want = torch.log_softmax(hidden @ head.t(), -1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    torch.testing.assert_close(got[labels != -100], want[labels != -100])
    assert float(got[3]) == 0.0


# ---------------------------------------------------------------- the loss on the student's samples


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_loss_on_student_samples_is_the_divergence_alone(divergence, tiny_teacher_dir):
    """On a sampled batch the CE weight is 0: the loss equals T^2 * mean D against a float64 reference."""
    from transformers import AutoModelForCausalLM

    from distill.models import output_head
    from distill.models.heads import decoder_layer_outputs
    from distill.signals.teacher_signal import LiveTeacher

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    torch.manual_seed(5)
    student = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(3, 300, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    settings = LossSettings(divergence=divergence, temperature=1.5, alpha=0.7, chunk_size=5)
    objective = BatchObjective(settings, kd=True).for_student_samples()
    out = loss_on_batch(student, LiveTeacher(teacher), batch, objective)

    with torch.no_grad():
        s_hidden, _ = decoder_layer_outputs(student, ids, batch["attention_mask"], [])
        t_hidden, _ = decoder_layer_outputs(teacher, ids, batch["attention_mask"], [])
        s_logits = (s_hidden[:, :-1] @ output_head(student).t()).reshape(-1, output_head(student).size(0))
        t_logits = (t_hidden[:, :-1] @ output_head(teacher).t()).reshape(s_logits.shape)
    reference = kd_loss(s_logits.double(), t_logits.double(), labels[:, 1:].reshape(-1), divergence=divergence,
                        temperature=1.5, alpha=0.0)
    assert float(out.loss.detach()) == pytest.approx(float(reference.loss), rel=1e-4, abs=1e-6)
    assert float(out.kd) == pytest.approx(float(reference.kd), rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------- the sampler


def _sampler(tokenizer_dir, **settings):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    base = dict(lmbda=1.0, seq_kd=False, max_new_tokens=6, temperature=1.0, top_p=1.0, stop=(), max_length=40,
                seed=0)
    return ResponseSampler(SamplingSettings(**{**base, **settings}), tok, [tok.eos_token_id], tok.pad_token_id), tok


def test_sampler_replaces_responses_keeps_prompts_and_restores_state(tiny_teacher_dir, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).train()
    sampler, tok = _sampler(tiny_tokenizer_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, tok.pad_token_id, tok.pad_token_id]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, 10], [-100, -100, 13, 14, -100, -100]])
    batch = {"input_ids": ids, "attention_mask": (labels != -100) | (ids != tok.pad_token_id), "labels": labels}
    batch["attention_mask"] = batch["attention_mask"].long()
    assert prompt_parts(batch) == [[5, 6, 7], [11, 12]]

    before = torch.random.get_rng_state()
    drawn = sampler.batch_for(student, batch, step=3, micro=0)
    sampled, by_student = drawn.batch, drawn.by_student
    assert by_student and student.training  # back in train mode
    assert torch.equal(torch.random.get_rng_state(), before)  # the run's random state is untouched
    again = sampler.batch_for(student, batch, step=3, micro=0).batch
    assert torch.equal(sampled["input_ids"], again["input_ids"])  # (seed, step, micro) decide the samples
    for row, prompt in enumerate([[5, 6, 7], [11, 12]]):
        got = sampled["input_ids"][row].tolist()
        lab = sampled["labels"][row].tolist()
        assert got[:len(prompt)] == prompt and lab[:len(prompt)] == [-100] * len(prompt)
        trained = [t for t in lab if t != -100]
        assert 1 <= len(trained) <= 6
        assert trained == got[len(prompt):len(prompt) + len(trained)]
        assert tok.eos_token_id not in trained[:-1]  # cut at the first end-of-turn token
    metrics = sampler.take_metrics()
    assert set(metrics) == {"sample_length", "eos_share", "loop_share", "sample_tokens_per_s"}
    assert sampler.take_metrics() == {}  # a new window


def test_lmbda_decides_which_micro_batches_are_sampled(tiny_teacher_dir, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([[-100, -100, 7, 8]])}
    never, _ = _sampler(tiny_tokenizer_dir, lmbda=0.0)
    assert all(d.batch is batch and not d.by_student and d.signal is None
               for d in (never.batch_for(student, batch, s, 0) for s in range(20)))
    half, _ = _sampler(tiny_tokenizer_dir, lmbda=0.5)
    sampled = [half.batch_for(student, batch, s, 0).by_student for s in range(40)]
    assert 8 <= sum(sampled) <= 32


def test_length_collapse_is_logged(tiny_teacher_dir, tiny_tokenizer_dir, caplog):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    sampler, _ = _sampler(tiny_tokenizer_dir)
    sampler.stop_ids = [10**6]  # nothing can end a sample: every one runs to the limit
    ids = torch.tensor([[5, 6, 7, 8]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([[-100, -100, 7, 8]])}
    sampler.batch_for(student, batch, 0, 0)
    with caplog.at_level(logging.WARNING, logger="distill"):
        assert sampler.take_metrics()["eos_share"] == 0.0
    assert "length collapse" in caplog.text


def test_repetition_metrics():
    out = repetition(["the cat sat on the mat", "to to to to to to to to", "a b"])
    assert out["loop_share"] == pytest.approx(1 / 3)
    bigrams = 5 + 7 + 1
    distinct = 5 + 1 + 1  # "the cat, cat sat, sat on, on the, the mat" + "to to" + "a b"
    assert out["distinct_2"] == pytest.approx(distinct / bigrams)
    assert repetition([]) == {"loop_share": None, "distinct_2": None}


# ---------------------------------------------------------------- training runs


def _on_policy(tmp_path, name, teacher, data, **method):
    """The tiny KD recipe as on_policy (its divergence left to the on-policy default unless given)."""
    recipe = tiny_recipe(tmp_path / name, teacher, data)
    kd = {k: v for k, v in recipe["method"].items() if k != "divergence"}
    recipe["method"] = {**kd, "kind": "on_policy", "sampling": {"max_new_tokens": 6}, **method}
    return recipe_from_dict(recipe)


def test_lmbda_zero_reproduces_kd_exactly(tmp_path, tiny_teacher_dir, pairs_jsonl):
    kd = recipe_from_dict(tiny_recipe(tmp_path / "kd", tiny_teacher_dir, pairs_jsonl))
    train(kd, progress=False)
    on = _on_policy(tmp_path, "on", tiny_teacher_dir, pairs_jsonl, lmbda=0.0, divergence="forward_kl")
    train(on, progress=False)
    keys = ("loss", "kd", "ce", "grad_norm")
    assert [[r[k] for k in keys] for r in _metrics(tmp_path / "on")] == \
        [[r[k] for k in keys] for r in _metrics(tmp_path / "kd")]


@pytest.mark.parametrize("method", [{"lmbda": 0.5}, {"estimator": "sampled_token"}, {"seq_kd": True, "lmbda": 0.5}])
def test_on_policy_resumes_exactly(tmp_path, tiny_teacher_dir, pairs_jsonl, method):
    whole = _on_policy(tmp_path, "a", tiny_teacher_dir, pairs_jsonl, **method)
    train(whole, progress=False)
    split = recipe_from_dict({**whole.model_dump(mode="json"), "output_dir": str(tmp_path / "b")})
    assert train(split, progress=False, stop_after=3) is None
    train(split, progress=False)
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert len(a) == len(b) == 6 and all(math.isfinite(r["loss"]) for r in a)
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)
        assert rb.get("sample_length") == ra.get("sample_length")
    assert any("sample_length" in r for r in a)


def test_on_policy_reverse_kl_on_samples_goes_down(tmp_path, tiny_teacher_dir, pairs_jsonl):
    recipe = _on_policy(tmp_path, "r", tiny_teacher_dir, pairs_jsonl,
                        sampling={"max_new_tokens": 6, "temperature": 0.0})
    recipe.train.steps, recipe.train.lr = 12, 1e-2
    train(recipe, progress=False)
    rows = _metrics(tmp_path / "r")
    assert recipe.method.divergence == "reverse_kl"  # the on-policy default
    assert all(r["loss"] == pytest.approx(r["kd"]) for r in rows)  # no CE term on the student's own samples
    assert sum(r["kd"] for r in rows[-3:]) < sum(r["kd"] for r in rows[:3])


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, message", [
    ({"method": {"kind": "on_policy", "lmbda": 1.5}}, "method.lmbda"),
    ({"method": {"kind": "on_policy"}, "teacher": {"cache": "cache"}}, "teacher.cache"),
    ({"method": {"kind": "on_policy"}, "train": {"packing": True}}, "train.packing"),
    ({"method": {"kind": "kd", "estimator": "sampled_token"}}, "method.estimator"),
    ({"method": {"kind": "on_policy", "sampling": {"engine": "vllm"}}, "train": {"parallel": "fsdp"}},
     "method.sampling.engine: vllm samples in one training process"),
    ({"method": {"kind": "on_policy", "sampling": {"engine": "vllm", "vllm_gpu_memory_utilization": 0}}},
     "method.sampling.vllm_gpu_memory_utilization"),
])
def test_bad_on_policy_recipes_exit_2_before_loading_models(tmp_path, tiny_teacher_dir, pairs_jsonl, capsys,
                                                           change, message):
    recipe = tiny_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl)
    for key, value in change.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    for command in ("run", "train"):
        assert main([command, str(path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_report_draws_the_on_policy_curves(tmp_path, tiny_teacher_dir, pairs_jsonl):
    from distill.report.html import write_report

    recipe = _on_policy(tmp_path, "r", tiny_teacher_dir, pairs_jsonl)
    train(recipe, progress=False)
    html = write_report(tmp_path / "r").read_text()
    for title in ("on-policy: mean sample length", "on-policy: samples that end on their own",
                  "on-policy: samples that loop", "on-policy: sampled tokens/s"):
        assert title in html
