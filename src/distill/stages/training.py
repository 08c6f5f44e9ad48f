"""The train stage: models, data, teacher signal, optimizer and resume state from the recipe, then the loop."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.data.packing import check_packing_support, collate_packed, fill_ratio, pack_examples
from distill.data.tokenize import collate, padding_id
from distill.errors import DistillError
from distill.losses.hidden import HiddenStateMatcher, check_layer_map, default_layer_map
from distill.losses.objective import LossSettings
from distill.losses.preference import KtoSettings, PreferenceSettings
from distill.models import check_tokenizers, count_params, load_tokenizer, output_head, save_model
from distill.models.compat import tokenizer_difference
from distill.models.heads import base_model, decoder_layers
from distill.models.weight_files import check_model_dir
from distill.recipe import MethodSpec, Recipe, ScoringTeacherSpec
from distill.runtime import main_process_first, set_seed
from distill.signals.cache import dataset_hash, example_hash, read_header
from distill.signals.cross_tokenizer import CrossTokenizerSamples
from distill.signals.reader import TeacherCacheReader, open_teacher_cache
from distill.signals.routed import HIDDEN_WITH_TEACHERS, RoutedTeacher
from distill.signals.teacher_signal import (
    HIDDEN_WITH_CACHE,
    PACKING_WITH_CACHE,
    CachedTeacher,
    LiveTeacher,
    ServedTeacher,
    TeacherSignal,
)
from distill.stages.cross_tokenizer import Crossing, cross_samples, crossing, crossing_signal
from distill.stages.data import TrainingSet, encode, recipe_examples, route
from distill.stages.facts import (
    cache_path,
    compute_dtype,
    device,
    load_teacher,
    model_key,
    model_source,
    named_by,
    needs_teacher_weights,
    run_files,
    scores_on_server,
    teacher_backend,
    teacher_files,
    teacher_id,
    teacher_tokenizer,
    uses_teacher_cache,
)
from distill.stages.kto import labelled_hash, labelled_training_items
from distill.stages.pairs import check_pairs, pair_training_items
from distill.stages.student import initial_student, own_tokenizer
from distill.teachers.local import stop_ids
from distill.training.distributed import LossThroughWrapper, Ranks
from distill.training.checkpoint import (
    STEP_PREFIX,
    list_checkpoints,
    load_trainer_state,
    load_weights,
    read_best,
    read_best_weights,
)
from distill.training.held_out import BestSoFar, HeldOut
from distill.training.loop import LoopSettings, MetricsLog, Training, check_finite, last_logged_loss, run_loop
from distill.training.on_policy import ResponseSampler, SamplingSettings
from distill.training.vllm_sampler import VLLMStudentSampler, write_engine_model
from distill.training.preference import KtoObjective, PairItem, PairObjective, collate_labelled, collate_pairs
from distill.training.schedule import lr_multiplier
from distill.training.step import BatchObjective
from distill.training.trackers import check_trackers, open_trackers

log = logging.getLogger("distill")

CROSS_WITH_TEACHERS = ("method.teachers: scoring teachers need the student's tokenizer; a student on another "
                       "tokenizer learns from teacher alone")
# Tokenized by the served teacher and by teacher.model's tokenizer: the ids must be the same.
SERVED_TOP_K = 20  # top log-probs asked of a served teacher per position (at most teacher.cache_k)
SERVED_TOKENIZER_PROBE = "Distillation check: Hello, world! 123 + 4.5 = 127.5 — naïve café ☕."


@dataclass
class TrainResult:
    """What a finished training call made: the student's directory, its steps, last loss and seconds."""

    student_dir: Path
    steps: int
    final_loss: float
    seconds: float


VLLM_ONE_PROCESS = ("method.sampling.engine: vllm samples in one training process; train on one process (no "
                    "train.parallel, no torchrun), or use engine: transformers")


