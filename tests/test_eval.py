"""distill.eval metrics and report.json, and the distill.report table."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import STORIES260K, TINYSTORIES_TEXT, make_tiny_llama, require_shared
from distill.errors import DistillError
from distill.eval.metrics import agreement, decode_speed, model_size, peak_memory_mb, perplexity, rouge_l
from distill.eval.report import METRIC_KEYS, build_report, write_report
from distill.report.table import RATIOS, ROWS, format_table

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "Two plus two is four, and three times three is nine.",
    "List three fruits: apple, banana, cherry.",
]


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()


@pytest.fixture(scope="module")
def student(tiny_student_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_student_dir).eval()


def make_batch(tokenizer, texts: list[str], prompt_len: int = 3) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels copy input_ids with -100 on the first prompt_len tokens and on padding."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention_mask[i, : len(r)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :prompt_len] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture(scope="module")
def batches(tokenizer):
    return [make_batch(tokenizer, TEXTS[:2]), make_batch(tokenizer, TEXTS[2:], prompt_len=5)]


def scored_log_probs(model, batch, vocab: int | None = None):
    """Reference: float64 log-softmax at every next-token position, targets, and the labelled mask."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = F.log_softmax(logits[:, :-1, :vocab].double(), dim=-1)
    targets = batch["labels"][:, 1:]
    return logp, targets, targets != -100


# ---------------------------------------------------------------- ROUGE-L


@pytest.mark.parametrize(
    ("candidate", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),  # LCS 5, P = R = 5/6
        ("The CAT, sat!", "the cat sat", 1.0),  # case and punctuation do not count
        ("a b c d", "a c", 2 / 3),  # LCS 2: P = 1/2, R = 1, F = 2/3
        ("a b", "b a", 0.5),  # order matters: LCS 1
        ("dog", "cat", 0.0),
        ("", "the cat", 0.0),
        ("the cat", "", 0.0),
        ("", "", 1.0),
        ("!!", "...", 1.0),  # both empty after tokenisation
    ],
)
def test_rouge_l_hand_cases(candidate, reference, expected):
    assert rouge_l(candidate, reference) == pytest.approx(expected)


# ---------------------------------------------------------------- perplexity


def test_perplexity_matches_manual_reference_with_padding(teacher, tokenizer, batches):
    assert (batches[0]["attention_mask"] == 0).any(), "the fixture batch should contain padding"
    total, count = 0.0, 0
    for batch in batches:
        logp, targets, mask = scored_log_probs(teacher, batch)
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total += float(-(picked * mask).sum())
        count += int(mask.sum())
    result = perplexity(teacher, batches)
    assert result["tokens"] == count
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_ignores_unlabelled_positions(teacher, tokenizer):
    batch = make_batch(tokenizer, TEXTS[:2])
    changed = {k: v.clone() for k, v in batch.items()}
    changed["labels"][:, -1] = -100  # drop the last labelled targets
    assert perplexity(teacher, [changed])["tokens"] < perplexity(teacher, [batch])["tokens"]
    nothing = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    assert perplexity(teacher, [nothing]) == {"perplexity": None, "nll": None, "tokens": 0}


# ---------------------------------------------------------------- agreement


