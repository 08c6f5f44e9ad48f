"""The eval stage: teacher and trained student on the same held-out data -> report.json and a table."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from distill.errors import DistillError
from distill.eval.metrics import agreement, decode_speed, model_size, peak_memory_mb, perplexity, rouge_l
from distill.recipe import Recipe
from distill.runtime import atomic_write_text, resolve_device, resolve_dtype

log = logging.getLogger("distill")

GENERAL_TEXT = Path(__file__).parent / "data" / "general.txt"


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


@dataclass
class EvalData:
    """What every model is measured on: held-out batches, general text, and the prompts with references."""

    batches: Callable[[], Iterator[dict]]
    general: Callable[[], Iterator[dict]] | None
    text: Callable[[], Iterator[dict]] | None
    conversations: list
    references: list[str]


@dataclass
class Reference:
    """What every model is compared with: the teacher, its answers, the eval data and the shared vocabulary."""

    teacher: torch.nn.Module
    tokenizer: object
    data: EvalData
    shared_vocab: int
    device: torch.device
    teacher_answers: list[str]  # the teacher's greedy answers to data.conversations


def evaluate_run(recipe: Recipe, *, progress: bool = True) -> dict:
    """Measure teacher and student; write <run>/report.json and <run>/samples.jsonl; print the table."""
    from distill.data.splits import recipe_examples
    from distill.eval.exports import measure_exports
    from distill.eval.report import build_report, write_report
    from distill.eval.suites import load_suite
    from distill.models import check_tokenizers, load_model, load_tokenizer
    from distill.models.from_recipe import load_teacher, teacher_tokenizer, trained_student_dir
    from distill.report.table import format_table

    device = resolve_device(recipe.train.device)
    dtype = resolve_dtype(recipe.train.dtype, device)
    student_dir = trained_student_dir(recipe)
    if not (student_dir / "config.json").is_file():
        raise DistillError(f"{student_dir}: no trained student; run `distill train` (or `distill run`) first")
    suites = [load_suite(name) for name in recipe.eval.suites]  # a bad suite fails before any model loads
    lm_eval_tasks = _lm_eval_tasks(recipe)
    tokenizer = teacher_tokenizer(recipe)
    teacher = load_teacher(recipe, device, dtype)
    student = load_model(str(student_dir), dtype=dtype, device=device)
    shared_vocab = check_tokenizers(tokenizer, load_tokenizer(str(student_dir)), teacher.config.vocab_size,
                                    student.config.vocab_size)
    train_examples, held_out = recipe_examples(recipe)
    if not held_out:
        raise DistillError("eval: no held-out examples; set data.eval or data.eval_fraction > 0")
    data = _eval_data(recipe, tokenizer, held_out, device)

    started = time.perf_counter()
    teacher_answers = _answers(teacher, tokenizer, data.conversations, recipe, "teacher answers", progress)
    student_answers = _answers(student, tokenizer, data.conversations, recipe, "student answers", progress)
    reference = Reference(teacher, tokenizer, data, shared_vocab, device, teacher_answers)
    rows = {
        "teacher": measure_model(recipe, teacher, _local_weights(recipe), teacher_answers, reference),
        "student": measure_model(recipe, student, student_dir, student_answers, reference),
    }

    _write_samples(recipe.run_dir / "samples.jsonl", data.conversations, data.references, teacher_answers,
                   student_answers)
    meta = {"recipe": str(recipe.run_dir / "recipe.yaml"), "eval_examples": len(held_out),
            "eval_answers": len(data.references), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "shared_vocab": shared_vocab, "text_files": recipe.data.text_files}
    calibration = _calibration_section(rows)
    report = build_report(rows["teacher"], rows["student"], meta=meta)
    report.update(calibration)
    report.update(_before_training(recipe, teacher, tokenizer, data, shared_vocab, device, dtype))
    report.update(_suite_sections(recipe, suites, {"teacher": teacher, "student": student}, tokenizer, progress))
    report.update(_judge_section(recipe, teacher, tokenizer, data, student_answers, teacher_answers))
    report.update(_contamination_section(recipe, train_examples, held_out))
    report.update(_lm_eval_section(recipe, lm_eval_tasks, {"teacher": teacher, "student": student}, tokenizer))
    report.update(measure_exports(recipe, reference, report["teacher"], student_dir, dtype, progress))
    report["meta"]["eval_seconds"] = round(time.perf_counter() - started, 1)
    write_report(report, recipe.run_dir / "report.json")
    print(format_table(report))
    log.info("report written to %s", recipe.run_dir / "report.json")
    return report


def _eval_data(recipe: Recipe, tokenizer, held_out: list, device: torch.device) -> EvalData:
    from distill.data.tokenize import encode_all, padding_id

    encoded = encode_all(held_out, tokenizer, recipe.data.max_length, recipe.data.system_prompt)
    pad_id, size = padding_id(tokenizer), recipe.eval.batch_size
    text, general = _text_files(recipe, tokenizer), _general_text(recipe, tokenizer)
    pairs = [p for p in map(_prompt_and_reference, held_out) if p is not None]
    return EvalData(
        batches=lambda: _batches(encoded, size, pad_id, device),
        general=(lambda: _batches(general, size, pad_id, device)) if general else None,
        text=(lambda: _batches(text, size, pad_id, device)) if text else None,
        conversations=[p[0] for p in pairs], references=[p[1] for p in pairs],
    )


def measure_model(recipe: Recipe, model, model_dir: Path | None, answers: list[str], ref: Reference, *,
                  speed: bool = True) -> dict:
    """One model's row of report.json: size, quality, agreement with the teacher, ROUGE-L of its answers, speed."""
    row = _measure(recipe, model, model_dir, ref.teacher, ref.tokenizer, ref.data, ref.shared_vocab, ref.device)
    row["weight_bytes"] = weight_bytes(model)
    row["rougeL_ref"] = _mean([rouge_l(a, r) for a, r in zip(answers, ref.data.references)])
    row["rougeL_teacher"] = _mean([rouge_l(a, t) for a, t in zip(answers, ref.teacher_answers)])
    if speed and recipe.eval.measure_speed:
        row.update(_speed(recipe, model, ref.tokenizer, ref.device, row["weight_bytes"]))
    return row


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters in memory, each once; a quantized tensor counts the tensors it is made of."""
    return sum(_tensor_bytes(p) for p in model.parameters())


def _tensor_bytes(tensor: torch.Tensor) -> int:
    # A quanto weight reports its float element size; its int8/packed int4 data and scales are what it holds.
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _measure(recipe, model, model_dir, teacher, tokenizer, data: EvalData, shared_vocab, device) -> dict:
    """Size, perplexities, agreement with the teacher and calibration of one model."""
    from distill.eval.calibration import next_token_calibration

    row = dict(model_size(model, model_dir))
    row["perplexity"] = perplexity(model, data.batches())["perplexity"]
    if data.general is not None:
        row["perplexity_general"] = perplexity(model, data.general())["perplexity"]
    if data.text is not None:
        row["perplexity_text"] = perplexity(model, data.text())["perplexity"]
    agree = agreement(model, teacher, data.batches(), shared_vocab)
    row["top1_agreement"], row["kl_to_teacher"] = agree["top1_agreement"], agree["kl_to_teacher"]
    if recipe.eval.calibration:
        calibration = next_token_calibration(model, data.batches())
        row["ece"], row["calibration"] = calibration["ece"], calibration
    return row


def _speed(recipe: Recipe, model, tokenizer, device: torch.device, weight_bytes: int) -> dict:
    """Prefill/decode tokens per second and time to first token at each eval.speed_batch_sizes; peak memory."""
    e, out = recipe.eval, {}
    threads = torch.get_num_threads()
    if e.speed_threads is not None:  # fewer threads than cores: steadier numbers on a shared machine
        torch.set_num_threads(e.speed_threads)
    try:
        for size in e.speed_batch_sizes:
            speed, extra_mb = peak_memory_mb(lambda: decode_speed(
                model, tokenizer, prompt_tokens=e.speed_prompt_tokens, new_tokens=e.speed_new_tokens,
                batch_size=size), device=device)
            suffix = "" if size == e.speed_batch_sizes[0] else f"_b{size}"
            out.update({f"{key}{suffix}": value for key, value in speed.items()})
            out[f"peak_memory_mb{suffix}"] = weight_bytes / 2**20 + extra_mb
        if device.type == "cpu":
            out["speed_threads"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    return out


def _before_training(recipe: Recipe, teacher, tokenizer, data: EvalData, shared_vocab, device, dtype) -> dict:
    """The student as built, before distillation (when the recipe built one): what training recovered."""
    from distill.models import load_model
    from distill.models.from_recipe import student_init_dir

    init_dir = student_init_dir(recipe)
    if not recipe.eval.before_training or not (init_dir / "config.json").is_file():
        return {}
    model = load_model(str(init_dir), dtype=dtype, device=device)
    row = {"perplexity": perplexity(model, data.batches())["perplexity"]}
    if data.general is not None:
        row["perplexity_general"] = perplexity(model, data.general())["perplexity"]
    agree = agreement(model, teacher, data.batches(), shared_vocab)
    row.update(top1_agreement=agree["top1_agreement"], kl_to_teacher=agree["kl_to_teacher"])
    return {"student_init": {k: _finite_or_none(v) for k, v in row.items()}}


def _calibration_section(rows: dict) -> dict:
    """Move the reliability bins out of the metric rows into report["calibration"] (for the diagram)."""
    section = {side: row.pop("calibration") for side, row in rows.items() if "calibration" in row}
    return {"calibration": section} if section else {}


def _suite_sections(recipe: Recipe, suites: list, models: dict, tokenizer, progress: bool) -> dict:
    """Scores of every suite task for teacher and student; per-item rows go to <run>/suite_samples.jsonl."""
    from distill.eval.suites import run_suite

    if not suites:
        return {}
    scores: dict = {side: {} for side in models}
    items = []
    for suite in suites:
        for side, model in models.items():
            result = run_suite(suite, model, tokenizer, batch_size=recipe.eval.batch_size, progress=progress)
            scores[side][suite.name] = result["scores"]
            for task, task_result in result["tasks"].items():
                items += [{"model": side, "suite": suite.name, "task": task, **row}
                          for row in task_result.get("items", [])]
    atomic_write_text(recipe.run_dir / "suite_samples.jsonl",
                      "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))
    return {"suites": scores}


def _judge_section(recipe: Recipe, teacher, tokenizer, data: EvalData, student_answers, teacher_answers) -> dict:
    """Pairwise win rate of the student's answers against the teacher's, judged by eval.judge's model."""
    from distill.eval.judge import pairwise_judge
    from distill.teachers.backend import SamplingParams, as_judge

    spec = recipe.eval.judge
    if spec is None:
        return {}
    backend = _judge_backend(recipe, teacher, tokenizer)
    items = [{"prompt": c[-1]["content"], "answer_a": s, "answer_b": t}
             for c, s, t in zip(data.conversations, student_answers, teacher_answers)][: spec.max_items]
    result = pairwise_judge(as_judge(backend, SamplingParams(max_new_tokens=spec.max_new_tokens)), items, spec.rubric)
    atomic_write_text(recipe.run_dir / "judge.jsonl",
                      "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in result.pop("items")))
    result["judge"] = backend.name
    result["prompt"] = result["template"]
    return {"judge": result}


def _judge_backend(recipe: Recipe, teacher, tokenizer):
    from distill.teachers.backend import LocalBackend

    spec = recipe.eval.judge
    endpoint = spec.endpoint or (recipe.teacher.endpoint if spec.model is None else None)
    if endpoint is not None:
        from distill.teachers.openai_client import OpenAIBackend

        api_key_env = spec.api_key_env or (recipe.teacher.api_key_env if spec.endpoint is None else None)
        return OpenAIBackend(endpoint, spec.model or recipe.teacher.model, api_key_env=api_key_env)
    if spec.model is not None:
        from distill.models import load_model, load_tokenizer

        return LocalBackend(load_model(spec.model), load_tokenizer(spec.model), name=spec.model,
                            batch_size=recipe.eval.batch_size)
    return LocalBackend(teacher, tokenizer, name=recipe.teacher.model, batch_size=recipe.eval.batch_size)


def _contamination_section(recipe: Recipe, train_examples: list, held_out: list) -> dict:
    """Eval items that share an n-gram with the training data: a warning with counts and examples."""
    from distill.data.contamination import NgramIndex

    n = recipe.eval.contamination_ngram
    index = NgramIndex.from_texts([_example_text(e) for e in train_examples], n)
    matches = index.overlaps_many([_example_text(e) for e in held_out])
    flagged = [(e, hits) for e, hits in zip(held_out, matches) if hits]
    if flagged:
        log.warning("eval: %d of %d held-out examples share a %d-gram with the training data (e.g. %s)",
                    len(flagged), len(held_out), n, flagged[0][0].id)
    return {"contamination": {
        "ngram": n, "eval_items": len(held_out), "overlapping": len(flagged),
        "examples": [{"id": e.id, "text": _example_text(e)[:200], "training_matches": len(hits)}
                     for e, hits in flagged[:5]],
    }}


def _lm_eval_tasks(recipe: Recipe) -> list:
    from distill.eval.lm_eval_bridge import parse_task_specs

    return parse_task_specs(recipe.eval.lm_eval) if recipe.eval.lm_eval else []


def _lm_eval_section(recipe: Recipe, tasks: list, models: dict, tokenizer) -> dict:
    """lm-evaluation-harness results for teacher and student, under report["lm_eval"]."""
    from importlib.metadata import version

    from distill.eval.lm_eval_bridge import run_lm_eval

    if not tasks:
        return {}
    e = recipe.eval
    section = {"version": version("lm_eval"), "tasks": e.lm_eval, "limit": e.lm_eval_limit,
               "num_fewshot": e.lm_eval_fewshot}
    for side, model in models.items():
        section[side] = run_lm_eval(model, tokenizer, tasks, limit=e.lm_eval_limit, batch_size=e.batch_size,
                                    num_fewshot=e.lm_eval_fewshot)
    return {"lm_eval": section}


def _example_text(example) -> str:
    return example.text if example.text is not None else "\n".join(m["content"] for m in example.messages)


def _finite_or_none(value):
    return value if value is None or math.isfinite(value) else None


def _local_weights(recipe: Recipe) -> Path | None:
    """The teacher's weights on disk (directory or .gguf file), for its size; None for a hub id."""
    from distill.models.from_recipe import model_source

    path, gguf = model_source(recipe, recipe.teacher)
    local = Path(path) / gguf if gguf else Path(path)
    return local if local.exists() else None


def _general_text(recipe: Recipe, tokenizer) -> list:
    """distill's own general-knowledge paragraphs, outside any distillation domain (eval.general_text)."""
    from distill.data.examples import read_examples
    from distill.data.tokenize import encode_all

    if not recipe.eval.general_text:
        return []
    return encode_all(read_examples(GENERAL_TEXT), tokenizer, recipe.data.max_length, None)


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
