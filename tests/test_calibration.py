"""distill.eval.calibration: ECE and reliability bins by hand, next-token calibration against a direct reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import STORIES260K, TINYSTORIES_TEXT, require_shared
from distill.eval.calibration import (
    bin_totals,
    ece_from_totals,
    expected_calibration_error,
    next_token_calibration,
    reliability_bins,
)
from distill.eval.metrics import perplexity

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "Two plus two is four, and three times three is nine.",
]


# ---------------------------------------------------------------- ECE and bins by hand


def test_ece_hand_computed():
    # bins of width 0.2: [0.9, 0.9] -> conf 0.9, acc 0.5; [0.6] -> 0.6 vs 1; [0.2] -> 0.2 vs 0
    # ECE = (2 * 0.4 + 1 * 0.4 + 1 * 0.2) / 4 = 0.35
    assert expected_calibration_error([0.9, 0.9, 0.6, 0.2], [1, 0, 1, 0], bins=5) == pytest.approx(0.35)


def test_ece_of_a_perfectly_calibrated_and_a_confidently_wrong_model():
    assert expected_calibration_error([0.75] * 4, [1, 1, 1, 0], bins=10) == pytest.approx(0.0)
    assert expected_calibration_error([1.0, 1.0], [False, False]) == pytest.approx(1.0)


def test_ece_with_one_bin_is_the_gap_between_mean_confidence_and_accuracy():
    conf, hits = [0.1, 0.5, 0.8, 0.95], [0, 1, 1, 1]
    assert expected_calibration_error(conf, hits, bins=1) == pytest.approx(abs(sum(conf) / 4 - 3 / 4))


def test_reliability_bins_hand_computed():
    bins = reliability_bins([0.05, 0.3, 0.35, 1.0, 0.5], [0, 1, 0, 1, 1], bins=4)
    assert [(b["lo"], b["hi"]) for b in bins] == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert [b["count"] for b in bins] == [1, 2, 1, 1]  # 0.5 opens the third bin; 1.0 closes the last
    assert bins[0]["confidence"] == pytest.approx(0.05) and bins[0]["accuracy"] == 0.0
    assert bins[1]["confidence"] == pytest.approx(0.325) and bins[1]["accuracy"] == 0.5
    assert bins[3]["confidence"] == 1.0 and bins[3]["accuracy"] == 1.0


def test_empty_bins_have_no_confidence_or_accuracy():
    bins = reliability_bins([0.95], [1], bins=3)
    assert [b["count"] for b in bins] == [0, 0, 1]
    assert bins[0]["confidence"] is None and bins[0]["accuracy"] is None


def test_a_confidence_on_a_bin_edge_opens_that_bin():
    # 1/49 * 49 rounds to 0.999..., so floor(conf * bins) would put it in bin 0
    assert [b["count"] for b in reliability_bins([1 / 49], [1], bins=49)][:2] == [0, 1]


def test_bin_totals_of_parts_add_up_to_the_whole():
    conf, hits = [0.1, 0.4, 0.45, 0.9, 0.99, 0.6], [0, 1, 0, 1, 1, 0]
    parts = bin_totals(conf[:2], hits[:2], 10) + bin_totals(conf[2:], hits[2:], 10)
    assert torch.equal(parts, bin_totals(conf, hits, 10))
    assert ece_from_totals(parts) == pytest.approx(expected_calibration_error(conf, hits, bins=10))


@pytest.mark.parametrize(
    ("confidences", "correct", "message"),
    [([0.5, 0.5], [1], "2 confidences but 1"), ([1.5], [1], r"\[0, 1\]"), ([], [], "no predictions")],
)
def test_bad_inputs_are_rejected(confidences, correct, message):
    with pytest.raises(ValueError, match=message):
        expected_calibration_error(confidences, correct)


# ---------------------------------------------------------------- next-token calibration


def make_batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded batch with every real token labelled (padding -100), as perplexity takes it."""
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention_mask[i, : len(r)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def reference_confidences(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 probability and whether it was right at every labelled position, from full float64 softmaxes."""
    confs, hits = [], []
    for batch in batches:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        probs = F.softmax(logits[:, :-1].double(), dim=-1)
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        top_prob, top_id = probs[keep].max(-1)
        confs.append(top_prob)
        hits.append(top_id == targets[keep])
    return torch.cat(confs), torch.cat(hits)


def test_next_token_calibration_matches_a_direct_reference(tiny_teacher_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    batches = [make_batch(tokenizer, TEXTS[:2]), make_batch(tokenizer, TEXTS[2:])]
    assert (batches[0]["attention_mask"] == 0).any(), "the fixture batch should contain padding"
    conf, hits = reference_confidences(model, batches)

    result = next_token_calibration(model, batches, bins=10)
    assert result["n"] == len(conf) == perplexity(model, batches)["tokens"]
    assert result["ece"] == pytest.approx(expected_calibration_error(conf, hits, bins=10), abs=1e-6)
    assert result["confidence"] == pytest.approx(float(conf.mean()), abs=1e-6)
    assert result["accuracy"] == pytest.approx(float(hits.double().mean()))
    assert [b["count"] for b in result["bins"]] == [b["count"] for b in reliability_bins(conf, hits, bins=10)]


def test_next_token_calibration_with_nothing_labelled(tiny_teacher_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    batch = make_batch(tokenizer, TEXTS[:1])
    batch["labels"][:] = -100
    result = next_token_calibration(model, [batch])
    assert result["n"] == 0 and result["ece"] is None and result["accuracy"] is None
    assert len(result["bins"]) == 15


def test_stories260k_is_better_than_chance_and_its_ece_matches_its_bins():
    model = AutoModelForCausalLM.from_pretrained(require_shared(STORIES260K)).eval()
    tokenizer = AutoTokenizer.from_pretrained(STORIES260K)
    paragraphs = require_shared(TINYSTORIES_TEXT).read_text().split("\n\n")[2000:2004]
    result = next_token_calibration(model, [make_batch(tokenizer, paragraphs)])
    assert result["n"] > 200
    # a trained model predicts the next token of a story far more often than 1 in its 512 tokens
    assert result["accuracy"] > 0.2
    from_bins = sum(b["count"] * abs(b["confidence"] - b["accuracy"]) for b in result["bins"] if b["count"])
    assert result["ece"] == pytest.approx(from_bins / result["n"])
    assert 0.0 <= result["ece"] < 0.5