def test_agreement_of_a_model_with_itself(teacher, tokenizer, batches):
    result = agreement(teacher, teacher, batches, shared_vocab=len(tokenizer))
    assert result["top1_agreement"] == 1.0
    assert result["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert result["tokens"] == perplexity(teacher, batches)["tokens"]


def reference_agreement(student, teacher, batches, vocab: int) -> tuple[float, float]:
    same, kl, count = 0, 0.0, 0
    for batch in batches:
        s, _, mask = scored_log_probs(student, batch, vocab)
        t, _, _ = scored_log_probs(teacher, batch, vocab)
        s, t = s[mask], t[mask]
        same += int((s.argmax(-1) == t.argmax(-1)).sum())
        kl += float((t.exp() * (t - s)).sum())
        count += int(mask.sum())
    return same / count, kl / count


def test_agreement_with_another_model_matches_reference(teacher, student, tokenizer, batches):
    vocab = len(tokenizer)
    result = agreement(student, teacher, batches, shared_vocab=vocab)
    top1, kl = reference_agreement(student, teacher, batches, vocab)
    assert result["top1_agreement"] == pytest.approx(top1)
    assert result["kl_to_teacher"] == pytest.approx(kl, rel=1e-4)
    assert result["kl_to_teacher"] > 0.0


def test_agreement_slices_a_padded_vocabulary(tmp_path, tiny_tokenizer_dir, teacher, tokenizer, batches):
    padded = AutoModelForCausalLM.from_pretrained(
        make_tiny_llama(tmp_path / "padded", tiny_tokenizer_dir, vocab_pad_to=128, seed=2)
    ).eval()
    vocab = len(tokenizer)
    assert padded.config.vocab_size > vocab
    result = agreement(padded, teacher, batches, shared_vocab=vocab)
    top1, kl = reference_agreement(padded, teacher, batches, vocab)
    assert result["top1_agreement"] == pytest.approx(top1)
    assert result["kl_to_teacher"] == pytest.approx(kl, rel=1e-4)


# ---------------------------------------------------------------- speed, memory, size


def test_decode_speed_reports_positive_rates(student, tokenizer):
    result = decode_speed(student, tokenizer, prompt_tokens=16, new_tokens=4, batch_size=2, repeats=2)
    assert set(result) == {"prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s"}
    assert all(v > 0 for v in result.values())


def test_decode_speed_rejects_a_run_longer_than_the_context(student, tokenizer):
    with pytest.raises(DistillError, match="max_position_embeddings"):
        decode_speed(student, tokenizer, prompt_tokens=250, new_tokens=10)


def test_peak_memory_sees_a_large_allocation():
    def allocate():
        kept = torch.ones(50_000_000)  # 200 MB of float32, alive while fn runs
        time.sleep(0.05)
        return kept.numel()

    result, big_mb = peak_memory_mb(allocate, device="cpu")
    _, small_mb = peak_memory_mb(lambda: sum(range(1000)), device="cpu")
    assert result == 50_000_000
    assert big_mb >= 150
    assert small_mb < big_mb - 100


def test_model_size_counts_tied_weights_once(tmp_path, tiny_tokenizer_dir, teacher, tiny_teacher_dir):
    tied = model_size(teacher, tiny_teacher_dir)
    state = teacher.state_dict()
    expected = sum(t.numel() for k, t in state.items() if k != "lm_head.weight")
    assert teacher.config.tie_word_embeddings
    assert tied["params"] == expected
    assert tied["weight_bytes"] == 4 * expected
    assert tied["bytes_on_disk"] == (tiny_teacher_dir / "model.safetensors").stat().st_size

    untied_dir = make_tiny_llama(tmp_path / "untied", tiny_tokenizer_dir, tie=False)
    untied = model_size(AutoModelForCausalLM.from_pretrained(untied_dir))
    assert untied["params"] == expected + state["lm_head.weight"].numel()
    assert untied["bytes_on_disk"] is None


def test_model_size_names_a_missing_directory(teacher, tmp_path):
    with pytest.raises(DistillError, match="not found"):
        model_size(teacher, tmp_path / "nowhere")


# ---------------------------------------------------------------- real model (../shared)


@pytest.mark.slow
def test_real_tiny_llama_beats_a_random_one_on_real_text(tmp_path):
    model_dir = require_shared(STORIES260K)
    text = require_shared(TINYSTORIES_TEXT).read_text()[:4000]
    tok = AutoTokenizer.from_pretrained(model_dir)
    trained = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    random_model = AutoModelForCausalLM.from_config(trained.config).eval()
    ids = torch.tensor([tok(text)["input_ids"][:256]])
    batch = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]
    trained_ppl = perplexity(trained, batch)["perplexity"]
    assert trained_ppl < 0.25 * perplexity(random_model, batch)["perplexity"]
    assert trained_ppl < 20  # stories260K reaches single digits on TinyStories text
    speed = decode_speed(trained, tok, prompt_tokens=32, new_tokens=8, repeats=1)
    assert speed["decode_tokens_per_s"] > 0


# ---------------------------------------------------------------- report.json


