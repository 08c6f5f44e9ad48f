"""The eval stage: teacher and trained student on the same held-out data -> report.json, samples and a table."""
from __future__ import annotations

import json
import logging
import os
import time
from importlib.metadata import version
from pathlib import Path
from typing import Optional

import torch

from distill.data.contamination import NgramIndex
from distill.data.examples import read_examples
from distill.data.layouts import Example
from distill.data.tokenize import encode_all, padding_id
from distill.errors import DistillError
from distill.eval.cross_tokenizer import token_byte_lengths
from distill.eval.judge import pairwise_judge
from distill.eval.llama_runtime import find_llama_python, llama_speed
from distill.eval.lm_eval_bridge import parse_task_specs, run_lm_eval
from distill.eval.measure import (
    GENERAL_TEXT,
    EvalData,
    MeasureSettings,
    Reading,
    Reference,
    SpanAlignment,
    answers,
    batches,
    before_training_row,
    measure_model,
)
from distill.eval.metrics import speed_prompt_ids
from distill.eval.report import build_report, write_report
from distill.eval.suites import load_suite, run_suite
from distill.export import older_than, verify_file
from distill.export.executorch import INSTALL_HINT, MAX_SEQ_LEN, executorch_installed, program_speed
from distill.export.found import Export, find_exports, load_export
from distill.models import bytes_on_disk, check_tokenizers, load_model, load_tokenizer
from distill.models.compat import tokenizer_difference
from distill.recipe import Recipe
from distill.report.table import format_table
from distill.runtime import atomic_write_text
from distill.stages.cross_tokenizer import span_alignment
from distill.stages.data import encode, recipe_examples
from distill.stages.facts import (
    compute_dtype,
    device,
    judge_backend,
    load_teacher,
    model_source,
    run_files,
    teacher_tokenizer,
)
from distill.stages.held_out_pairs import reward_accuracy_section
from distill.teachers.backend import SamplingParams, as_judge

log = logging.getLogger("distill")

SPEED_KEYS = ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s")  # a GGUF row's, from llama.cpp
# Why a GGUF export has no speed row without llama.cpp (report.json's `speed_not_measured`).
GGUF_SPEED = "transformers runs a GGUF file dequantized to float, which says nothing of its speed in llama.cpp"
# Why a .pte export's row has no held-out quality (report.json's `quality_not_measured`).
PTE_QUALITY = ("distill eval does not run an ExecuTorch program over the held-out set; its check against the student, "
               "made when it was exported, is vs_student (mean KL, top-1 agreement, greedy answers)")


def measure_settings(recipe: Recipe) -> MeasureSettings:
    """The recipe's eval section as the measurement's plain settings."""
    e = recipe.eval
    return MeasureSettings(
        batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, calibration=e.calibration,
        measure_speed=e.measure_speed, speed_prompt_tokens=e.speed_prompt_tokens,
        speed_new_tokens=e.speed_new_tokens, speed_batch_sizes=tuple(e.speed_batch_sizes),
        speed_threads=e.speed_threads,
    )


