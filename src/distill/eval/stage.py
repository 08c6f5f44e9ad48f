"""The eval stage: teacher and trained student on the same held-out data -> report.json and a table."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from distill.errors import DistillError
from distill.recipe import Recipe
from distill.runtime import atomic_write_text, resolve_device, resolve_dtype

log = logging.getLogger("distill")


def _batches(encoded: list, batch_size: int, pad_id: int, device: torch.device) -> Iterator[dict]:
    from distill.data.tokenize import collate

    for start in range(0, len(encoded), batch_size):
        yield {k: v.to(device) for k, v in collate(encoded[start:start + batch_size], pad_id).items()}


def _prompt_and_reference(example) -> tuple[list[dict], str] | None:
    """Split a chat example into (conversation up to the last answer, that answer)."""
    messages = example.messages
    if not messages or messages[-1]["role"] != "assistant":
        return None
    return messages[:-1], messages[-1]["content"]


def _answers(model, tokenizer, conversations: list, recipe: Recipe, desc: str, progress: bool) -> list[str]:
    from distill.teachers.local import generate_texts

    size, out = recipe.eval.batch_size, []
    for start in tqdm(range(0, len(conversations), size), desc=desc, disable=not progress, leave=False):
        chunk = conversations[start:start + size]
        out += [g.text for g in generate_texts(model, tokenizer, chunk, max_new_tokens=recipe.eval.max_new_tokens)]
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate_run(recipe: Recipe, *, progress: bool = True) -> dict:
    """Measure teacher and student; write <run>/report.json and <run>/samples.jsonl; print the table."""
    from distill.data.splits import recipe_examples
    from distill.data.tokenize import encode_all, padding_id
    from distill.eval.metrics import agreement, decode_speed, model_size, peak_memory_mb, perplexity, rouge_l
    from distill.eval.report import build_report, write_report
    from distill.models import check_tokenizers, load_model, load_tokenizer
    from distill.models.from_recipe import load_teacher, teacher_tokenizer, trained_student_dir
    from distill.report.table import format_table

    device = resolve_device(recipe.train.device)
    dtype = resolve_dtype(recipe.train.dtype, device)
    student_dir = trained_student_dir(recipe)
    if not (student_dir / "config.json").is_file():
        raise DistillError(f"{student_dir}: no trained student; run `distill train` (or `distill run`) first")
    tokenizer = teacher_tokenizer(recipe)
    teacher = load_teacher(recipe, device, dtype)
    student = load_model(str(student_dir), dtype=dtype, device=device)
    shared_vocab = check_tokenizers(tokenizer, load_tokenizer(str(student_dir)), teacher.config.vocab_size,
                                    student.config.vocab_size)

    _, held_out = recipe_examples(recipe)
    if not held_out:
        raise DistillError("eval: no held-out examples; set data.eval or data.eval_fraction > 0")
    encoded = encode_all(held_out, tokenizer, recipe.data.max_length, recipe.data.system_prompt)
    pad_id = padding_id(tokenizer)
    batches = lambda: _batches(encoded, recipe.eval.batch_size, pad_id, device)  # noqa: E731
    pairs = [p for p in map(_prompt_and_reference, held_out) if p is not None]
    conversations, references = [p[0] for p in pairs], [p[1] for p in pairs]

    started = time.perf_counter()
    teacher_answers = _answers(teacher, tokenizer, conversations, recipe, "teacher answers", progress)
    student_answers = _answers(student, tokenizer, conversations, recipe, "student answers", progress)
    text_encoded = _text_files(recipe, tokenizer)

    rows = {}
    for name, model, answers, model_dir in (
        ("teacher", teacher, teacher_answers, _local_weights(recipe)),
        ("student", student, student_answers, student_dir),
    ):
        row = dict(model_size(model, model_dir))
        row["perplexity"] = perplexity(model, batches())["perplexity"]
        if text_encoded:
            row["perplexity_text"] = perplexity(model, _batches(text_encoded, recipe.eval.batch_size, pad_id,
                                                                device))["perplexity"]
        agree = agreement(model, teacher, batches(), shared_vocab)
        row["top1_agreement"], row["kl_to_teacher"] = agree["top1_agreement"], agree["kl_to_teacher"]
        row["rougeL_ref"] = _mean([rouge_l(a, r) for a, r in zip(answers, references)])
        row["rougeL_teacher"] = _mean([rouge_l(a, t) for a, t in zip(answers, teacher_answers)])
        if recipe.eval.measure_speed:
            e = recipe.eval
            speed, extra_mb = peak_memory_mb(lambda m=model: decode_speed(
                m, tokenizer, prompt_tokens=e.speed_prompt_tokens, new_tokens=e.speed_new_tokens), device=device)
            row.update(speed)
            row["peak_memory_mb"] = row["weight_bytes"] / 2**20 + extra_mb
        rows[name] = row

    _write_samples(recipe.run_dir / "samples.jsonl", conversations, references, teacher_answers, student_answers)
    meta = {"recipe": str(recipe.run_dir / "recipe.yaml"), "eval_examples": len(held_out),
            "eval_answers": len(pairs), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "eval_seconds": round(time.perf_counter() - started, 1), "shared_vocab": shared_vocab,
            "text_files": recipe.data.text_files}
    report = build_report(rows["teacher"], rows["student"], meta=meta)
    write_report(report, recipe.run_dir / "report.json")
    print(format_table(report))
    log.info("report written to %s", recipe.run_dir / "report.json")
    return report


def _local_weights(recipe: Recipe) -> Path | None:
    """The teacher's weights on disk (directory or .gguf file), for its size; None for a hub id."""
    from distill.models.from_recipe import model_source

    path, gguf = model_source(recipe, recipe.teacher)
    local = Path(path) / gguf if gguf else Path(path)
    return local if local.exists() else None


def _text_files(recipe: Recipe, tokenizer) -> list:
    """Plain reference text (data.text_files) for perplexity, encoded like training text."""
    from distill.data.examples import read_examples
    from distill.data.tokenize import encode_all

    examples = []
    for name in recipe.data.text_files:
        examples += read_examples(recipe.path(name))[: recipe.data.max_eval_examples]
    return encode_all(examples, tokenizer, recipe.data.max_length, None) if examples else []


def _write_samples(path: Path, conversations, references, teacher_answers, student_answers) -> None:
    rows = [
        {"prompt": c[-1]["content"], "reference": r, "teacher": t, "student": s}
        for c, r, t, s in zip(conversations, references, teacher_answers, student_answers)
    ]
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
