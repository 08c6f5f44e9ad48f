"""`distill plan`: read a recipe's models, data and settings, and predict its training cost on this machine.

The only part of distill.plan that reads the Recipe: it turns it into shapes, example lengths and a
StepSetup for the cost model (distill.plan.cost), which takes plain values.
"""
from __future__ import annotations

import random
from dataclasses import replace
from types import SimpleNamespace
from typing import Optional

import torch
from transformers import AutoConfig, PretrainedConfig

from distill.data.examples import read_examples
from distill.data.tokenize import IGNORE, encode_example
from distill.errors import DistillError
from distill.models.loading import gguf_cache_dir, load_tokenizer
from distill.models.prune import validate_width
from distill.models.student import default_intermediate_size
from distill.plan.batches import BatchStats, sample_batches
from distill.plan.cost import STRATEGIES, Plan, Sharding, StepSetup, flops_by_part, memory_at_peak, seconds_by_part
from distill.plan.shapes import ModelShape, lora_params, shape_from_config
from distill.plan.timing import baseline_rss, torch_threads
from distill.recipe import Recipe
from distill.runtime import process_rank
from distill.stages import facts
from distill.stages.chain import stage_label, stage_recipes
from distill.stages.data import recipe_examples, recipe_prompts
from distill.stages.facts import model_source, run_files, teacher_tokenizer, uses_teacher_cache
from distill.stages.presets import preset_config
from distill.teachers.local import prompt_ids

# Examples tokenised to estimate lengths when the training set is larger than this.
MAX_ENCODED_EXAMPLES = 600