def train(
    recipe: Recipe, *, resume: bool = True, progress: bool = True, stop_after: Optional[int] = None
) -> Optional[TrainResult]:
    """Train the recipe's student, continuing from the newest checkpoint in <run>/checkpoints when resuming.

    `stop_after` ends this call after that many completed steps (checkpointing first), as a kill would;
    it returns None then and a later call resumes.
    """
    check_recipe(recipe)  # before any model is loaded
    files = run_files(recipe)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    set_seed(recipe.seed)
    checkpoints = list_checkpoints(files.checkpoints) if resume else []
    finished = _finished_student(recipe, checkpoints)
    if finished is not None:
        return finished
    training, start = setup(recipe, checkpoints[-1] if checkpoints else None)
    began = time.perf_counter()
    try:
        last = run_loop(training, start, stop_after=stop_after, progress=progress)
    finally:
        if training.metrics is not None:
            training.metrics.close()
    if last is None:
        return None
    ranks = training.ranks
    weights = ranks.whole_weights(training.student)  # whole (gathered by every rank under FSDP, ZeRO-3)
    if not ranks.main:
        ranks.wait()  # rank 0 saves the student
        return TrainResult(student_dir=files.student, steps=recipe.train.steps, final_loss=last, seconds=0.0)
    stopped = training.best.stopped if training.best is not None else None
    if start == recipe.train.steps or (stopped is not None and stopped <= start):
        last = last_logged_loss(files.metrics)  # nothing left to train: the loss is the one logged last
    check_finite(weights)
    steps = stopped or recipe.train.steps
    if training.best is not None:
        weights = _keep_best(training, files, weights)
    # The matcher's projections stay behind.
    save_model(training.student, training.tokenizer, files.student, state_dict=weights if ranks.sharded else None)
    training.ranks.wait()
    seconds = time.perf_counter() - began
    log.info("student saved to %s (%d steps, final loss %.4f, %.0f s)", files.student, steps, last, seconds)
    return TrainResult(student_dir=files.student, steps=steps, final_loss=last, seconds=seconds)


def _keep_best(training: Training, files, last: dict) -> dict:
    """train.keep_best: the last step's student (whole weights `last`) goes to student_last/; the best step's weights
    are returned, and loaded into the student unless FSDP shards it (then they are saved from the returned dict)."""
    best, fsdp = training.best, training.ranks.sharded
    save_model(training.student, training.tokenizer, files.student_last, state_dict=last if fsdp else None)
    if best.weights is None:
        log.warning("train.keep_best: no finite %s was measured; %s is the last step's", best.metric, files.student)
        return last
    if not fsdp:
        training.student.load_state_dict(best.weights)
    log.info("train.keep_best: %s is step %d (%s %.4f); the last step's student is in %s", files.student,
             best.step, best.metric, best.value, files.student_last)
    return best.weights


def setup(recipe: Recipe, checkpoint: Optional[Path]) -> tuple[Training, int]:
    """Everything the loop needs, from the recipe, resumed from `checkpoint` when given; and the step to start at."""
    t, files = recipe.train, run_files(recipe)
    ranks = Ranks(device(recipe), t.parallel, t.batch_size, t.grad_accum, t.max_grad_norm)
    ranks.check_batch(t.batch_size)
    if recipe.method.kind == "on_policy" and recipe.method.sampling.engine == "vllm" and ranks.world > 1:
        raise DistillError(VLLM_ONE_PROCESS)
    examples, held_out = recipe_examples(recipe)  # a malformed data file fails before any model is built
    _check_held_out(recipe, held_out)
    # Under torchrun rank 0 loads first: it writes student_init/ and a GGUF model's dequantized copy, the others read.
    with main_process_first():
        tokenizer, teacher, student, cross = _models(recipe)
    if t.packing:
        for model, name in ((student, "student"), (teacher, "teacher")):
            if model is not None:
                check_packing_support(model, name)
    pair_objective = preference_objective(recipe.method, ranks.mean)
    signal, items, to_batch, data_hash = _what_batches_draw(recipe, examples, held_out, tokenizer, teacher, student,
                                                           cross, pair_objective is not None)
    if t.lora is not None:
        student = _apply_lora(student, recipe)
    student.train()
    matcher = hidden_matcher(recipe, student, teacher)
    if checkpoint is not None:
        load_weights(checkpoint, student, matcher)  # whole tensors, before FSDP shards them
    wrapped = ranks.wrap(LossThroughWrapper(student, matcher), decoder_layers(student) if ranks.fsdp else [])
    if teacher is not None and ranks.fsdp:
        ranks.shard_frozen(decoder_layers(teacher))
    trainable, optimizer, scheduler = _optimization(recipe, student, matcher)
    start = 0
    if checkpoint is not None:
        start = load_trainer_state(checkpoint, optimizer, scheduler, data_hash, ranks.sharded_optimizer_state)
        log.info("resumed from %s (step %d of %d)", checkpoint, start, t.steps)
    wrapped, optimizer = ranks.prepare(wrapped, optimizer)  # ZeRO: DeepSpeed's engine (takes the resumed state)
    settings = LoopSettings(steps=t.steps, batch_size=t.batch_size, grad_accum=t.grad_accum, seed=recipe.seed,
                            max_grad_norm=t.max_grad_norm, log_every=t.log_every, checkpoint_every=t.checkpoint_every,
                            keep_checkpoints=t.keep_checkpoints, nan_tolerance=t.nan_tolerance,
                            training_set=data_hash, eval_every=eval_interval(recipe, held_out), patience=t.patience)
    training = Training(
        student=student, tokenizer=tokenizer, signal=signal, matcher=matcher, objective=batch_objective(recipe.method),
        compute_dtype=compute_dtype(recipe), device=device(recipe), items=items, to_batch=to_batch,
        pad_id=padding_id(tokenizer), trainable=trainable, optimizer=optimizer, scheduler=scheduler,
        checkpoint_dir=files.checkpoints, ranks=ranks, wrapped=wrapped,
        metrics=MetricsLog(files.metrics, start, trackers(recipe)) if ranks.main else None, settings=settings,
        pair_objective=pair_objective,
        sampler=response_sampler(recipe, student, teacher, tokenizer, cross_samples(recipe, cross, signal, examples),
                                 synced=ranks.sharded),
        held_out=held_out_batches(recipe, tokenizer, held_out, signal) if settings.eval_every else None,
        best=best_so_far(recipe, checkpoint, start, partial(ranks.kept_copy, student)),
    )
    return training, start


