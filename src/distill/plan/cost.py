"""The cost model of one optimizer step: FLOPs, seconds and resident memory by part, and the Plan they make.

A step is costed as the trainer runs it (distill.training.step): the student's decoder forward and backward
on every padded position, the frozen teacher's forward when KD uses a live teacher, and the chunked loss
(distill.losses.kd) on the labelled positions only, which forms logits `chunk_size` rows at a time and works
out the head's gradients in its forward pass (three `[rows, V]` matmuls for the student, one for the teacher,
no recomputation); then the embedding's gradient, gradient clipping and AdamW.

Every time is measured on this machine, on the recipe's shapes, in well under a second each: the decoders by
running 1- and 2-layer transformers models of the real widths on a few of the batch's rows (their matmuls,
attention, norms and rotary as they really run), scaled to the batch; the heads by timed matmuls; the loss
math by running the loss itself on one chunk; the optimizer on a 16 MiB tensor. FLOPs and memory are counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from distill.plan.batches import BatchStats
from distill.plan.shapes import (
    ModelShape,
    activation_floats_per_token,
    attention_flops_per_token,
    head_flops_per_token,
    linear_flops_per_token,
    lora_params,
    lora_projections,
    shared_vocab,
)
from distill.plan.timing import (
    decoder_seconds,
    dispatch_seconds,
    embedding_grad_seconds,
    linear_seconds,
    loss_seconds_per_row,
    optimizer_seconds,
)
from distill.recipe import LoraSpec

# [chunk, V] float blocks alive at the chunked loss's peak, per divergence (torch profiler counts at T = 1,
# docs/benchmarks.md "KD loss: chunked vs naive"); SFT holds logits, logsumexp's exp and the logits' grad.
LOSS_BLOCKS = {"forward_kl": 5, "tvd": 6, "reverse_kl": 7, "skew_forward_kl": 9, "skew_reverse_kl": 10, "jsd": 11}
SFT_LOSS_BLOCKS = 3
# The naive loss (full logits, F.kl_div + F.cross_entropy) holds ~7 [N, V] blocks at its peak (same source).
NAIVE_LOSS_BLOCKS = 7
# glibc keeps freed heap blocks mapped and the next step's differently sized tensors fragment them: RSS
# stays above the live tensors by about this share of the activations (0.6-0.8 on bench/bench_plan.py's
# configurations, against the same runs with MALLOC_MMAP_THRESHOLD_=65536, which unmaps every freed block).
ALLOCATOR_RETENTION = 0.7
# The trainer keeps every example as Python lists of ids and labels: two 8-byte pointers per token, and a
# 32-byte int object for each id above CPython's small-int cache (labels share the ids' objects).
DATA_BYTES_PER_TOKEN = 48


@dataclass(frozen=True)
class StepSetup:
    """The training settings a step's cost depends on, besides the two models' shapes and the batches."""

    teacher_online: bool  # every batch runs the teacher's forward (KD from a live teacher, not teacher.cache)
    grad_accum: int
    lora: Optional[LoraSpec]
    divergence: str
    temperature: float
    alpha: float
    chunk_size: int


def _attention_flops(shape: ModelShape, batch: BatchStats) -> float:
    """Forward attention FLOPs of a micro-batch: each row costs its padded length squared."""
    return attention_flops_per_token(shape, 1.0) * batch.square_tokens


def flops_by_part(setup: StepSetup, teacher: ModelShape, student: ModelShape, batch: BatchStats) -> dict[str, float]:
    """Matmul FLOPs of one optimizer step, by part (backward = 2 x forward; a frozen weight skips its grad)."""
    n, rows = batch.padded_tokens, batch.loss_rows
    lora = setup.lora
    body = linear_flops_per_token(student) * n
    attention = _attention_flops(student, batch)
    head = head_flops_per_token(student) * rows
    adapters = skipped = 0.0
    if lora:
        adapted = lora_projections(student, lora)
        adapters = 2.0 * student.layers * lora.r * sum(i + o for i, o in adapted.values()) * n
        # The frozen embedding's output needs no gradient, so layer 0's q, k and v projections (and their
        # adapters) skip their input gradients.
        first = {k: io for k, io in student.projections().items() if k in ("q_proj", "k_proj", "v_proj")}
        skipped = 2.0 * n * sum(i * o + (lora.r * i if k in adapted else 0) for k, (i, o) in first.items())
    flops = {
        "student forward": body + attention + head + adapters,
        # Backward is twice the forward (input and weight gradients), attention's too; frozen weights (LoRA's
        # base, its head) need only the input gradient.
        "student backward": (body if lora else 2 * body) + 2 * attention + (1 if lora else 2) * head
        + 2 * adapters - skipped,
    }
    if setup.teacher_online:
        flops["teacher forward"] = (
            linear_flops_per_token(teacher) * n + _attention_flops(teacher, batch)
            + head_flops_per_token(teacher, shared_vocab(teacher, student)) * rows
        )
    return {k: v * setup.grad_accum for k, v in flops.items()}


def _decoder_time(shape: ModelShape, batch: BatchStats, dtype: torch.dtype, mode: str,
                  lora: Optional[tuple[int, tuple[str, ...]]], threads: int, rates: dict[str, float],
                  name: str, flops: float) -> float:
    """Seconds of a decoder on one micro-batch: real layers timed on a few of its rows, scaled to all of them.

    Work grows with the rows; operator dispatch (measured at negligible size) does not.
    """
    seq = max(2, round(batch.seq_len))
    rows = max(1, min(batch.batch_size, math.ceil(512 / seq)))  # ~512 tokens: matmuls at full speed
    per_layer, per_call = decoder_seconds(shape, rows, seq, dtype, mode, lora, threads)
    fixed_layer, fixed_call = dispatch_seconds(mode != "frozen", threads)
    scale = batch.batch_size / rows
    layer = fixed_layer + max(per_layer - fixed_layer, 0.0) * scale
    call = fixed_call + max(per_call - fixed_call, 0.0) * scale
    seconds = shape.layers * layer + call
    rates[name] = flops / seconds
    return seconds


def _head_time(shape: ModelShape, vocab: int, rows: float, chunk: int, dtype: torch.dtype, threads: int,
               grads: bool, rates: dict[str, float], name: str) -> float:
    """Seconds of the chunked loss's head matmuls over `rows` positions, `chunk` at a time: the logits, and
    with `grads` the hidden states' and the head's gradients."""
    chunk_rows = max(1, min(chunk, round(rows)))
    cols = min(vocab, 4096)  # enough columns for the full rate; time scales linearly in V beyond
    fwd, grad_in, grad_w = linear_seconds(chunk_rows, shape.hidden, cols, dtype, threads)
    total = fwd + (grad_in + grad_w) * grads
    rates[name] = 2.0 * chunk_rows * shape.hidden * cols * (1 + 2 * grads) / total
    return total * (vocab / cols) * (rows / chunk_rows)


def seconds_by_part(
    setup: StepSetup, teacher: ModelShape, student: ModelShape, batch: BatchStats, dtype: torch.dtype,
    teacher_dtype: torch.dtype, threads: int,
) -> tuple[dict[str, float], dict[str, float]]:
    """Predicted seconds of one optimizer step by part, and the compute rates they imply (FLOP/s)."""
    n, rows = batch.padded_tokens, batch.loss_rows
    lora = None if setup.lora is None else (setup.lora.r, tuple(setup.lora.target_modules))
    rates: dict[str, float] = {}
    backward = 2 if lora is None else 1  # frozen base weights (LoRA) need no weight gradient
    student_flops = (1 + backward) * linear_flops_per_token(student) * n + 3 * _attention_flops(student, batch)
    parts = {
        "student layers (forward + backward)": _decoder_time(
            student, batch, dtype, "train" if lora is None else "lora", lora, threads, rates, "student layers",
            student_flops),
        "student head (loss matmuls)": _head_time(student, student.vocab, rows, setup.chunk_size, dtype, threads,
                                                  lora is None, rates, "student head"),
    }
    if lora is None:
        parts["student embedding gradient"] = embedding_grad_seconds(
            student.vocab, student.hidden, max(1, round(n)), student.tied, threads)
    teacher_vocab = None
    if setup.teacher_online:
        teacher_vocab = shared_vocab(teacher, student)
        teacher_flops = linear_flops_per_token(teacher) * n + _attention_flops(teacher, batch)
        parts["teacher layers (forward)"] = _decoder_time(teacher, batch, teacher_dtype, "frozen", None, threads,
                                                          rates, "teacher layers", teacher_flops)
        parts["teacher head (loss matmul)"] = _head_time(teacher, teacher_vocab, rows, setup.chunk_size,
                                                         teacher_dtype, threads, False, rates, "teacher head")
    loss_rows = max(1, min(setup.chunk_size, round(rows)))
    parts["loss math (softmax, divergence)"] = rows * loss_seconds_per_row(
        loss_rows, student.vocab, teacher_vocab, setup.divergence, setup.temperature, setup.alpha,
        lora is None, threads)
    seconds = {k: v * setup.grad_accum for k, v in parts.items()}
    per_param, per_tensor = optimizer_seconds(threads)
    if lora is None:
        trainable, tensors = student.params, student.param_tensors
    else:
        trainable = lora_params(student, setup.lora)
        tensors = 2 * student.layers * len(lora_projections(student, setup.lora))
    seconds["optimizer (clip + AdamW)"] = trainable * per_param + tensors * per_tensor
    return seconds, rates


STRATEGIES = {"ddp": "DDP", "fsdp": "FSDP", "zero3": "ZeRO-3"}


@dataclass(frozen=True)
class Sharding:
    """How `processes` ranks hold the models: `ddp` replicates them; `fsdp` (full shard, FSDP2) and `zero3`
    (DeepSpeed ZeRO-3) divide the student's weights, gradients and optimizer state by the rank count and gather
    what runs: FSDP a whole unit (the root's embeddings, head and norm, kept gathered through the step, plus one
    decoder layer), ZeRO-3 one module at a time (the largest weight tensor). FSDP shards the frozen teacher too;
    under ZeRO-3 (train.parallel: zero3) it stays whole on every rank, as DeepSpeed is given the student alone."""

    strategy: str = "ddp"
    processes: int = 1

    @property
    def share(self) -> float:
        """The part of each sharded tensor one rank keeps."""
        return 1.0 if self.strategy == "ddp" else 1.0 / self.processes

    @property
    def teacher_share(self) -> float:
        """The part of the frozen teacher one rank keeps (whole except under FSDP)."""
        return self.share if self.strategy == "fsdp" else 1.0

    def gathered_params(self, shape: ModelShape) -> int:
        """Weights a rank holds gathered at once beyond its shard (none when nothing is sharded)."""
        if self.strategy == "ddp" or self.processes == 1:
            return 0
        embeddings = shape.vocab * shape.hidden
        if self.strategy == "fsdp":
            return embeddings * (1 if shape.tied else 2) + shape.hidden + shape.layer_params
        return max(embeddings, max(i * o for i, o in shape.projections().values()))


def memory_at_peak(
    setup: StepSetup, teacher: ModelShape, student: ModelShape, batch: BatchStats, trainable: int, baseline: int,
    teacher_dtype: torch.dtype, sharding: Sharding = Sharding(),
) -> tuple[dict[str, int], str, int, int, int]:
    """(resident bytes by part at the peak, which phase peaks, naive teacher logits, naive loss peak,
    chunked loss peak) for the largest micro-batch, on one rank of `sharding` (alone by default)."""
    f32 = 4
    kd = setup.teacher_online
    share = sharding.share
    n, seq = batch.max_padded_tokens, batch.max_seq_len
    rows = min(n, round(batch.loss_rows * batch.max_padded_tokens / batch.padded_tokens))
    head_trainable = setup.lora is None
    resident = {"process baseline (torch, transformers, tokenizer)": baseline,
                "tokenised training data": round(batch.examples * batch.example_tokens * DATA_BYTES_PER_TOKEN),
                "student weights (fp32)": round(student.params * f32 * share),
                "optimizer state (AdamW m, v)": round(2 * trainable * f32 * share)}
    if kd:
        resident["teacher weights"] = round(teacher.params * teacher_dtype.itemsize * sharding.teacher_share)
    if sharding.strategy == "ddp" and sharding.processes > 1:
        # DDP all-reduces gradients through buckets that copy them (gradient_as_bucket_view is off by default).
        resident["DDP gradient buckets"] = trainable * f32
    teacher_gathered = kd and sharding.teacher_share < 1.0  # a sharded teacher gathers what runs too
    gathered = (sharding.gathered_params(student) * f32
                + teacher_gathered * sharding.gathered_params(teacher) * teacher_dtype.itemsize)
    if gathered:
        resident["gathered weights (student" + (", teacher)" if teacher_gathered else ")")] = gathered
    blocks = (LOSS_BLOCKS.get(setup.divergence, max(LOSS_BLOCKS.values())) if kd else SFT_LOSS_BLOCKS)
    blocks += setup.temperature != 1.0  # a scaled copy of the logits
    chunk = min(setup.chunk_size, rows)
    chunk_blocks = blocks * chunk * student.vocab * f32
    head_grad = student.vocab * student.hidden * f32 if head_trainable else 0
    # The loss's own buffers: the student's final states, the rows it gathers and their gradient; the teacher's.
    loss_buffers = chunk_blocks + (n + 2 * rows) * student.hidden * f32 + kd * (n + rows) * teacher.hidden * f32
    activations = activation_floats_per_token(student, seq) * n * f32
    if setup.lora is not None:  # each adapter keeps its r-wide intermediate
        adapters = len(lora_projections(student, setup.lora))
        activations += student.layers * adapters * setup.lora.r * n * f32
    resident["activations"] = round(activations)
    resident["allocator retention"] = round(ALLOCATOR_RETENTION * activations)
    accumulated = round(trainable * f32 * share) if setup.grad_accum > 1 else 0
    # Two moments compete for the peak. The end of the loss's forward: the chunk's [rows, V] blocks and the
    # head's gradient are alive. The optimizer step: every gradient, and AdamW's two temporaries the size of
    # the parameter it is updating. (Freed activations stay in the allocator's heap either way.)
    loss_forward = {"chunked loss buffers": loss_buffers, "gradients": max(head_grad, accumulated)}
    largest = max(student.vocab * student.hidden, student.intermediate * student.hidden) if head_trainable else \
        max(setup.lora.r * max(student.intermediate, student.hidden), 1)
    optimizer_step = {"gradients": round(trainable * f32 * share),
                      "optimizer temporaries": round(2 * largest * f32 * share)}
    phase, extra = max((("loss forward", loss_forward), ("optimizer step", optimizer_step)),
                       key=lambda item: sum(item[1].values()))
    memory = {**resident, **extra}
    naive_logits = n * shared_vocab(teacher, student) * f32
    naive_peak = NAIVE_LOSS_BLOCKS * n * student.vocab * f32
    return memory, phase, naive_logits, naive_peak, chunk_blocks + head_grad


@dataclass
class Plan:
    """Every number `distill plan` prints. Sizes in bytes, times in seconds, FLOPs per step unless named."""

    teacher: ModelShape
    student: ModelShape
    teacher_params: int
    student_params: int
    trainable_params: int
    teacher_online: bool  # the teacher runs a forward on every batch (kd without teacher.cache)
    lora: bool
    batch: BatchStats
    grad_accum: int
    steps: int
    flops: dict[str, float]  # per optimizer step, by part
    memory: dict[str, int]  # what is resident at the predicted peak, by part; sums to peak_bytes
    peak_phase: str
    naive_logits_bytes: int  # one [N, V] fp32 logit tensor of the largest micro-batch (the teacher's in KD)
    naive_loss_peak_bytes: int
    chunked_loss_peak_bytes: int
    seconds: dict[str, float]  # per optimizer step, by part
    rates: dict[str, float]  # FLOP/s each timed part runs at
    device: str
    threads: int
    notes: list[str] = field(default_factory=list)
    processes: int = 1  # ranks the per-rank memory is predicted for (distill plan --processes)
    rank_batch: Optional[BatchStats] = None  # one rank's micro-batches (train.batch_size / processes rows)
    per_rank: dict[str, dict[str, int]] = field(default_factory=dict)  # strategy -> one rank's memory by part
    per_rank_phase: dict[str, str] = field(default_factory=dict)  # strategy -> the phase that peaks

    @property
    def param_ratio(self) -> float:
        return self.student_params / self.teacher_params

    @property
    def tokens_per_step(self) -> float:
        """Non-padding tokens per optimizer step (what the trainer's tokens_per_s counts)."""
        return self.batch.real_tokens * self.grad_accum

    @property
    def step_flops(self) -> float:
        return sum(self.flops.values())

    @property
    def flops_per_token(self) -> float:
        return self.step_flops / self.tokens_per_step

    @property
    def step_seconds(self) -> float:
        return sum(self.seconds.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_seconds

    @property
    def total_seconds(self) -> float:
        return self.steps * self.step_seconds

    @property
    def peak_bytes(self) -> int:
        return sum(self.memory.values())