def model_config(recipe: Recipe, spec) -> PretrainedConfig:
    """The transformers config of a recipe's teacher or student spec, without loading any weights."""
    path, gguf = model_source(recipe, spec)
    if gguf is not None and (gguf_cache_dir(path, gguf) / "config.json").is_file():
        path, gguf = str(gguf_cache_dir(path, gguf)), None  # the dequantised copy: no GGUF parsing
    try:
        return AutoConfig.from_pretrained(path, gguf_file=gguf, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistillError(f"could not read the config of {spec.model!r}: {first}") from None


def student_shape(recipe: Recipe, teacher: ModelShape) -> ModelShape:
    """The student's shape as the trainer will build it (distill.stages.student.initial_student)."""
    spec = recipe.student
    if spec.model is not None:
        return shape_from_config(model_config(recipe, spec))
    if spec.from_teacher is not None:
        cut = spec.from_teacher
        layers = len(cut.keep_layers) if cut.keep_layers is not None else (cut.layers or teacher.layers)
        # The pruner's own rule for the widths it keeps (and its errors for impossible ones); head size stays.
        width = validate_width(cut, SimpleNamespace(
            num_attention_heads=teacher.heads, num_key_value_heads=teacher.kv_heads, hidden_size=teacher.hidden,
            intermediate_size=teacher.intermediate))
        return replace(teacher, layers=layers, hidden=width["hidden_size"], heads=width["num_heads"],
                       kv_heads=width["num_kv_heads"], intermediate=width["intermediate_size"])
    config = spec.config or preset_config(spec.preset)
    # A new student on a tokenizer of its own has a row per token of it (distill.models.student.build_student).
    vocab = teacher.vocab if spec.tokenizer is None else len(load_tokenizer(facts.model_ref(recipe, spec.tokenizer)))
    return ModelShape(  # distill.models.student.student_llama_config
        layers=config.num_layers, hidden=config.hidden_size, heads=config.num_heads,
        kv_heads=config.num_kv_heads or config.num_heads, head_dim=config.hidden_size // config.num_heads,
        intermediate=config.intermediate_size or default_intermediate_size(config.hidden_size),
        vocab=vocab, tied=config.tie_embeddings,
    )


def teacher_online(recipe: Recipe) -> bool:
    """Whether every batch runs the teacher's forward (KD from a live teacher, not from teacher.cache)."""
    return recipe.method.learns_from_teacher_logits and not uses_teacher_cache(recipe)


def step_setup(recipe: Recipe) -> StepSetup:
    """The recipe's settings that the cost model needs."""
    method = recipe.method
    return StepSetup(teacher_online=teacher_online(recipe), grad_accum=recipe.train.grad_accum,
                     lora=recipe.train.lora, divergence=method.divergence, temperature=method.temperature,
                     alpha=method.alpha, chunk_size=method.chunk_size)


def step_flops(recipe: Recipe, teacher: ModelShape, student: ModelShape, batch: BatchStats) -> dict[str, float]:
    """Matmul FLOPs of one of the recipe's optimizer steps, by part."""
    return flops_by_part(step_setup(recipe), teacher, student, batch)


# ---------------------------------------------------------------- the batches the trainer will see


def batch_stats(recipe: Recipe, tokenizer, processes: int = 1) -> BatchStats:
    """Shapes of the micro-batches the trainer draws (its own stateless batch order over the examples); with
    several processes, of one rank's share of each (train.batch_size is the micro-batch of all of them)."""
    lengths, examples, source = _example_lengths(recipe, tokenizer)
    t = recipe.train
    sequences = t.batch_size * sequences_per_row(recipe)
    return sample_batches(lengths, examples, source, sequences, t.steps * t.grad_accum, recipe.seed, processes)


def sequences_per_row(recipe: Recipe) -> int:
    """Sequences the student runs per batch row: 2 for dpo (chosen and rejected) and kto (the answer and its
    mismatched KL answer), else 1."""
    return 2 if recipe.method.kind in ("dpo", "kto") else 1


def _example_lengths(recipe: Recipe, tokenizer) -> tuple[list[tuple[int, int]], int, str]:
    """(tokens, trained positions) per training example (or a sample), how many examples, and the source."""
    if recipe.data.prompts is not None and not run_files(recipe).teacher_data.is_dir():
        lengths = _prompt_lengths(recipe, tokenizer)
        count = len(lengths)
        source = (f"estimated: {count} prompts of data.prompts + generate.max_new_tokens="
                  f"{recipe.generate.max_new_tokens} (an upper bound; no teacher data yet)")
        if recipe.data.train is not None:
            extra = read_examples(recipe.path(recipe.data.train))
            lengths += _encoded_lengths(recipe, tokenizer, extra)
            count += len(extra)
            source += f" and {len(extra)} examples of data.train"
        return lengths, count, source
    examples, _ = recipe_examples(recipe)
    lengths = _encoded_lengths(recipe, tokenizer, examples)
    what = "teacher answers" if recipe.data.prompts is not None else "examples"
    sampled = f"a sample of {len(lengths)} of " if len(lengths) < len(examples) else ""
    source = f"measured: {sampled}{len(examples)} training {what}, tokenised with the teacher's tokenizer"
    return lengths, len(examples), source


def _encoded_lengths(recipe: Recipe, tokenizer, examples: list) -> list[tuple[int, int]]:
    if len(examples) > MAX_ENCODED_EXAMPLES:
        examples = random.Random(recipe.seed).sample(examples, MAX_ENCODED_EXAMPLES)
    lengths = []
    for example in examples:
        encoded = encode_example(example, tokenizer, recipe.data.max_length, recipe.data.system_prompt)
        if encoded is not None:  # encode_all drops these too
            lengths.append((len(encoded.input_ids), sum(x != IGNORE for x in encoded.labels[1:])))
    if not lengths:
        raise DistillError(f"no usable training examples (none has an answer token within "
                           f"data.max_length={recipe.data.max_length})")
    return lengths


def _prompt_lengths(recipe: Recipe, tokenizer) -> list[tuple[int, int]]:
    """Prompt tokens + a full-length answer (max_new_tokens and its end-of-turn token), cut at max_length."""
    prompts = recipe_prompts(recipe)  # mapped by data.fields, from files or hf:// datasets, cut to max_prompts
    answer = recipe.generate.max_new_tokens + 1
    lengths = []
    for p in prompts:
        messages = p.messages
        if recipe.data.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": recipe.data.system_prompt}] + messages
        n = len(prompt_ids(tokenizer, messages))
        total = min(n + answer, recipe.data.max_length)
        if total > n:
            lengths.append((total, total - n))
    if not lengths:
        raise DistillError(f"{recipe.data.prompts}: every prompt fills data.max_length={recipe.data.max_length}")
    return lengths


# ---------------------------------------------------------------- the plan


def processes_from_environment() -> int:
    """The process count torchrun or accelerate launch set (WORLD_SIZE), else 1."""
    return process_rank()[1]


def plan_stages(recipe: Recipe, processes: Optional[int] = None) -> list[tuple[str, Plan]]:
    """A plan per training stage (`stages:`), labelled as errors name the stage; [("", plan)] without stages.

    A later stage starts from the student the stage before trains; before that exists, its shape is the first
    stage's student (a stage changes training, not the architecture).
    """
    stages = stage_recipes(recipe)
    plans = []
    for stage in stages:
        if stage.student.model is not None and not stage.path(stage.student.model).exists():
            stage = stage.model_copy(update={"student": stages[0].student})
        plans.append((stage_label(stage), plan_recipe(stage, processes)))
    return plans


def plan_recipe(recipe: Recipe, processes: Optional[int] = None) -> Plan:
    """Predict the cost of training `recipe` on this machine; reads configs and data, loads no weights.

    With `processes` > 1 (default: WORLD_SIZE, else 1) it adds one rank's memory under DDP, FSDP and ZeRO-3.
    """
    processes = processes_from_environment() if processes is None else processes
    if processes < 1:
        raise DistillError(f"--processes {processes}: needs at least 1 process")
    t = recipe.train
    device, dtype, teacher_dtype = facts.device(recipe), facts.compute_dtype(recipe), facts.teacher_dtype(recipe)
    teacher = shape_from_config(model_config(recipe, recipe.teacher))
    student = student_shape(recipe, teacher)
    setup = step_setup(recipe)
    lora = t.lora
    trainable = lora_params(student, lora) if lora else student.params
    tokenizer = teacher_tokenizer(recipe)
    baseline = baseline_rss(with_peft=lora is not None)
    batch = batch_stats(recipe, tokenizer)
    flops = flops_by_part(setup, teacher, student, batch)
    with torch_threads(t.threads) as threads:
        seconds, rates = seconds_by_part(setup, teacher, student, batch, dtype, teacher_dtype, threads)
    memory, phase, naive, naive_peak, chunked = memory_at_peak(
        setup, teacher, student, batch, trainable, baseline, teacher_dtype)
    rank_batch = batch_stats(recipe, tokenizer, processes) if processes > 1 else None
    per_rank, per_rank_phase = {}, {}
    for strategy in STRATEGIES if rank_batch is not None else ():
        per_rank[strategy], per_rank_phase[strategy], *_ = memory_at_peak(
            setup, teacher, student, rank_batch, trainable, baseline, teacher_dtype, Sharding(strategy, processes))
    return Plan(
        teacher=teacher, student=student, teacher_params=teacher.params, student_params=student.params,
        trainable_params=trainable, teacher_online=setup.teacher_online, lora=lora is not None, batch=batch,
        grad_accum=t.grad_accum, steps=t.steps, flops=flops, memory=memory, peak_phase=phase,
        naive_logits_bytes=naive, naive_loss_peak_bytes=naive_peak, chunked_loss_peak_bytes=chunked,
        seconds=seconds, rates=rates, device=str(device), threads=threads, notes=_notes(recipe, device),
        processes=processes, rank_batch=rank_batch, per_rank=per_rank, per_rank_phase=per_rank_phase,
    )


def _notes(recipe: Recipe, device: torch.device) -> list[str]:
    """What the plan does not cover for this recipe."""
    notes = []
    if device.type != "cpu":
        notes.append(f"train.device is {device}, but the model of a step and its timings are for this CPU")
    if not teacher_online(recipe) and recipe.method.kind == "kd":
        notes.append("teacher.cache: the loss math is timed as cross-entropy alone; reading the cached top-k "
                     "targets is not modelled")
    if recipe.method.kind == "on_policy":
        notes.append(f"method.kind on_policy: the student's sampling of up to {recipe.method.sampling.max_new_tokens} "
                     f"tokens per example in {recipe.method.lmbda:.0%} of micro-batches is not modelled (it can "
                     "take as long as the step itself)")
    if sequences_per_row(recipe) == 2:
        what = "chosen and rejected" if recipe.method.kind == "dpo" else "the answer and a mismatched KL answer"
        notes.append(f"method.kind {recipe.method.kind}: each batch row is two sequences ({what}), modelled as "
                     "teacher-answer-long; building the pairs (the student's answers, the reference's log-probs) "
                     "is not modelled")
    if recipe.method.hidden is not None:
        notes.append("method.hidden (hidden-state KD) is not modelled: its projections add a little time and "
                     "memory")
    return notes