def _optimization(recipe: Recipe, student: torch.nn.Module, matcher: Optional[torch.nn.Module]):
    """(trainable parameters, AdamW, the learning-rate schedule), built after FSDP has sharded the parameters."""
    t = recipe.train
    # Student parameters first, so the optimizer state's layout is the same as without method.hidden.
    trainable = [p for p in student.parameters() if p.requires_grad]
    trainable += list(matcher.parameters()) if matcher is not None else []
    optimizer = _optimizer(trainable, recipe)
    factor = lr_multiplier(t.schedule, total_steps=t.steps, warmup_steps=t.warmup_steps,
                           min_ratio=t.min_lr_ratio, decay_fraction=t.decay_fraction)
    return trainable, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trackers(recipe: Recipe) -> list:
    """The started trackers of train.report_to (rank 0's), given the recipe as their configuration."""
    files = run_files(recipe)
    return open_trackers(recipe.train.report_to, tensorboard_dir=files.tensorboard, mlflow_dir=files.mlruns,
                         wandb_dir=files.trackers, run_name=files.tracker_run_name,
                         config=recipe.model_dump(mode="json"))


def response_sampler(
    recipe: Recipe, student: PreTrainedModel, teacher: Optional[PreTrainedModel], tokenizer: PreTrainedTokenizerBase,
    across: Optional[CrossTokenizerSamples] = None, synced: bool = False,
) -> Optional[ResponseSampler]:
    """method.kind on_policy's sampler of the student's (and with seq_kd the teacher's) responses, rebuilt as text
    for the teacher with `across` (tokenizers that differ); else None. `synced`: the ranks generate in step (FSDP)."""
    m = recipe.method
    if m.kind != "on_policy":
        return None
    s = m.sampling
    if m.estimator == "sampled_token" and s.temperature != 1.0:
        log.warning("method.estimator sampled_token estimates KL(student || teacher) only on samples at "
                    "temperature 1; method.sampling.temperature is %g", s.temperature)
    settings = SamplingSettings(lmbda=m.lmbda, seq_kd=m.seq_kd, max_new_tokens=s.max_new_tokens,
                                temperature=s.temperature, top_p=s.top_p, stop=tuple(s.stop),
                                max_length=recipe.data.max_length, seed=recipe.seed)
    log.info("on-policy: the student answers %.0f%% of micro-batches (up to %d new tokens, temperature %g); "
             "loss %s on its samples", 100 * m.lmbda, s.max_new_tokens, s.temperature,
             m.divergence if m.estimator == "full" else "sampled-token reverse-KL estimate")
    return ResponseSampler(settings, tokenizer, sorted(stop_ids(base_model(student), tokenizer)),
                           padding_id(tokenizer), teacher=teacher, compute_dtype=compute_dtype(recipe), across=across,
                           synced=synced, engine=student_engine(recipe, student, tokenizer))