def evaluate(recipe: Recipe, *, progress: bool = True) -> dict:
    """Measure teacher and student; write <run>/report.json and <run>/samples.jsonl; print the table."""
    files = run_files(recipe)
    dtype, where = compute_dtype(recipe), device(recipe)
    if not (files.student / "config.json").is_file():
        raise DistillError(f"{files.student}: no trained student; run `distill train` (or `distill run`) first")
    suites = [load_suite(name) for name in recipe.eval.suites]  # a bad suite fails before any model loads
    lm_eval_tasks = parse_task_specs(recipe.eval.lm_eval) if recipe.eval.lm_eval else []
    tokenizer = teacher_tokenizer(recipe)
    student_tok = load_tokenizer(str(files.student))
    difference = tokenizer_difference(tokenizer, student_tok)
    teacher = load_teacher(recipe)
    student = load_model(str(files.student), dtype=dtype, device=where)
    if difference is None:
        shared_vocab = check_tokenizers(tokenizer, student_tok, teacher.config.vocab_size, student.config.vocab_size)
    else:  # each model reads the data with its own tokenizer; agreement and KL are taken on aligned spans
        log.info("eval: teacher and student tokenizers differ (%s): bits per byte compare perplexities, agreement "
                 "and KL are taken on aligned spans (docs/cross_tokenizer.md)", difference)
        shared_vocab = len(student_tok)
    train_examples, held_out = recipe_examples(recipe)
    if not held_out:
        raise DistillError("eval: no held-out examples; set data.eval or data.eval_fraction > 0")
    teacher_reading = reading(recipe, tokenizer, held_out, where)
    student_reading = teacher_reading if difference is None else reading(recipe, student_tok, held_out, where)
    spans, absent = (None, {}) if difference is None else span_alignment(recipe, tokenizer, student_tok, held_out)
    data = teacher_reading.data
    settings = measure_settings(recipe)
    tokenizers = {"teacher": tokenizer, "student": student_tok}

    started = time.perf_counter()
    teacher_answers = answers(teacher, tokenizer, data.conversations, settings, "teacher answers", progress)
    student_answers = answers(student, student_tok, data.conversations, settings, "student answers", progress)
    reference = Reference(teacher, teacher_reading, student_reading, shared_vocab, where, teacher_answers, settings,
                          spans=spans, difference=difference)
    rows = {
        "teacher": measure_model(teacher, _local_weights(recipe), teacher_answers, reference, teacher_reading),
        "student": measure_model(student, files.student, student_answers, reference, student_reading),
    }
    _write_samples(files.samples, data, teacher_answers, student_answers)
    meta = {"recipe": str(files.recipe), "eval_examples": len(held_out), "eval_answers": len(data.references),
            "device": str(where), "dtype": str(dtype).replace("torch.", ""), "text_files": recipe.data.text_files,
            **_tokenizer_meta(shared_vocab, difference, spans)}
    calibration = _calibration_section(rows)
    report = build_report(rows["teacher"], rows["student"], meta=meta, tokenizers_differ=difference is not None)
    if absent:
        report.setdefault("absent", {}).update(absent)
    report.update(calibration)
    report.update(_before_training(recipe, reference))
    report.update(_earlier_stages(recipe, reference, progress))
    report.update(_preference_section(recipe, report["student"]))
    report.update(_suite_sections(recipe, suites, {"teacher": teacher, "student": student}, tokenizers, progress))
    report.update(_judge_section(recipe, teacher, data, student_answers, teacher_answers))
    report.update(_contamination_section(recipe, train_examples, held_out))
    report.update(lm_eval_section(recipe, lm_eval_tasks, {"teacher": teacher, "student": student}, tokenizers))
    report.update(measure_exports(files.root, reference, report["teacher"], files.student, dtype, progress))
    report["meta"]["eval_seconds"] = round(time.perf_counter() - started, 1)
    write_report(report, files.report_json)
    print(format_table(report))
    log.info("report written to %s", files.report_json)
    return report


def _tokenizer_meta(shared_vocab: int, difference: Optional[str], spans: Optional[SpanAlignment]) -> dict:
    """report.json meta on the two tokenizers: the vocabulary both heads share, or how they differ and what the
    agreement on aligned spans was taken over."""
    if difference is None:
        return {"shared_vocab": shared_vocab, "tokenizer_difference": None}
    meta = {"shared_vocab": None, "tokenizer_difference": difference}
    if spans is not None:
        meta.update(aligned_groups=sum(len(v.groups) for v in spans.views), shared_entries=spans.shared_student.numel())
    return meta


def measure_exports(run_dir: Path, reference: Reference, teacher_row: dict, student_dir: Path, dtype: torch.dtype,
                    progress: bool) -> dict:
    """report.json's `exports` section (export name -> row like the student's), or {} when there are none."""
    exports = find_exports(run_dir)
    if not exports:
        return {}
    section = {}
    for export in exports:
        log.info("eval: measuring export %s", export.name)
        row = _export_row(run_dir, export, reference, teacher_row, dtype, progress)
        row["older_than_student"] = older_than(export.path, student_dir)
        if row["older_than_student"]:
            log.warning("eval: %s was written before the student was last saved; export it again to measure the "
                        "current student", export.path)
        section[export.name] = row
    return {"exports": section}


