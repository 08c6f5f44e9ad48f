"""Calibration: does a model's confidence match how often it is right? ECE and reliability bins."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from transformers import PreTrainedModel

from distill.eval.metrics import CHUNK_POSITIONS, Batch, scored_logits

DEFAULT_BINS = 15


def _as_tensors(confidences: Sequence[float] | torch.Tensor, correct: Sequence[bool] | torch.Tensor):
    conf = torch.as_tensor(confidences, dtype=torch.float64).flatten().cpu()
    hits = torch.as_tensor(correct, dtype=torch.float64).flatten().cpu()
    if conf.shape != hits.shape:
        raise ValueError(f"calibration: {conf.numel()} confidences but {hits.numel()} correctness flags")
    if conf.numel() and (conf.min() < 0 or conf.max() > 1):
        raise ValueError("calibration: confidences must lie in [0, 1]")
    return conf, hits


def bin_totals(confidences, correct, bins: int = DEFAULT_BINS) -> torch.Tensor:
    """[3, bins] float64: count, sum of confidences and number correct per equal-width bin of [0, 1].

    Bin i holds confidences in [i / bins, (i + 1) / bins); 1.0 goes to the last bin. Totals of several
    calls add up, so long evaluations need not keep every confidence.
    """
    if bins < 1:
        raise ValueError("calibration: bins must be at least 1")
    conf, hits = _as_tensors(confidences, correct)
    # bucketize against the edges i / bins (not floor(conf * bins)): a confidence equal to an edge, as
    # written, lands in the bin that starts there despite float rounding
    edges = torch.tensor([i / bins for i in range(1, bins)], dtype=torch.float64)
    index = torch.bucketize(conf, edges, right=True)
    return torch.stack([
        torch.bincount(index, minlength=bins).double(),
        torch.bincount(index, weights=conf, minlength=bins),
        torch.bincount(index, weights=hits, minlength=bins),
    ])


def bins_from_totals(totals: torch.Tensor) -> list[dict]:
    """Reliability bins (lo, hi, count, mean confidence, accuracy; None for an empty bin) from bin_totals."""
    count, conf_sum, hit_sum = totals.tolist()
    bins = len(count)
    return [
        {
            "lo": i / bins,
            "hi": (i + 1) / bins,
            "count": int(count[i]),
            "confidence": conf_sum[i] / count[i] if count[i] else None,
            "accuracy": hit_sum[i] / count[i] if count[i] else None,
        }
        for i in range(bins)
    ]


def ece_from_totals(totals: torch.Tensor) -> float | None:
    """Expected calibration error from bin_totals; None when there is nothing to measure."""
    count, conf_sum, hit_sum = totals
    n = float(count.sum())
    # count * |mean confidence - accuracy| == |sum of confidences - number correct|, per bin
    return float((conf_sum - hit_sum).abs().sum()) / n if n else None


def expected_calibration_error(
    confidences: Sequence[float] | torch.Tensor, correct: Sequence[bool] | torch.Tensor, bins: int = DEFAULT_BINS
) -> float:
    """Mean over equal-width bins, weighted by their counts, of |mean confidence - accuracy|."""
    ece = ece_from_totals(bin_totals(confidences, correct, bins))
    if ece is None:
        raise ValueError("expected_calibration_error: no predictions")
    return ece


def reliability_bins(
    confidences: Sequence[float] | torch.Tensor, correct: Sequence[bool] | torch.Tensor, bins: int = DEFAULT_BINS
) -> list[dict]:
    """Per equal-width bin: lo, hi, count, mean confidence and accuracy (None for an empty bin)."""
    return bins_from_totals(bin_totals(confidences, correct, bins))


@torch.inference_mode()
def next_token_calibration(
    model: PreTrainedModel, batches: Iterable[Batch], bins: int = DEFAULT_BINS
) -> dict:
    """Calibration of next-token prediction: top-1 probability vs whether top-1 is the actual next token.

    Batches are those `distill.eval.metrics.perplexity` takes; only labelled positions count.
    """
    model.eval()
    totals = torch.zeros(3, bins, dtype=torch.float64)
    for batch in batches:
        logits, targets = scored_logits(model, batch)
        for start in range(0, len(targets), CHUNK_POSITIONS):
            rows = slice(start, start + CHUNK_POSITIONS)
            top_prob, top_id = torch.softmax(logits[rows].float(), dim=-1).max(-1)
            totals += bin_totals(top_prob, top_id == targets[rows], bins)
    count, conf_sum, hit_sum = totals.sum(-1).tolist()
    return {
        "ece": ece_from_totals(totals),
        "n": int(count),
        "confidence": conf_sum / count if count else None,
        "accuracy": hit_sum / count if count else None,
        "bins": bins_from_totals(totals),
    }