def student_engine(
    recipe: Recipe, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> Optional[VLLMStudentSampler]:
    """method.sampling.engine: vllm's engine, built from the student's config and tokenizer; else None."""
    s = recipe.method.sampling
    if s.engine != "vllm":
        return None
    model_dir = write_engine_model(base_model(student), tokenizer, run_files(recipe).sampler_model)
    log.info("on-policy: the student samples through vLLM (weights reloaded after each update)")
    return VLLMStudentSampler(model_dir, dtype=str(compute_dtype(recipe)).removeprefix("torch."), seed=recipe.seed,
                              max_model_len=recipe.data.max_length,
                              gpu_memory_utilization=s.vllm_gpu_memory_utilization)


def eval_interval(recipe: Recipe, held_out: list) -> int:
    """Steps between held-out evaluations: train.eval_every, by default the checkpoint interval (0: none)."""
    every = recipe.train.eval_every
    if every is None:
        return recipe.train.checkpoint_every if held_out else 0
    return every


def held_out_batches(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase, held_out: list, signal: Optional[TeacherSignal]
) -> HeldOut:
    """The first train.eval_batches batches of the held-out examples `distill eval` measures, as training encodes
    them; the live teacher scores them (a teacher cache holds rows for the training examples only)."""
    t = recipe.train
    encoded = encode(recipe, held_out[: t.eval_batches * t.batch_size], tokenizer)
    pad_id = padding_id(tokenizer)
    batches = [collate(encoded[i:i + t.batch_size], pad_id) for i in range(0, len(encoded), t.batch_size)]
    live = signal if isinstance(signal, LiveTeacher) else None
    if isinstance(signal, RoutedTeacher) and all(isinstance(t, LiveTeacher) for t in signal.teachers):
        live = RoutedTeacher(signal.teachers, routes(recipe, held_out, encoded))  # the held-out rows' own teachers
    if live is None and recipe.method.kind == "kd":
        log.info("held-out evaluation: cross-entropy only (the teacher cache has no rows for held-out examples)")
    return HeldOut(batches=batches, signal=live)


def best_so_far(recipe: Recipe, checkpoint: Optional[Path], start: int,
                student_copy: Callable[[], Optional[dict[str, torch.Tensor]]]) -> Optional[BestSoFar]:
    """train.keep_best's best-so-far: fresh, or as the resumed checkpoint kept it (with its weights; when the best
    is the checkpoint's own step, `student_copy()`, the loaded student's)."""
    metric = recipe.train.keep_best
    if metric is None:
        return None
    state = read_best(checkpoint) if checkpoint is not None else None
    if state is None or state["metric"] != metric:
        return BestSoFar(metric)
    weights = read_best_weights(checkpoint)
    if weights is None and state.get("step") == start:  # the best is the checkpoint's own step
        weights = student_copy()
    return BestSoFar.from_state(state, weights)


def _check_held_out(recipe: Recipe, held_out: list) -> None:
    """Held-out evaluation asked for with no held-out example: one line, before any model loads."""
    t = recipe.train
    if held_out or not (t.eval_every or t.keep_best):
        return
    key = "train.keep_best" if t.keep_best else "train.eval_every"
    raise DistillError(f"{key}: the recipe's data has no held-out examples to evaluate on; set data.eval or "
                       "data.eval_fraction > 0 (with at least 2 examples)")


def _what_batches_draw(
    recipe: Recipe, examples: list, held_out: list, tokenizer: PreTrainedTokenizerBase,
    teacher: Optional[PreTrainedModel], student: PreTrainedModel, cross: Optional[Crossing], pairs: bool,
) -> tuple[Optional[TeacherSignal], list, object, str]:
    """(teacher signal, batch items, collate function, training-set hash): preference pairs for method.kind dpo
    (labelled answers for kto; built by the pairs stage), else the encoded examples with the teacher signal of their
    tokenizers."""
    if pairs and recipe.method.kind == "kto":
        items = labelled_training_items(recipe, student, tokenizer)
        return None, items, collate_labelled, labelled_hash(items)
    if pairs:
        items = pair_training_items(recipe, student, tokenizer)
        return None, items, collate_pairs, pairs_hash(items)
    data = TrainingSet(examples, held_out, encode(recipe, examples, tokenizer))
    if cross is None:
        signal = teacher_signal(recipe, teacher, tokenizer, data.encoded)
        if recipe.method.teachers and signal is not None:
            with main_process_first():  # as _models: rank 0 writes a GGUF teacher's dequantized copy first
                signal = routed_teacher(recipe, signal, tokenizer, routes(recipe, data.examples, data.encoded))
    else:
        signal = crossing_signal(recipe, cross, teacher, student.config.vocab_size, data)
    items, to_batch = _batch_items(recipe, data)
    return signal, items, to_batch, training_set_hash(data)


def _batch_items(recipe: Recipe, data: TrainingSet) -> tuple[list, object]:
    """What batches draw from: encoded examples, or with train.packing rows of several examples."""
    if not recipe.train.packing:
        return data.encoded, collate
    length = recipe.data.max_length
    rows = pack_examples(data.encoded, length, recipe.seed)
    log.info("packing: %d examples in %d rows of %d tokens (%.0f%% filled)", len(data.encoded), len(rows), length,
             100 * fill_ratio(rows, length))
    return rows, collate_packed


def batch_objective(m: MethodSpec) -> BatchObjective:
    """The recipe's method section as the loss every micro-batch takes."""
    loss = LossSettings(divergence=m.divergence, temperature=m.temperature, alpha=m.alpha, beta=m.beta, skew=m.skew,
                        chunk_size=m.chunk_size, weighting=m.weighting, weighting_floor=m.weighting_floor,
                        weighting_temperature=m.weighting_temperature)
    return BatchObjective(loss, kd=m.learns_from_teacher_logits, estimator=m.estimator,
                          hidden_weight=m.hidden.weight if m.hidden is not None else None)


def preference_objective(
    m: MethodSpec, mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] = torch.mean
) -> Optional[PairObjective | KtoObjective]:
    """method.kind: dpo's pair loss (kto's labelled-answer loss, its reference point averaged by `mean_over_ranks`)
    from the method section; None for the other kinds."""
    if m.kind == "kto":
        return KtoObjective(KtoSettings(beta=m.beta, desirable_weight=m.desirable_weight,
                                        undesirable_weight=m.undesirable_weight, chunk_size=m.chunk_size),
                            mean_over_ranks)
    if m.kind != "dpo":
        return None
    return PairObjective(PreferenceSettings(loss=m.loss, beta=m.beta, label_smoothing=m.label_smoothing,
                                            simpo_gamma=m.simpo_gamma, sft_weight=m.sft_weight,
                                            chunk_size=m.chunk_size))