def _export_row(run_dir: Path, export: Export, ref: Reference, teacher_row: dict, dtype: torch.dtype,
                progress: bool) -> dict:
    """One export's row: loaded, answered and measured like the student, with ratios against the teacher."""
    head = {"format": export.fmt, "quant": export.quant, "path": str(export.path.relative_to(run_dir))}
    if export.kind == "executorch":
        return {**head, **_executorch_row(export.path, ref.student_reading.tokenizer, ref.settings)}
    try:
        model = load_export(export, dtype, ref.device, ref.shared_vocab)
    except DistillError as err:
        log.warning("eval: export %s not measured: %s", export.name, err)
        return {**head, "bytes_on_disk": bytes_on_disk(export.path), "error": str(err)}
    reading = ref.student_reading  # an export of the student reads with the student's tokenizer
    said = answers(model, reading.tokenizer, ref.data.conversations, ref.settings, f"{export.name} answers", progress)
    row = measure_model(model, export.path, said, ref, reading, speed=export.kind != "gguf")
    row.pop("calibration", None)  # the reliability bins are drawn for teacher and student; the ECE stays
    speed_note = {}
    if export.kind == "gguf" and ref.settings.measure_speed:
        speed_note = _llama_cpp_speed(export.path, reading.tokenizer, ref.settings)
        row.update({k: v for k, v in speed_note.items() if k in SPEED_KEYS})  # the speed columns, now llama.cpp's
    # the student's null rules and ratios, for this model
    measured = build_report(teacher_row, row, meta={}, tokenizers_differ=ref.difference is not None)
    return {**head, **measured["student"], **speed_note, "ratios": measured["ratios"]}


def _llama_cpp_speed(path: Path, tokenizer, settings: MeasureSettings) -> dict:
    """A GGUF export's speed in llama.cpp, on all threads and on one, or why it was not measured."""
    python, why_not = find_llama_python()
    if python is None:
        return {"speed_not_measured": f"{GGUF_SPEED}, and {why_not}"}
    threads = settings.speed_threads or os.cpu_count() or 1
    prompt = speed_prompt_ids(tokenizer, settings.speed_prompt_tokens)
    log.info("eval: timing %s in llama.cpp (%s threads and 1)", path.name, threads)
    try:
        speeds = llama_speed(python, path, prompt, settings.speed_new_tokens, sorted({threads, 1}, reverse=True))
    except DistillError as err:  # a file llama.cpp refuses is a finding for the report, not the end of eval
        log.warning("eval: %s", err)
        return {"speed_not_measured": str(err)}
    alone = {f"{key}_1_thread": value for key, value in speeds[1].items()}
    return {**speeds[threads], **alone, "speed_runtime": "llama.cpp", "speed_threads": threads}


def _executorch_row(path: Path, tokenizer, settings: MeasureSettings) -> dict:
    """A .pte program's row: its size, its check against the student when exported, its speed in ExecuTorch."""
    row: dict = {"bytes_on_disk": bytes_on_disk(path), "quality_not_measured": PTE_QUALITY}
    check = _program_check(path)
    if check is not None:
        row["vs_student"] = check
    if not settings.measure_speed:
        return row
    prompt = speed_prompt_ids(tokenizer, settings.speed_prompt_tokens)
    cache = (check or {}).get("cache_positions", MAX_SEQ_LEN)
    if len(prompt) + settings.speed_new_tokens > cache:
        return {**row, "speed_not_measured": f"the program's KV cache holds {cache} positions, fewer than "
                f"eval.speed_prompt_tokens + eval.speed_new_tokens ({len(prompt)} + {settings.speed_new_tokens})"}
    if not executorch_installed():
        return {**row, "speed_not_measured": INSTALL_HINT}
    log.info("eval: timing %s in ExecuTorch's runtime", path.name)
    try:
        speeds = program_speed(path, prompt, settings.speed_new_tokens)
    except RuntimeError as err:  # a program the runtime refuses is a finding for the report, not the end of eval
        why = f"ExecuTorch could not run it: {(str(err).strip().splitlines() or [type(err).__name__])[0]}"
        log.warning("eval: %s: %s", path, why)
        return {**row, "speed_not_measured": why}
    return {**row, **speeds, "speed_runtime": "ExecuTorch (XNNPACK)"}