TEACHER = dict(
    params=134_515_008, bytes_on_disk=90_000_000, peak_memory_mb=210.0, perplexity=8.0, top1_agreement=1.0,
    kl_to_teacher=0.0, rougeL_ref=0.40, rougeL_teacher=1.0, prefill_tokens_per_s=900.0, decode_tokens_per_s=40.0,
)
STUDENT = dict(
    params=33_628_752, bytes_on_disk=67_000_000, peak_memory_mb=55.5, perplexity=10.0, top1_agreement=0.62,
    kl_to_teacher=0.8123, rougeL_ref=0.30, rougeL_teacher=0.45, prefill_tokens_per_s=3100.0,
    decode_tokens_per_s=120.0,
)


def test_build_report_ratios():
    report = build_report(TEACHER, STUDENT, meta={"recipe": "quickstart", "eval_examples": 16})
    ratios = report["ratios"]
    assert report["meta"] == {"recipe": "quickstart", "eval_examples": 16}
    assert ratios["compression"] == pytest.approx(33_628_752 / 134_515_008)
    assert ratios["speedup"] == pytest.approx(3.0)
    assert ratios["rougeL_pct_of_teacher"] == pytest.approx(75.0)
    assert ratios["perplexity_pct_of_teacher"] == pytest.approx(80.0)
    assert ratios["quality_pct_of_teacher"] == pytest.approx(77.5)
    assert list(report["teacher"])[: len(METRIC_KEYS)] == list(METRIC_KEYS)


def test_build_report_nulls_missing_metrics_and_leaves_them_out_of_quality(tmp_path):
    student = {k: v for k, v in STUDENT.items() if k != "rougeL_ref"} | {"perplexity": float("nan"), "nll": 2.3}
    teacher = TEACHER | {"decode_tokens_per_s": 0.0}
    report = build_report(teacher, student, meta={})
    assert report["student"]["rougeL_ref"] is None
    assert report["student"]["perplexity"] is None  # NaN is not a measurement
    assert report["student"]["nll"] == 2.3  # extra metrics are kept
    ratios = report["ratios"]
    assert ratios["speedup"] is None  # zero denominator
    assert ratios["rougeL_pct_of_teacher"] is None and ratios["perplexity_pct_of_teacher"] is None
    assert ratios["quality_pct_of_teacher"] is None

    only_ppl = build_report(TEACHER, {k: v for k, v in STUDENT.items() if k != "rougeL_ref"}, meta={})
    assert only_ppl["ratios"]["quality_pct_of_teacher"] == pytest.approx(80.0)

    zero_rouge = build_report(TEACHER, STUDENT | {"rougeL_ref": 0.0}, meta={})
    assert zero_rouge["ratios"]["rougeL_pct_of_teacher"] == 0.0  # a real zero, not a missing value
    assert zero_rouge["ratios"]["quality_pct_of_teacher"] == pytest.approx(40.0)

    path = tmp_path / "run" / "report.json"
    write_report(report, path)
    assert json.loads(path.read_text()) == report


# ---------------------------------------------------------------- table


def test_format_table():
    report = build_report(TEACHER, STUDENT | {"peak_memory_mb": None}, meta={})
    table = format_table(report)
    lines = {line.split("  ")[0]: line for line in table.splitlines() if line}
    print(table)
    assert lines["params (M)"].split()[-4:] == ["↓", "134.52", "33.63", "0.25x"]
    assert lines["perplexity"].split()[-4:] == ["↓", "8.00", "10.00", "1.25x"]
    assert lines["peak memory (MB)"].split()[-3:] == ["210.0", "—", "—"]
    assert lines["decode tok/s"].split()[-4:] == ["↑", "40.0", "120.0", "3.00x"]
    assert lines["KL to teacher"].split()[-3:] == ["↓", "0.0000", "0.8123"]  # no ratio where teacher is 0 by definition
    assert lines["top-1 agreement"].split()[-3:] == ["↑", "1.000", "0.620"]
    assert lines["speedup (student/teacher decode tok/s)"].endswith("3.00x")
    assert lines["quality % of teacher"].endswith("77.5%")
    assert lines["compression (student/teacher params)"].endswith("0.250")


def test_format_table_of_an_empty_report():
    table = format_table(build_report({}, {}, meta={}))
    # teacher and student on every row, student/teacher where it is shown, every ratio
    # optional metrics (not in METRIC_KEYS) appear only when a model has them
    required = [r for r in ROWS if r.key in METRIC_KEYS]
    assert table.count("—") == 2 * len(required) + sum(r.show_ratio for r in required) + len(RATIOS)