def pairs_hash(items: list[PairItem]) -> str:
    """One hash of every pair's tokens and reference log-probs (kept in checkpoints, like training_set_hash)."""
    return dataset_hash([example_hash(i.chosen.input_ids + i.rejected.input_ids, i.chosen.labels + i.rejected.labels)
                         + f":{i.ref_chosen!r}:{i.ref_rejected!r}" for i in items])


def training_set_hash(data: TrainingSet) -> str:
    """One hash of every encoded training example: checkpoints keep it, so a resume on other data is refused."""
    return dataset_hash([example_hash(e.input_ids, e.labels) for e in data.encoded])


def _finished_student(recipe: Recipe, checkpoints: list[Path]) -> Optional[TrainResult]:
    """The saved student when its last step is already trained: a re-run neither loads models nor re-saves it
    (re-saving would make every export look older than the student)."""
    files = run_files(recipe)
    if not checkpoints:
        return None
    stopped_early = (read_best(checkpoints[-1]) or {}).get("stopped") is not None  # train.patience ran out
    steps = int(checkpoints[-1].name[len(STEP_PREFIX):])
    if steps != recipe.train.steps and not stopped_early:
        return None
    saved = (files.student / "config.json").is_file()
    if not saved or files.student.stat().st_mtime < checkpoints[-1].stat().st_mtime:
        return None  # killed between the last checkpoint and saving the student: save it again
    log.info("student already trained (%d steps): %s", steps, files.student)
    return TrainResult(student_dir=files.student, steps=steps, final_loss=last_logged_loss(files.metrics), seconds=0.0)


def teacher_signal(
    recipe: Recipe, teacher: Optional[PreTrainedModel], tokenizer: PreTrainedTokenizerBase, encoded: list
) -> Optional[TeacherSignal]:
    """The recipe's teacher signal, built once: its teacher.cache, the live or served teacher, or None (SFT)."""
    if scores_on_server(recipe):
        return served_teacher(recipe, tokenizer)
    if uses_teacher_cache(recipe):
        reader = open_recipe_cache(recipe, tokenizer, encoded)
        log.info("teacher: top-%d cache %s (the teacher is not run)", reader.cache.header.k, reader.cache.path)
        return CachedTeacher(reader)
    return LiveTeacher(teacher) if teacher is not None else None