def _program_check(path: Path) -> Optional[dict]:
    """The .verify.json `distill export` wrote beside a program, if it is there, readable and not older than it."""
    check = verify_file(path)
    if not check.is_file():
        return None
    if older_than(check, path):
        log.warning("eval: %s is older than %s (exported again without a check); not reported", check.name, path.name)
        return None
    try:
        return json.loads(check.read_text())
    except ValueError as err:
        log.warning("eval: %s: not JSON (%s); not reported", check, err)
        return None


def reading(recipe: Recipe, tokenizer, held_out: list[Example], where: torch.device) -> Reading:
    """The eval data as `tokenizer` reads it, with the bytes of each of its ids (for bits per byte)."""
    return Reading(tokenizer, eval_data(recipe, tokenizer, held_out, where), token_byte_lengths(tokenizer))


def eval_data(recipe: Recipe, tokenizer, held_out: list[Example], where: torch.device) -> EvalData:
    """The held-out batches, general and reference text, and the held-out prompts with their references."""
    encoded = encode(recipe, held_out, tokenizer)
    pad_id, size = padding_id(tokenizer), recipe.eval.batch_size
    text, general = _text_files(recipe, tokenizer), _general_text(recipe, tokenizer)
    pairs = [p for p in map(_prompt_and_reference, held_out) if p is not None]
    return EvalData(
        batches=lambda: batches(encoded, size, pad_id, where),
        general=(lambda: batches(general, size, pad_id, where)) if general else None,
        text=(lambda: batches(text, size, pad_id, where)) if text else None,
        conversations=[p[0] for p in pairs], references=[p[1] for p in pairs],
    )


def _prompt_and_reference(example: Example) -> Optional[tuple[list[dict], str]]:
    """Split a chat example into (conversation up to the last answer, that answer)."""
    messages = example.messages
    if not messages or messages[-1]["role"] != "assistant":
        return None
    return messages[:-1], messages[-1]["content"]


def _before_training(recipe: Recipe, reference: Reference) -> dict:
    """The student as built, before distillation (when the recipe built one): what training recovered."""
    init_dir = run_files(recipe).student_init
    if not recipe.eval.before_training or not (init_dir / "config.json").is_file():
        return {}
    model = load_model(str(init_dir), dtype=compute_dtype(recipe), device=reference.device)
    return {"student_init": before_training_row(model, reference)}


def _earlier_stages(recipe: Recipe, reference: Reference, progress: bool) -> dict:
    """A `stages:` recipe's student after each stage but the last (whose student is `student`), measured like it
    on the same held-out data: report.json's `stages` section, a column per stage in the table."""
    stages = recipe.training_stages()
    if recipe.stages is None:
        return {}
    section = {}
    for stage in stages[:-1]:
        path = run_files(stage).student
        if not (path / "config.json").is_file():
            log.warning("eval: stage %s has no trained student at %s; not measured", stage.stage, path)
            continue
        model = load_model(str(path), dtype=compute_dtype(recipe), device=reference.device)
        reading = reference.student_reading  # every stage's student is on the student's tokenizer
        said = answers(model, reading.tokenizer, reference.data.conversations, reference.settings,
                       f"{stage.stage} answers", progress)
        row = measure_model(model, path, said, reference, reading, speed=False)
        row.pop("calibration", None)  # the reliability bins are drawn for teacher and student; the ECE stays
        section[stage.stage] = row
    return {"stages": section, "final_stage": stages[-1].stage}


def _preference_section(recipe: Recipe, student_row: dict) -> dict:
    """A dpo run's reward accuracy and margin on held-out pairs: report.json's `preference`, and two rows of the
    student's column (reward_accuracy, reward_margin) in the table."""
    section = reward_accuracy_section(recipe)
    if not section:
        return {}
    if "reward_accuracy" in section:
        student_row.update(reward_accuracy=section["reward_accuracy"], reward_margin=section["reward_margin"])
    return {"preference": section}


def _calibration_section(rows: dict) -> dict:
    """Move the reliability bins out of the metric rows into report["calibration"] (for the diagram)."""
    section = {side: row.pop("calibration") for side, row in rows.items() if "calibration" in row}
    return {"calibration": section} if section else {}


