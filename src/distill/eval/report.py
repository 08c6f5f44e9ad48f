"""report.json: teacher and student metrics side by side, plus the ratios between them (see docs/report.md)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from distill.runtime import atomic_write_json

# Every report names these for both models; a metric that was not measured is null.
METRIC_KEYS = (
    "params",
    "bytes_on_disk",
    "peak_memory_mb",
    "perplexity",
    "bits_per_byte",
    "top1_agreement",
    "kl_to_teacher",
    "rougeL_ref",
    "rougeL_teacher",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
)


# Ratios in units of each model's own tokens: absent, with these reasons, when the two tokenizers differ.
PER_TOKEN_RATIOS = {
    "perplexity_pct_of_teacher": "perplexity is per token and the teacher's and the student's tokens differ; "
                                 "bits_per_byte_pct_of_teacher compares them",
    "speedup": "tokens per second count each model's own tokens, which stand for different amounts of text",
}


def per_token(key: str) -> bool:
    """Whether a metric counts the model's own tokens (perplexities, tokens per second): its teacher/student ratio
    says nothing when the two tokenizers differ."""
    return key.startswith("perplexity") or "tokens_per_s" in key


def _clean(value: Any) -> Any:
    """NaN and infinities become null: JSON cannot hold them and they are not measurements."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _metrics(values: dict) -> dict:
    """The required keys first (null when absent), then whatever else the caller measured."""
    out = {key: _clean(values.get(key)) for key in METRIC_KEYS}
    out.update({key: _clean(v) for key, v in values.items() if key not in out})
    return out


def _ratio(numerator: Any, denominator: Any) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is zero."""
    # a zero numerator is a real result (a student that scores 0), not a missing one
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _pct(ratio: float | None) -> float | None:
    return None if ratio is None else 100.0 * ratio


def _ratios(teacher: dict, student: dict, tokenizers_differ: bool) -> dict[str, float | None]:
    rouge_pct = _pct(_ratio(student["rougeL_ref"], teacher["rougeL_ref"]))
    # lower perplexity (bits per byte) is better, so the teacher's goes on top: 100 means as good as the teacher
    ppl_pct = None if tokenizers_differ else _pct(_ratio(teacher["perplexity"], student["perplexity"]))
    bpb_pct = _pct(_ratio(teacher["bits_per_byte"], student["bits_per_byte"]))
    # across tokenizers perplexities are per different tokens, so quality takes bits per byte in their place
    available = [p for p in (rouge_pct, bpb_pct if tokenizers_differ else ppl_pct) if p is not None]
    speedup = None if tokenizers_differ else _ratio(student["decode_tokens_per_s"], teacher["decode_tokens_per_s"])
    return {
        "compression": _ratio(student["params"], teacher["params"]),
        "speedup": speedup,
        "rougeL_pct_of_teacher": rouge_pct,
        "perplexity_pct_of_teacher": ppl_pct,
        "bits_per_byte_pct_of_teacher": bpb_pct,
        "quality_pct_of_teacher": sum(available) / len(available) if available else None,
    }


def build_report(teacher: dict, student: dict, *, meta: dict, tokenizers_differ: bool = False) -> dict:
    """The report.json object: meta, teacher and student metrics (missing ones null), and ratios; with
    `tokenizers_differ`, the per-token ratios are null and `absent` says why."""
    teacher_metrics, student_metrics = _metrics(teacher), _metrics(student)
    report = {
        "meta": dict(meta),
        "teacher": teacher_metrics,
        "student": student_metrics,
        "ratios": _ratios(teacher_metrics, student_metrics, tokenizers_differ),
    }
    if tokenizers_differ:
        report["absent"] = {f"ratios.{key}": reason for key, reason in PER_TOKEN_RATIOS.items()}
    return report


def write_report(report: dict, path: str | Path) -> None:
    """Write report.json atomically (readers never see half a file)."""
    atomic_write_json(path, report)