def served_teacher(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase, spec: Optional[ScoringTeacherSpec] = None,
    key: str = "teacher.endpoint",
) -> ServedTeacher:
    """teacher.endpoint (or a scoring teacher's `spec`, named by `key`) as the scorer of the student's samples,
    refused unless it tokenizes text as we do."""
    backend = teacher_backend(recipe, spec, tokenizer_needed=True)
    with named_by(key):
        served = backend.echoed_ids(SERVED_TOKENIZER_PROBE)
    ours = list(tokenizer(SERVED_TOKENIZER_PROBE)["input_ids"])
    if served != ours:
        raise DistillError(f"{key}: the served teacher tokenizes text differently from teacher.model's "
                           f"tokenizer, which the student uses ({len(served)} vs {len(ours)} tokens for a probe "
                           "sentence); on-policy distillation needs the same tokenizer on both sides")
    # OpenAI's and vLLM's default limit on logprobs is 20 (vLLM: raise it with --max-logprobs).
    k = min(recipe.teacher.cache_k, SERVED_TOP_K) if recipe.method.estimator == "full" else 0
    log.info("teacher: %s scores the student's samples (%s)", (spec or recipe.teacher).endpoint,
             f"top-{k} log-probs" if k else "each sampled token's log-prob")
    return ServedTeacher(backend, k, len(tokenizer))


def routed_teacher(
    recipe: Recipe, main: TeacherSignal, tokenizer: PreTrainedTokenizerBase, route_of: list[int]
) -> RoutedTeacher:
    """method.teachers and `main` (the recipe's teacher, last) as one signal routing each example's rows by tag."""
    scorers = [_scoring_teacher(recipe, spec, i, tokenizer) for i, spec in enumerate(recipe.method.teachers)]
    shares = [route_of.count(i) for i in range(len(scorers) + 1)]
    log.info("scoring teachers (examples routed by tag): %s; teacher: %d",
             ", ".join(f"{spec.model}: {n}" for spec, n in zip(recipe.method.teachers, shares)), shares[-1])
    return RoutedTeacher([*scorers, main], route_of)


def _scoring_teacher(
    recipe: Recipe, spec: ScoringTeacherSpec, i: int, tokenizer: PreTrainedTokenizerBase
) -> TeacherSignal:
    """method.teachers[i]: served (refused unless it tokenizes text as we do), or loaded frozen once."""
    if spec.endpoint is not None:
        return served_teacher(recipe, tokenizer, spec, f"method.teachers[{i}].endpoint")
    key = model_key(recipe, spec)
    model = load_teacher(recipe, spec)
    rows = output_head(model).size(0)
    if rows < len(tokenizer):
        raise DistillError(f"{key}: its output head has {rows} rows but the tokenizer has {len(tokenizer)} tokens")
    return LiveTeacher(model)


