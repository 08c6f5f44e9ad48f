"""Measuring one model against the teacher on the eval data: size, perplexities, bits per byte, agreement,
calibration, answers, speed.

The eval stage measures teacher, student, the student before training and every export with it, each the same way.
Each model reads the data through its own tokenizer (a `Reading`); when the student's tokenizer differs from the
teacher's, agreement and KL are taken on aligned spans (`SpanAlignment`, distill.eval.cross_tokenizer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from tqdm.auto import tqdm

from distill.data.tokenize import collate
from distill.eval.calibration import next_token_calibration
from distill.eval.cross_tokenizer import aligned_agreement
from distill.eval.metrics import (
    agreement,
    decode_speed,
    model_size,
    peak_memory_mb,
    perplexity,
    repetition,
    rouge_l,
)
from distill.teachers.local import generate_texts

# distill's own general-knowledge paragraphs, outside any distillation domain (eval.general_text).
GENERAL_TEXT = Path(__file__).parent / "data" / "general.txt"


@dataclass(frozen=True)
class MeasureSettings:
    """How models are measured (the recipe's eval section, as plain values)."""

    batch_size: int = 8
    max_new_tokens: int = 64
    calibration: bool = True
    measure_speed: bool = True
    speed_prompt_tokens: int = 64
    speed_new_tokens: int = 32
    speed_batch_sizes: tuple[int, ...] = (1, 8)
    speed_threads: Optional[int] = None


@dataclass
class EvalData:
    """What every model is measured on: held-out batches, general text, and the prompts with references."""

    batches: Callable[[], Iterator[dict]]
    general: Optional[Callable[[], Iterator[dict]]]
    text: Optional[Callable[[], Iterator[dict]]]
    conversations: list
    references: list[str]


@dataclass
class Reading:
    """The eval data as one tokenizer reads it: the tokenizer, the data encoded with it, and the UTF-8 bytes each
    of its ids stands for (distill.eval.cross_tokenizer.token_byte_lengths, for bits per byte)."""

    tokenizer: object
    data: EvalData
    byte_lengths: torch.Tensor


@dataclass
class SpanAlignment:
    """The student's held-out examples as the teacher reads them too (tokenizers that differ): the teacher's view
    of each (its ids and the aligned groups) and the vocabulary entries both tokenizers share, pair by pair."""

    student_examples: list
    views: list
    shared_student: torch.Tensor
    shared_teacher: torch.Tensor
    student_pad: int
    teacher_pad: int


@dataclass
class Reference:
    """What every model is compared with: the teacher, its answers, the eval data as the teacher and as the student
    read it, and the shared vocabulary (or, when the tokenizers differ, the aligned spans)."""

    teacher: torch.nn.Module
    teacher_reading: Reading
    student_reading: Reading  # the teacher's reading when both share one tokenizer
    shared_vocab: int  # the head rows both share; with differing tokenizers, the student tokenizer's size
    device: torch.device
    teacher_answers: list[str]  # the teacher's greedy answers to data.conversations
    settings: MeasureSettings
    spans: Optional[SpanAlignment] = None  # set when the tokenizers differ and both give character offsets
    difference: Optional[str] = None  # how the tokenizers differ, in words; None when they are the same

    @property
    def tokenizer(self):
        """The teacher's tokenizer."""
        return self.teacher_reading.tokenizer

    @property
    def data(self) -> EvalData:
        """The eval data as the teacher reads it (its conversations and references are every model's)."""
        return self.teacher_reading.data


def batches(encoded: list, batch_size: int, pad_id: int, device: torch.device) -> Iterator[dict]:
    """Encoded examples as padded batches on `device`, in order."""
    for start in range(0, len(encoded), batch_size):
        yield {k: v.to(device) for k, v in collate(encoded[start:start + batch_size], pad_id).items()}


def answers(model, tokenizer, conversations: list, settings: MeasureSettings, desc: str, progress: bool) -> list[str]:
    """The model's greedy answers to the conversations, settings.batch_size at a time."""
    size, out = settings.batch_size, []
    for start in tqdm(range(0, len(conversations), size), desc=desc, disable=not progress, leave=False):
        chunk = conversations[start:start + size]
        out += [g.text for g in generate_texts(model, tokenizer, chunk, max_new_tokens=settings.max_new_tokens)]
    return out


def measure_model(model, model_dir: Optional[Path], answers: list[str], ref: Reference, reading: Reading, *,
                  speed: bool = True) -> dict:
    """One model's row of report.json: size, quality, agreement with the teacher, ROUGE-L of its answers, speed;
    the model reads the eval data as `reading` says (the teacher's or the student's tokenizer)."""
    row = quality_row(model, model_dir, ref, reading)
    row["weight_bytes"] = weight_bytes(model)
    row["rougeL_ref"] = _mean([rouge_l(a, r) for a, r in zip(answers, ref.data.references)])
    row["rougeL_teacher"] = _mean([rouge_l(a, t) for a, t in zip(answers, ref.teacher_answers)])
    row.update(repetition(answers))
    if speed and ref.settings.measure_speed:
        row.update(speed_row(model, reading.tokenizer, ref.device, row["weight_bytes"], ref.settings))
    return row


def quality_row(model, model_dir: Optional[Path], ref: Reference, reading: Reading) -> dict:
    """Size, perplexities and bits per byte, agreement with the teacher and calibration of one model."""
    row = dict(model_size(model, model_dir))
    row.update(_perplexities(model, reading))
    row.update(teacher_agreement(model, ref, reading))
    if ref.settings.calibration:
        calibration = next_token_calibration(model, reading.data.batches())
        row["ece"], row["calibration"] = calibration["ece"], calibration
    return row


def before_training_row(model, ref: Reference) -> dict:
    """The student as built, before distillation: perplexities and agreement (non-finite values as None)."""
    row = {k: v for k, v in _perplexities(model, ref.student_reading).items() if not k.endswith("_text")}
    row.update(teacher_agreement(model, ref, ref.student_reading))
    return {k: _finite_or_none(v) for k, v in row.items()}


def teacher_agreement(model, ref: Reference, reading: Reading) -> dict:
    """top1_agreement and kl_to_teacher: token by token on one tokenizer, on aligned spans across two (None when
    the tokenizers give no offsets to align by; report.json's `absent` says so)."""
    if ref.difference is None or reading is ref.teacher_reading:
        vocab = ref.shared_vocab if ref.difference is None else len(reading.tokenizer)
        agree = agreement(model, ref.teacher, reading.data.batches(), vocab)
    elif ref.spans is None:
        agree = {"top1_agreement": None, "kl_to_teacher": None}
    else:
        s = ref.spans
        agree = aligned_agreement(model, ref.teacher, s.student_examples, s.views, s.shared_student, s.shared_teacher,
                                  student_pad=s.student_pad, teacher_pad=s.teacher_pad,
                                  batch_size=ref.settings.batch_size)
    return {"top1_agreement": agree["top1_agreement"], "kl_to_teacher": agree["kl_to_teacher"]}


def _perplexities(model, reading: Reading) -> dict:
    """Perplexity and bits per byte on the held-out data, the general text and the reference text (when present)."""
    out = {}
    for suffix, batches in (("", reading.data.batches), ("_general", reading.data.general),
                            ("_text", reading.data.text)):
        if batches is not None:
            measured = perplexity(model, batches(), reading.byte_lengths)
            out[f"perplexity{suffix}"] = measured["perplexity"]
            out[f"bits_per_byte{suffix}"] = measured["bits_per_byte"]
    return out


def speed_row(model, tokenizer, device: torch.device, weight_bytes: int, settings: MeasureSettings) -> dict:
    """Prefill/decode tokens per second and time to first token at each of the speed batch sizes; peak memory."""
    out = {}
    threads = torch.get_num_threads()
    if settings.speed_threads is not None:  # fewer threads than cores: steadier numbers on a shared machine
        torch.set_num_threads(settings.speed_threads)
    try:
        for size in settings.speed_batch_sizes:
            speed, extra_mb = peak_memory_mb(lambda: decode_speed(
                model, tokenizer, prompt_tokens=settings.speed_prompt_tokens, new_tokens=settings.speed_new_tokens,
                batch_size=size), device=device)
            suffix = "" if size == settings.speed_batch_sizes[0] else f"_b{size}"
            out.update({f"{key}{suffix}": value for key, value in speed.items()})
            out[f"peak_memory_mb{suffix}"] = weight_bytes / 2**20 + extra_mb
        if device.type == "cpu":
            out["speed_threads"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    return out


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters in memory, each once; a quantized tensor counts the tensors it is made of."""
    return sum(_tensor_bytes(p) for p in model.parameters())


def _tensor_bytes(tensor: torch.Tensor) -> int:
    # A quanto weight reports its float element size; its int8/packed int4 data and scales are what it holds.
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _finite_or_none(value):
    return value if value is None or math.isfinite(value) else None