def _suite_sections(recipe: Recipe, suites: list, models: dict, tokenizers: dict, progress: bool) -> dict:
    """Scores of every suite task for teacher and student (each with its own tokenizer); per-item rows go to
    <run>/suite_samples.jsonl."""
    if not suites:
        return {}
    scores: dict = {side: {} for side in models}
    items = []
    for suite in suites:
        for side, model in models.items():
            result = run_suite(suite, model, tokenizers[side], batch_size=recipe.eval.batch_size, progress=progress)
            scores[side][suite.name] = result["scores"]
            for task, task_result in result["tasks"].items():
                items += [{"model": side, "suite": suite.name, "task": task, **row}
                          for row in task_result.get("items", [])]
    _write_jsonl(run_files(recipe).suite_samples, items)
    return {"suites": scores}


def _judge_section(recipe: Recipe, teacher, data: EvalData, student_answers, teacher_answers) -> dict:
    """Pairwise win rate of the student's answers against the teacher's, judged by eval.judge's model."""
    spec = recipe.eval.judge
    if spec is None:
        return {}
    backend = judge_backend(recipe, model=spec.model, endpoint=spec.endpoint, api_key_env=spec.api_key_env,
                            batch_size=recipe.eval.batch_size, loaded_teacher=teacher)
    items = [{"prompt": c[-1]["content"], "answer_a": s, "answer_b": t}
             for c, s, t in zip(data.conversations, student_answers, teacher_answers)][: spec.max_items]
    result = pairwise_judge(as_judge(backend, SamplingParams(max_new_tokens=spec.max_new_tokens)), items, spec.rubric)
    _write_jsonl(run_files(recipe).judge, result.pop("items"))
    result["judge"] = backend.name
    result["prompt"] = result["template"]
    return {"judge": result}


def _contamination_section(recipe: Recipe, train_examples: list, held_out: list) -> dict:
    """Eval items that share an n-gram with the training data: a warning with counts and examples."""
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


def lm_eval_section(recipe: Recipe, tasks: list, models: dict, tokenizers: dict) -> dict:
    """lm-evaluation-harness results for teacher and student (each with its own tokenizer), under report["lm_eval"]."""
    if not tasks:
        return {}
    e = recipe.eval
    section = {"version": version("lm_eval"), "tasks": e.lm_eval, "limit": e.lm_eval_limit,
               "num_fewshot": e.lm_eval_fewshot}
    for side, model in models.items():
        section[side] = run_lm_eval(model, tokenizers[side], tasks, limit=e.lm_eval_limit, batch_size=e.batch_size,
                                    num_fewshot=e.lm_eval_fewshot)
    return {"lm_eval": section}


def _example_text(example: Example) -> str:
    return example.text if example.text is not None else "\n".join(m["content"] for m in example.messages)


def _local_weights(recipe: Recipe) -> Optional[Path]:
    """The teacher's weights on disk (directory or .gguf file), for its size; None for a hub id."""
    path, gguf = model_source(recipe, recipe.teacher)
    local = Path(path) / gguf if gguf else Path(path)
    return local if local.exists() else None


def _general_text(recipe: Recipe, tokenizer) -> list:
    """distill's own general-knowledge paragraphs, outside any distillation domain (eval.general_text)."""
    if not recipe.eval.general_text:
        return []
    return encode_all(read_examples(GENERAL_TEXT), tokenizer, recipe.data.max_length, None)


def _text_files(recipe: Recipe, tokenizer) -> list:
    """Plain reference text (data.text_files) for perplexity, encoded like training text."""
    examples = []
    for name in recipe.data.text_files:
        examples += read_examples(recipe.path(name))[: recipe.data.max_eval_examples]
    return encode_all(examples, tokenizer, recipe.data.max_length, None) if examples else []


def _write_samples(path: Path, data: EvalData, teacher_answers: list[str], student_answers: list[str]) -> None:
    rows = [{"prompt": c[-1]["content"], "reference": r, "teacher": t, "student": s}
            for c, r, t, s in zip(data.conversations, data.references, teacher_answers, student_answers)]
    _write_jsonl(path, rows)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