def _check_scoring_tokenizers(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> None:
    """Every local scoring teacher's tokenizer is teacher.model's (the student's), checked before any model loads."""
    for spec in recipe.method.teachers:
        if spec.endpoint is not None:
            continue  # a served one is asked to tokenize a probe when its signal is built
        key = model_key(recipe, spec)
        with named_by(key):
            theirs = load_tokenizer(*model_source(recipe, spec), trust_remote_code=spec.trust_remote_code)
        difference = tokenizer_difference(tokenizer, theirs)
        if difference is not None:
            raise DistillError(f"{key}: its tokenizer differs from teacher.model's, which the student uses "
                               f"({difference}); every scoring teacher needs the student's tokenizer")


def routes(recipe: Recipe, examples: list, encoded: list) -> list[int]:
    """Per encoded example, the index of its scoring teacher: the first of method.teachers whose tags its example
    has, else len(method.teachers) (the recipe's teacher)."""
    tags = {e.id: e.tags for e in examples}
    return [route(recipe.method.teachers, tags.get(e.id, [])) for e in encoded]


def open_recipe_cache(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, encoded: list) -> TeacherCacheReader:
    """The recipe's teacher cache for these encoded examples, refused unless it is complete and theirs."""
    return open_teacher_cache(cache_path(recipe), teacher_id(recipe), tokenizer, encoded, teacher_files(recipe))


def hidden_matcher(
    recipe: Recipe, student: torch.nn.Module, teacher: Optional[torch.nn.Module]
) -> Optional[HiddenStateMatcher]:
    """The projections for method.hidden (None when it is off); the map follows how the student was pruned."""
    spec = recipe.method.hidden
    if spec is None:
        return None
    check_recipe(recipe)
    student_config, teacher_config = _text_config(base_model(student)), _text_config(base_model(teacher))
    pruned_from = getattr(base_model(student).config, "distill_pruned_from", None) or {}
    n_student, n_teacher = len(decoder_layers(student)), len(decoder_layers(teacher))
    if spec.layer_map is not None:
        layer_map = check_layer_map(spec.layer_map, n_student, n_teacher)
    else:
        layer_map = default_layer_map(n_student, n_teacher, pruned_from.get("teacher_layers"))
    matcher = HiddenStateMatcher(
        layer_map, student_config.hidden_size, teacher_config.hidden_size, spec.loss,
        hidden_channels=pruned_from.get("hidden_channels"), seed=recipe.seed,
    )
    log.info("hidden-state KD (%s, weight %g): student->teacher layers %s", spec.loss, spec.weight, layer_map)
    return matcher.to(next(student.parameters()).device)


def check_recipe(recipe: Recipe) -> None:
    """Combinations the trainer cannot run, refused before any model loads."""
    check_pairs(recipe)
    m = recipe.method
    if m.hidden is not None and not m.learns_from_teacher_logits:
        raise DistillError(
            f"method.hidden: hidden-state KD needs the teacher's states (method.kind: kd or on_policy), "
            f"got method.kind: {m.kind}"
        )
    if m.kind == "on_policy" and recipe.teacher.cache is not None:
        raise DistillError("teacher.cache: method.kind on_policy needs a teacher that scores the student's new "
                           "samples, which a cache cannot; remove teacher.cache (or use method.kind: kd)")
    if m.kind == "on_policy" and m.sampling.engine == "vllm" and recipe.train.parallel != "ddp":  # ddp: if launched
        raise DistillError(VLLM_ONE_PROCESS)
    if m.kind == "on_policy" and recipe.train.packing:
        raise DistillError("train.packing: method.kind on_policy samples a response per example; set "
                           "train.packing: false")
    if scores_on_server(recipe) and (m.seq_kd or m.hidden is not None):
        key = "method.seq_kd" if m.seq_kd else "method.hidden"
        raise DistillError(f"{key}: needs a local teacher; a served teacher (teacher.endpoint) only scores the "
                           "student's samples")
    if m.estimator != "full" and m.kind != "on_policy":
        raise DistillError(f"method.estimator: {m.estimator} applies to the student's own samples "
                           f"(method.kind: on_policy), got method.kind: {m.kind}")
    if recipe.method.hidden is not None and uses_teacher_cache(recipe):
        raise DistillError(HIDDEN_WITH_CACHE)
    if recipe.train.packing and uses_teacher_cache(recipe):
        raise DistillError(PACKING_WITH_CACHE)
    _check_scoring_teachers(recipe)
    _check_keep_best(recipe)
    check_trackers(recipe.train.report_to or [])


def _check_scoring_teachers(recipe: Recipe) -> None:
    """method.teachers with what routes rows to one teacher alone, refused before any model loads."""
    m = recipe.method
    if not m.teachers:
        return
    refusals = [
        (uses_teacher_cache(recipe), "teacher.cache: method.teachers score live, and a cache holds one teacher's "
                                     "top-k; remove teacher.cache"),
        (m.hidden is not None, HIDDEN_WITH_TEACHERS),
        (m.seq_kd, "method.seq_kd: the teacher alone samples responses; method.teachers only score, so remove one"),
        (recipe.train.packing, "train.packing: method.teachers routes whole examples; set train.packing: false"),
        (recipe.train.parallel == "fsdp", "train.parallel: fsdp shards the teacher, which method.teachers do not "
                                          "support yet; use ddp"),
        (recipe.student.tokenizer is not None, CROSS_WITH_TEACHERS),
    ]
    for refused, line in refusals:
        if refused:
            raise DistillError(line)
    served = next((i for i, t in enumerate(m.teachers) if t.endpoint is not None), None)
    if served is not None and m.kind != "on_policy":
        raise DistillError(f"method.teachers[{served}].endpoint: a served teacher scores the student's samples "
                           f"(method.kind: on_policy), got method.kind: {m.kind}")


def _check_keep_best(recipe: Recipe) -> None:
    """train.keep_best naming a held-out metric this run cannot measure; and evaluations with no held-out split."""
    t, d = recipe.train, recipe.data
    if (t.eval_every or t.keep_best) and d.eval is None and d.eval_fraction == 0:
        key = "train.keep_best" if t.keep_best else "train.eval_every"
        raise DistillError(f"{key}: the recipe has no held-out split to evaluate on; set data.eval or "
                           "data.eval_fraction > 0")
    if t.keep_best is None:
        return
    if recipe.method.kind != "kd" and t.keep_best not in ("eval_loss", "eval_ce"):
        raise DistillError(f"train.keep_best: {t.keep_best} needs a teacher, which method.kind: "
                           f"{recipe.method.kind} does not use; choose eval_loss or eval_ce")
    if recipe.method.kind == "kd" and uses_teacher_cache(recipe) and t.keep_best != "eval_ce":
        raise DistillError(f"train.keep_best: {t.keep_best} needs the teacher on the held-out examples, and "
                           "teacher.cache holds rows for the training examples only; choose eval_ce, or train "
                           "from the live teacher")


def _text_config(model: torch.nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _optimizer(params: list[torch.nn.Parameter], recipe: Recipe) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases and other 1-D parameters."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    t = recipe.train
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas))


def _apply_lora(model: PreTrainedModel, recipe: Recipe) -> PreTrainedModel:
    lora = recipe.train.lora
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [m for m in lora.target_modules if m in present]
    if not targets:
        raise DistillError(f"train.lora.target_modules: none of {lora.target_modules} exist in the student")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _models(
    recipe: Recipe,
) -> tuple[PreTrainedTokenizerBase, Optional[PreTrainedModel], PreTrainedModel, Optional[Crossing]]:
    """(the student's tokenizer, frozen teacher or None when the loss needs none, fp32 student, the crossing when
    the two tokenizers differ) as the recipe describes them."""
    tokenizer, cross, student, student_tok = teacher_tokenizer(recipe), None, None, None
    _check_scoring_tokenizers(recipe, tokenizer)
    if recipe.student.model is not None:  # an existing student's own tokenizer
        path, gguf = model_source(recipe, recipe.student)
        with named_by("student.model"):
            if gguf is None and Path(path).is_dir():
                check_model_dir(path)  # a directory that is no model: that line, not the tokenizer loader's
            student_tok = load_tokenizer(path, gguf)
    elif recipe.student.tokenizer is not None:  # a new student on a tokenizer of its own (student.tokenizer)
        student_tok = own_tokenizer(recipe, tokenizer)
    if student_tok is not None:
        cross = crossing(recipe, tokenizer, student_tok)  # refuses a method that cannot apply, before any model
        if cross is not None and recipe.method.teachers:
            raise DistillError(CROSS_WITH_TEACHERS)
    if recipe.student.model is not None:  # an existing student needs no teacher
        student = initial_student(recipe, None, tokenizer)
    text_only = cross is not None and not cross.logits
    # a new student is built from the teacher's shape and embeddings even when only its text is learnt
    teacher = load_teacher(recipe) if needs_teacher_weights(recipe) and (not text_only or student is None) else None
    if student is None:
        student = initial_student(recipe, teacher, tokenizer)
    if student_tok is not None:
        if recipe.method.learns_from_teacher_logits and cross is None:
            check_tokenizers(tokenizer, student_tok, _teacher_vocab(recipe, teacher), student.config.vocab_size)
        else:
            tokenizer = student_tok
    _log_sizes(student, teacher)
    if (not recipe.method.learns_from_teacher_logits or uses_teacher_cache(recipe) or scores_on_server(recipe)
            or text_only):
        teacher = None  # its weights only seeded the student's embeddings
    return tokenizer, teacher, student, cross


def _teacher_vocab(recipe: Recipe, teacher: Optional[PreTrainedModel]) -> int:
    if teacher is not None:
        return teacher.config.vocab_size
    if scores_on_server(recipe):
        return len(teacher_tokenizer(recipe))
    return read_header(cache_path(recipe)).vocab_size


def _log_sizes(student: PreTrainedModel, teacher: Optional[PreTrainedModel]) -> None:
    n = count_params(student)
    share = f" ({100 * n / count_params(teacher):.1f}% of the teacher's)" if teacher is not None else ""
    log.info("student: %.2fM parameters%s", n / 1e6, share)
