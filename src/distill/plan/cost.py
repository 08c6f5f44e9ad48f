"""Predict a recipe's training cost before any run: parameters, FLOPs per token, memory and time on this machine.

A step is costed as the trainer runs it (distill.train.trainer): the student's decoder forward and backward
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
import random
import time
import warnings
from types import SimpleNamespace
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Callable, Iterator, Optional

import torch

from distill.errors import DistillError
from distill.recipe import LoraSpec, Recipe

MiB = 2**20
# Micro-batches whose shapes are sampled to estimate the padded length (the trainer's own batch order).
MAX_SAMPLED_BATCHES = 2000
# Examples tokenised to estimate lengths when the training set is larger than this.
MAX_ENCODED_EXAMPLES = 600
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
LAYER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------- shapes and parameters


@dataclass(frozen=True)
class ModelShape:
    """What the cost of a Llama-family decoder depends on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    def projections(self) -> dict[str, tuple[int, int]]:
        """(fan_in, fan_out) of each linear layer inside one decoder layer."""
        q, kv, d, f = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's linear projections (the part every token multiplies)."""
        return sum(i * o for i, o in self.projections().values())

    @property
    def layer_params(self) -> int:
        p = self.projections()
        bias = (p["q_proj"][1] + 2 * p["k_proj"][1]) * self.qkv_bias + self.hidden * self.o_bias
        bias += (2 * self.intermediate + self.hidden) * self.mlp_bias
        return self.layer_matmul_params + bias + 2 * self.hidden  # + the two RMSNorm weights

    @property
    def params(self) -> int:
        """All parameters; a tied head shares the embedding's tensor and counts once."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_params + self.hidden  # + the final norm

    @property
    def param_tensors(self) -> int:
        per_layer = 9 + 3 * self.qkv_bias + self.o_bias + 3 * self.mlp_bias
        return self.layers * per_layer + 2 + (0 if self.tied else 1)

    def describe(self) -> str:
        return (f"{self.layers} layers x {self.hidden} hidden, {self.heads}/{self.kv_heads} heads (q/kv) of "
                f"{self.head_dim}, FFN {self.intermediate}, vocab {self.vocab:,}{', tied' if self.tied else ''}")


def shape_from_config(config) -> ModelShape:
    """The shape of a transformers (Llama-family) config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        heads = config.num_attention_heads
        hidden = config.hidden_size
        shape = ModelShape(
            layers=config.num_hidden_layers,
            hidden=hidden,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or hidden // heads,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", True)),
            # Qwen2 has q/k/v biases without an attention_bias flag; Llama's flag covers o_proj too.
            qkv_bias=bool(getattr(config, "attention_bias", config.model_type == "qwen2")),
            o_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )
    except AttributeError as err:
        raise DistillError(f"{getattr(config, 'model_type', 'model')} config: not a Llama-family decoder "
                           f"({err})") from None
    return shape


def student_shape(recipe: Recipe, teacher: ModelShape) -> ModelShape:
    """The student's shape as the trainer will build it (distill.models.from_recipe.initial_student)."""
    from distill.models.presets import preset_config
    from distill.models.student import default_intermediate_size

    spec = recipe.student
    if spec.model is not None:
        return shape_from_config(model_config(recipe, spec))
    if spec.from_teacher is not None:
        from distill.models.prune import validate_width

        cut = spec.from_teacher
        layers = len(cut.keep_layers) if cut.keep_layers is not None else (cut.layers or teacher.layers)
        # The pruner's own rule for the widths it keeps (and its errors for impossible ones); head size stays.
        width = validate_width(cut, SimpleNamespace(
            num_attention_heads=teacher.heads, num_key_value_heads=teacher.kv_heads, hidden_size=teacher.hidden,
            intermediate_size=teacher.intermediate))
        return replace(teacher, layers=layers, hidden=width["hidden_size"], heads=width["num_heads"],
                       kv_heads=width["num_kv_heads"], intermediate=width["intermediate_size"])
    config = spec.config or preset_config(spec.preset)
    return ModelShape(  # distill.models.student.student_llama_config
        layers=config.num_layers, hidden=config.hidden_size, heads=config.num_heads,
        kv_heads=config.num_kv_heads or config.num_heads, head_dim=config.hidden_size // config.num_heads,
        intermediate=config.intermediate_size or default_intermediate_size(config.hidden_size),
        vocab=teacher.vocab, tied=config.tie_embeddings,
    )


def lora_projections(shape: ModelShape, lora: LoraSpec) -> dict[str, tuple[int, int]]:
    """The layer projections LoRA adapts, with their (fan_in, fan_out); an error if none is there."""
    chosen = {name: io for name, io in shape.projections().items() if name in lora.target_modules}
    if not chosen:
        raise DistillError(f"train.lora.target_modules: none of {lora.target_modules} exist in the student "
                           f"(its layers have {', '.join(LAYER_PROJECTIONS)})")
    return chosen


def lora_params(shape: ModelShape, lora: LoraSpec) -> int:
    """Trainable LoRA parameters: r x (fan_in + fan_out) per adapted projection per layer."""
    return shape.layers * sum(lora.r * (i + o) for i, o in lora_projections(shape, lora).values())


def model_config(recipe: Recipe, spec):
    """The transformers config of a recipe's teacher or student spec, without loading any weights."""
    from transformers import AutoConfig

    from distill.models.loading import gguf_cache_dir
    from distill.models.from_recipe import model_source

    path, gguf = model_source(recipe, spec)
    if gguf is not None and (gguf_cache_dir(path, gguf) / "config.json").is_file():
        path, gguf = str(gguf_cache_dir(path, gguf)), None  # the dequantised copy: no GGUF parsing
    try:
        return AutoConfig.from_pretrained(path, gguf_file=gguf, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistillError(f"could not read the config of {spec.model!r}: {first}") from None


# ---------------------------------------------------------------- FLOPs and activations per token


def linear_flops_per_token(shape: ModelShape) -> float:
    """Forward FLOPs of the decoder layers' projections for one token (2 per multiply-add)."""
    return 2.0 * shape.layers * shape.layer_matmul_params


def attention_flops_per_token(shape: ModelShape, seq_len: float) -> float:
    """Forward FLOPs of scores (QK^T) and mixing (AV) for one token attending over a padded row of seq_len.

    A padding mask makes attention run the full square (masked pairs are computed, then discarded).
    """
    return 4.0 * shape.layers * seq_len * shape.heads * shape.head_dim


def _attention_flops(shape: ModelShape, batch: "BatchStats") -> float:
    """Forward attention FLOPs of a micro-batch: each row costs its padded length squared."""
    return attention_flops_per_token(shape, 1.0) * batch.square_tokens


def head_flops_per_token(shape: ModelShape, vocab: Optional[int] = None) -> float:
    """Forward FLOPs of the output head (hidden @ head.T) for one position."""
    return 2.0 * (vocab or shape.vocab) * shape.hidden


def forward_flops_per_token(shape: ModelShape, seq_len: float) -> float:
    """Forward FLOPs of the whole model for one token of a sequence of seq_len (logits at every position)."""
    return linear_flops_per_token(shape) + attention_flops_per_token(shape, seq_len) + head_flops_per_token(shape)


def _saved_kv_width(shape: ModelShape) -> int:
    # transformers' sdpa path repeats k and v to every query head (a copy) unless there is one kv head
    # (an expanded view) or one per query head (nothing to repeat).
    return shape.head_dim * (1 if shape.kv_heads == 1 else shape.heads)


def activation_floats_per_token(shape: ModelShape, seq_len: float) -> float:
    """Floats autograd keeps per token for backward through the decoder (transformers 5 Llama, sdpa).

    Per layer: each RMSNorm keeps its input, normalised and scaled outputs (3 x hidden) and 1/rms; attention
    keeps q, k, v (k and v repeated to all heads), its output and a logsumexp per head; the MLP keeps gate,
    up, silu(gate) and their product (4 x intermediate); the float padding mask is one row of seq_len.
    Counted with torch.autograd.graph.saved_tensors_hooks on real layers (tests/test_plan.py).
    """
    q = shape.heads * shape.head_dim
    per_layer = (6 * shape.hidden + 2 * q + 2 * _saved_kv_width(shape) + shape.heads + 4 * shape.intermediate
                 + 2 + seq_len)
    # Outside the layers: the final norm's input and normalised output, its 1/rms, the token ids (int64).
    return shape.layers * per_layer + 2 * shape.hidden + 3


# ---------------------------------------------------------------- the batches the trainer will see


@dataclass
class BatchStats:
    """Shapes of the trainer's micro-batches: means over the sampled batches, and the largest one."""

    batch_size: int
    padded_tokens: float  # B x padded length: positions the decoders run on
    real_tokens: float  # non-padding tokens (what the trainer's tokens_per_s counts)
    loss_rows: float  # positions with a label (the chunked loss skips the others)
    square_tokens: float  # B x padded length^2: what attention costs scale with
    max_padded_tokens: int
    max_seq_len: int
    examples: int  # training examples the trainer tokenises and keeps in memory
    example_tokens: float  # their mean length
    source: str

    @property
    def seq_len(self) -> float:
        """Mean padded length."""
        return self.padded_tokens / self.batch_size


def _example_lengths(recipe: Recipe, tokenizer) -> tuple[list[tuple[int, int]], int, str]:
    """(tokens, trained positions) per training example (or a sample), how many examples, and the source."""
    from distill.data.splits import recipe_examples, teacher_data_path

    if recipe.data.prompts is not None and not teacher_data_path(recipe).is_dir():
        lengths = _prompt_lengths(recipe, tokenizer)
        count = len(lengths)
        source = (f"estimated: {count} prompts of data.prompts + generate.max_new_tokens="
                  f"{recipe.generate.max_new_tokens} (an upper bound; no teacher data yet)")
        if recipe.data.train is not None:
            from distill.data.examples import read_examples

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
    from distill.data.tokenize import IGNORE, encode_example

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
    from distill.teachers.from_recipe import recipe_prompts
    from distill.teachers.local import prompt_ids

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


def batch_stats(recipe: Recipe, tokenizer) -> BatchStats:
    """Shapes of the micro-batches the trainer draws (its own stateless batch order over the examples)."""
    from distill.data.tokenize import batch_indices

    lengths, examples, source = _example_lengths(recipe, tokenizer)
    t = recipe.train
    batches = min(t.steps * t.grad_accum, MAX_SAMPLED_BATCHES)
    padded = real = rows = square = 0.0
    max_padded = max_len = 0
    for micro in range(batches):
        picked = [lengths[i] for i in batch_indices(len(lengths), t.batch_size, recipe.seed, micro)]
        width = max(n for n, _ in picked)
        padded += width * t.batch_size
        square += width * width * t.batch_size
        real += sum(n for n, _ in picked)
        rows += sum(v for _, v in picked)
        max_padded, max_len = max(max_padded, width * t.batch_size), max(max_len, width)
    return BatchStats(
        batch_size=t.batch_size, padded_tokens=padded / batches, real_tokens=real / batches,
        loss_rows=rows / batches, square_tokens=square / batches, max_padded_tokens=max_padded,
        max_seq_len=max_len, examples=examples, example_tokens=sum(n for n, _ in lengths) / len(lengths),
        source=f"{source}; {batches} micro-batches drawn in the trainer's order",
    )


# ---------------------------------------------------------------- measured on this machine
# Each measurement is cached per process; `threads` (torch's thread count) is part of the cache key.


def _best_seconds(fn: Callable[[], object], budget: float = 0.15, most: int = 10) -> float:
    """Fastest of several timed calls after a warm-up (thread pools, allocator): the quietest moment wins.

    At least two calls; cheap ones repeat (up to `most`) while they have spent under `budget` seconds.
    """
    fn()
    best, spent, calls = math.inf, 0.0, 0
    while calls < 2 or (calls < most and spent < budget):
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent, calls = min(best, took), spent + took, calls + 1
    return best


@lru_cache(maxsize=None)
def linear_seconds(rows: int, fan_in: int, fan_out: int, dtype: torch.dtype, threads: int) -> tuple[float, ...]:
    """Seconds of a linear layer's forward, input-gradient and weight-gradient matmuls on `rows` rows."""
    x, w = torch.randn(rows, fan_in, dtype=dtype), torch.randn(fan_out, fan_in, dtype=dtype)
    g = torch.randn(rows, fan_out, dtype=dtype)
    return (_best_seconds(lambda: x @ w.t()), _best_seconds(lambda: g @ w), _best_seconds(lambda: g.t() @ x))


@lru_cache(maxsize=None)
def dispatch_seconds(grad: bool, threads: int) -> tuple[float, float]:
    """(per layer, per model call) seconds of a decoder forward (+ backward) at negligible size.

    On a CPU this is the dispatch of a hundred-odd small operators per layer; it does not grow with the batch.
    """
    tiny = ModelShape(layers=1, hidden=16, heads=2, kv_heads=1, head_dim=8, intermediate=32, vocab=64, tied=True)
    mode = "train" if grad else "frozen"
    one = _decoder_call_seconds(tiny, 2, 8, torch.float32, mode, None)
    two = _decoder_call_seconds(replace(tiny, layers=2), 2, 8, torch.float32, mode, None)
    return max(two - one, 0.0), max(2 * one - two, 0.0)


@lru_cache(maxsize=None)
def decoder_seconds(shape: ModelShape, rows: int, seq_len: int, dtype: torch.dtype, mode: str,
                    lora: Optional[tuple[int, tuple[str, ...]]], threads: int) -> tuple[float, float]:
    """(per layer, per model call) seconds of the real transformers decoder on `rows` padded sequences.

    Times 1- and 2-layer models of the shape (with a 64-token vocabulary: the embedding and head are costed
    apart) through the trainer's own call, forward and backward for "train" and "lora", forward without
    grad for "frozen". This is the layers' matmuls, attention, norms, rotary, SiLU and residuals as they run.
    """
    small = replace(shape, vocab=64)
    one = _decoder_call_seconds(replace(small, layers=1), rows, seq_len, dtype, mode, lora)
    two = _decoder_call_seconds(replace(small, layers=2), rows, seq_len, dtype, mode, lora)
    return max(two - one, 0.0), max(2 * one - two, 0.0)


def _decoder_call_seconds(shape: ModelShape, rows: int, seq_len: int, dtype: torch.dtype, mode: str,
                          lora: Optional[tuple[int, tuple[str, ...]]]) -> float:
    from distill.models import decoder_hidden_states

    grad = mode != "frozen"
    # The trainer keeps a trained student's weights in fp32 and runs its body under autocast.
    model = _llama(shape, torch.float32 if grad else dtype)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = [m for m in lora[1] if m in LAYER_PROJECTIONS]
        with warnings.catch_warnings():  # transformers' deprecation notes about peft internals
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, LoraConfig(r=lora[0], lora_alpha=2 * lora[0], target_modules=targets))
    model.train(grad)
    for name, param in model.named_parameters():
        param.requires_grad_(mode == "train" or (mode == "lora" and "lora_" in name))
    ids = torch.randint(0, shape.vocab, (rows, seq_len))
    mask = torch.ones(rows, seq_len, dtype=torch.long)
    mask[0, -max(1, seq_len // 8):] = 0  # a shorter row, so the padding-mask path runs as in training
    autocast = torch.autocast("cpu", dtype=dtype, enabled=grad and dtype != torch.float32)

    def step():
        with torch.set_grad_enabled(grad), autocast:
            hidden = decoder_hidden_states(model, ids, mask)
        if grad:
            hidden.float().sum().backward()

    return _best_seconds(step)


def _llama(shape: ModelShape, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, tie_word_embeddings=shape.tied, attention_bias=shape.qkv_bias,
        mlp_bias=shape.mlp_bias, max_position_embeddings=max(2048, 4 * shape.hidden),
    )
    with torch.random.fork_rng(devices=[]):
        return LlamaForCausalLM(config).to(dtype)


@lru_cache(maxsize=None)
def embedding_grad_seconds(vocab: int, hidden: int, tokens: int, tied: bool, threads: int) -> float:
    """Seconds of a trainable embedding's backward: a dense [V, D] zero-filled gradient, the scatter of the
    tokens' rows into it, and (tied) its sum with the head's gradient from the loss."""
    ids = torch.randint(0, vocab, (tokens,))
    rows = torch.randn(tokens, hidden)
    head_grad = torch.randn(vocab, hidden) if tied else None

    def step():
        grad = torch.zeros(vocab, hidden).index_add_(0, ids, rows)
        return grad if head_grad is None else head_grad + grad

    return _best_seconds(step)


@lru_cache(maxsize=None)
def loss_seconds_per_row(rows: int, vocab: int, teacher_vocab: Optional[int], divergence: str,
                         temperature: float, alpha: float, head_grad: bool, threads: int) -> float:
    """Seconds per position of the chunked loss's non-matmul work (softmaxes, divergence, their gradients).

    Measured by running distill.losses.kd_loss_chunked itself on one chunk with 8-wide hidden states, so its
    matmuls cost next to nothing and what is left is the `[rows, V]` elementwise math.
    """
    from distill.losses import kd_loss_chunked

    width = 8
    hidden = torch.randn(rows, width, requires_grad=True)
    head = torch.randn(vocab, width, requires_grad=head_grad)
    labels = torch.randint(0, min(vocab, teacher_vocab or vocab), (rows,))
    teacher = None if teacher_vocab is None else (torch.randn(rows, width), torch.randn(teacher_vocab, width))

    def step():
        out = kd_loss_chunked(hidden, head, *(teacher or (None, None)), labels, divergence=divergence,
                              temperature=temperature, alpha=alpha, chunk_size=rows)
        out.loss.backward()

    return _best_seconds(step) / rows


@lru_cache(maxsize=None)
def optimizer_seconds(threads: int) -> tuple[float, float]:
    """(per parameter, per tensor) seconds of the trainer's update: grad-norm clip, AdamW step, zero_grad."""

    def timed(sizes: list[int]) -> float:
        params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
        grads = [torch.randn(n) for n in sizes]
        optimizer = torch.optim.AdamW(params, lr=1e-3)

        def step():
            for p, g in zip(params, grads):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return _best_seconds(step)

    big = 2**22  # 16 MiB tensors: beyond the caches, like a model's
    per_param = timed([big]) / big
    per_tensor = max(timed([16] * 64) - 64 * 16 * per_param, 0.0) / 64
    return per_param, per_tensor


@contextmanager
def _threads(wanted: Optional[int]) -> Iterator[int]:
    """Measure with the thread count the trainer will use (train.threads), then restore torch's."""
    saved = torch.get_num_threads()
    if wanted:
        torch.set_num_threads(wanted)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(saved)


# ---------------------------------------------------------------- the plan


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


def plan_recipe(recipe: Recipe) -> Plan:
    """Predict the cost of training `recipe` on this machine; reads configs and data, loads no weights."""
    from distill.models.from_recipe import teacher_tokenizer
    from distill.runtime import resolve_device, resolve_dtype

    t = recipe.train
    device = resolve_device(t.device)
    dtype = resolve_dtype(t.dtype, device)
    teacher_dtype = dtype if recipe.teacher.dtype == "auto" else resolve_dtype(recipe.teacher.dtype, device)
    teacher = shape_from_config(model_config(recipe, recipe.teacher))
    student = student_shape(recipe, teacher)
    online = teacher_online(recipe)
    lora = t.lora
    trainable = lora_params(student, lora) if lora else student.params
    tokenizer = teacher_tokenizer(recipe)
    baseline = _baseline_rss(with_peft=lora is not None)
    batch = batch_stats(recipe, tokenizer)
    flops = step_flops(recipe, teacher, student, batch)
    with _threads(t.threads) as threads:
        seconds, rates = step_seconds(recipe, teacher, student, batch, dtype, teacher_dtype, threads)
    memory, phase, naive, naive_peak, chunked = memory_at_peak(
        recipe, teacher, student, batch, trainable, baseline, teacher_dtype)
    return Plan(
        teacher=teacher, student=student, teacher_params=teacher.params, student_params=student.params,
        trainable_params=trainable, teacher_online=online, lora=lora is not None, batch=batch,
        grad_accum=t.grad_accum, steps=t.steps, flops=flops, memory=memory, peak_phase=phase,
        naive_logits_bytes=naive, naive_loss_peak_bytes=naive_peak, chunked_loss_peak_bytes=chunked,
        seconds=seconds, rates=rates, device=str(device), threads=threads, notes=_notes(recipe, device),
    )


def _notes(recipe: Recipe, device: torch.device) -> list[str]:
    """What the plan does not cover for this recipe."""
    notes = []
    if device.type != "cpu":
        notes.append(f"train.device is {device}, but the model of a step and its timings are for this CPU")
    if not teacher_online(recipe) and recipe.method.kind == "kd":
        notes.append("teacher.cache: the loss math is timed as cross-entropy alone; reading the cached top-k "
                     "targets is not modelled")
    if recipe.method.hidden is not None:
        notes.append("method.hidden (hidden-state KD) is not modelled: its projections add a little time and "
                     "memory")
    return notes


def teacher_online(recipe: Recipe) -> bool:
    """Whether every batch runs the teacher's forward (KD from a live teacher, not from teacher.cache)."""
    return recipe.method.kind == "kd" and getattr(recipe.teacher, "cache", None) is None


def _shared_vocab(teacher: ModelShape, student: ModelShape) -> int:
    return min(teacher.vocab, student.vocab)


def step_flops(recipe: Recipe, teacher: ModelShape, student: ModelShape, batch: BatchStats) -> dict[str, float]:
    """Matmul FLOPs of one optimizer step, by part (backward = 2 x forward; a frozen weight skips its grad)."""
    n, rows = batch.padded_tokens, batch.loss_rows
    lora = recipe.train.lora
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
    if teacher_online(recipe):
        flops["teacher forward"] = (
            linear_flops_per_token(teacher) * n + _attention_flops(teacher, batch)
            + head_flops_per_token(teacher, _shared_vocab(teacher, student)) * rows
        )
    return {k: v * recipe.train.grad_accum for k, v in flops.items()}


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


def step_seconds(
    recipe: Recipe, teacher: ModelShape, student: ModelShape, batch: BatchStats, dtype: torch.dtype,
    teacher_dtype: torch.dtype, threads: int,
) -> tuple[dict[str, float], dict[str, float]]:
    """Predicted seconds of one optimizer step by part, and the compute rates they imply (FLOP/s)."""
    method, t = recipe.method, recipe.train
    n, rows = batch.padded_tokens, batch.loss_rows
    lora = None if t.lora is None else (t.lora.r, tuple(t.lora.target_modules))
    rates: dict[str, float] = {}
    backward = 2 if lora is None else 1  # frozen base weights (LoRA) need no weight gradient
    student_flops = (1 + backward) * linear_flops_per_token(student) * n + 3 * _attention_flops(student, batch)
    parts = {
        "student layers (forward + backward)": _decoder_time(
            student, batch, dtype, "train" if lora is None else "lora", lora, threads, rates, "student layers",
            student_flops),
        "student head (loss matmuls)": _head_time(student, student.vocab, rows, method.chunk_size, dtype, threads,
                                                  lora is None, rates, "student head"),
    }
    if lora is None:
        parts["student embedding gradient"] = embedding_grad_seconds(
            student.vocab, student.hidden, max(1, round(n)), student.tied, threads)
    teacher_vocab = None
    if teacher_online(recipe):
        teacher_vocab = _shared_vocab(teacher, student)
        teacher_flops = linear_flops_per_token(teacher) * n + _attention_flops(teacher, batch)
        parts["teacher layers (forward)"] = _decoder_time(teacher, batch, teacher_dtype, "frozen", None, threads,
                                                          rates, "teacher layers", teacher_flops)
        parts["teacher head (loss matmul)"] = _head_time(teacher, teacher_vocab, rows, method.chunk_size,
                                                         teacher_dtype, threads, False, rates, "teacher head")
    loss_rows = max(1, min(method.chunk_size, round(rows)))
    parts["loss math (softmax, divergence)"] = rows * loss_seconds_per_row(
        loss_rows, student.vocab, teacher_vocab, method.divergence, method.temperature, method.alpha,
        lora is None, threads)
    seconds = {k: v * t.grad_accum for k, v in parts.items()}
    per_param, per_tensor = optimizer_seconds(threads)
    if lora is None:
        trainable, tensors = student.params, student.param_tensors
    else:
        trainable, tensors = lora_params(student, t.lora), 2 * student.layers * len(lora_projections(student, t.lora))
    seconds["optimizer (clip + AdamW)"] = trainable * per_param + tensors * per_tensor
    return seconds, rates


def memory_at_peak(
    recipe: Recipe, teacher: ModelShape, student: ModelShape, batch: BatchStats, trainable: int, baseline: int,
    teacher_dtype: torch.dtype,
) -> tuple[dict[str, int], str, int, int, int]:
    """(resident bytes by part at the peak, which phase peaks, naive teacher logits, naive loss peak,
    chunked loss peak) for the largest micro-batch."""
    method, f32 = recipe.method, 4
    kd = teacher_online(recipe)
    n, seq = batch.max_padded_tokens, batch.max_seq_len
    rows = min(n, round(batch.loss_rows * batch.max_padded_tokens / batch.padded_tokens))
    head_trainable = recipe.train.lora is None
    resident = {"process baseline (torch, transformers, tokenizer)": baseline,
                "tokenised training data": round(batch.examples * batch.example_tokens * DATA_BYTES_PER_TOKEN),
                "student weights (fp32)": student.params * f32,
                "optimizer state (AdamW m, v)": 2 * trainable * f32}
    if kd:
        resident["teacher weights"] = teacher.params * teacher_dtype.itemsize
    blocks = (LOSS_BLOCKS.get(method.divergence, max(LOSS_BLOCKS.values())) if kd else SFT_LOSS_BLOCKS)
    blocks += method.temperature != 1.0  # a scaled copy of the logits
    chunk = min(method.chunk_size, rows)
    chunk_blocks = blocks * chunk * student.vocab * f32
    head_grad = student.vocab * student.hidden * f32 if head_trainable else 0
    # The loss's own buffers: the student's final states, the rows it gathers and their gradient; the teacher's.
    loss_buffers = chunk_blocks + (n + 2 * rows) * student.hidden * f32 + kd * (n + rows) * teacher.hidden * f32
    activations = activation_floats_per_token(student, seq) * n * f32
    if recipe.train.lora is not None:  # each adapter keeps its r-wide intermediate
        adapters = len(lora_projections(student, recipe.train.lora))
        activations += student.layers * adapters * recipe.train.lora.r * n * f32
    resident["activations"] = round(activations)
    resident["allocator retention"] = round(ALLOCATOR_RETENTION * activations)
    accumulated = trainable * f32 if recipe.train.grad_accum > 1 else 0
    # Two moments compete for the peak. The end of the loss's forward: the chunk's [rows, V] blocks and the
    # head's gradient are alive. The optimizer step: every gradient, and AdamW's two temporaries the size of
    # the parameter it is updating. (Freed activations stay in the allocator's heap either way.)
    loss_forward = {"chunked loss buffers": loss_buffers, "gradients": max(head_grad, accumulated)}
    largest = max(student.vocab * student.hidden, student.intermediate * student.hidden) if head_trainable else \
        max(recipe.train.lora.r * max(student.intermediate, student.hidden), 1)
    optimizer_step = {"gradients": trainable * f32, "optimizer temporaries": 2 * largest * f32}
    phase, extra = max((("loss forward", loss_forward), ("optimizer step", optimizer_step)),
                       key=lambda item: sum(item[1].values()))
    memory = {**resident, **extra}
    naive_logits = n * _shared_vocab(teacher, student) * f32
    naive_peak = NAIVE_LOSS_BLOCKS * n * student.vocab * f32
    return memory, phase, naive_logits, naive_peak, chunk_blocks + head_grad


def _baseline_rss(with_peft: bool) -> int:
    """This process's resident memory with the code training imports loaded (what it holds before any weight)."""
    import importlib

    for module in ("transformers.models.llama.modeling_llama", "peft")[: 2 if with_peft else 1]:
        importlib.import_module(module)
    return _process_rss()


def _process_rss() -> int:
    """This process's resident memory now (Linux /proc), 0 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------- the table


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _mib(n: float) -> str:
    return f"{n / MiB:,.0f} MiB" if n >= 10 * MiB else f"{n / MiB:,.1f} MiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _rows(pairs: list[tuple[str, str]], indent: str = "  ") -> list[str]:
    width = max(len(k) for k, _ in pairs)
    return [f"{indent}{k.ljust(width)}  {v}" for k, v in pairs]


def format_plan(plan: Plan) -> str:
    """The plan as a readable table."""
    sections = [_models_section(plan), _batch_section(plan), _flops_section(plan), _memory_section(plan),
                _time_section(plan)]
    return "\n\n".join("\n".join(lines) for lines in sections) + "".join(f"\nnote: {n}" for n in plan.notes)


def _models_section(plan: Plan) -> list[str]:
    return ["Models", *_rows([
        ("teacher", f"{_count(plan.teacher_params)} params: {plan.teacher.describe()}"),
        ("student", f"{_count(plan.student_params)} params: {plan.student.describe()}"),
        ("student / teacher", f"{plan.param_ratio:.1%} of the parameters (teacher/student = "
                              f"{1 / plan.param_ratio:.2f})"),
        ("trainable", _count(plan.trainable_params) + (" (LoRA adapters)" if plan.lora else "")),
    ])]


def _batch_section(plan: Plan) -> list[str]:
    b = plan.batch
    return [
        f"Batches ({plan.grad_accum} per step): {b.batch_size} sequences padded to {b.seq_len:.0f} tokens on "
        f"average (largest {b.max_seq_len}); {b.real_tokens:.0f} real tokens and {b.loss_rows:.0f} trained "
        "positions each",
        f"  {b.source}",
    ]


def _flops_section(plan: Plan) -> list[str]:
    total = plan.step_flops
    head = f"FLOPs per step: {_count(total)}; per real token: {_count(plan.flops_per_token)}"
    head += "" if plan.teacher_online else " (no teacher forward: SFT or teacher.cache)"
    return [head, *_rows([(k, f"{_count(v / plan.tokens_per_step)} per token ({v / total:.0%})")
                          for k, v in plan.flops.items()])]


def _memory_section(plan: Plan) -> list[str]:
    b = plan.batch
    whose = "teacher" if plan.teacher_online else "student"
    return [
        f"Memory at the peak ({plan.peak_phase}, largest batch): {_mib(plan.peak_bytes)} resident",
        *_rows([(k, _mib(v)) for k, v in plan.memory.items()]),
        f"  logits: a naive loss would hold {whose} logits [{b.max_padded_tokens:,} x "
        f"{_shared_vocab(plan.teacher, plan.student):,}] of {_mib(plan.naive_logits_bytes)} and peak near "
        f"{_mib(plan.naive_loss_peak_bytes)}; the chunked loss peaks at {_mib(plan.chunked_loss_peak_bytes)}",
    ]


def _time_section(plan: Plan) -> list[str]:
    rates = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in plan.rates.items())
    return [
        f"Time on this machine ({plan.device}, {plan.threads} threads; GFLOP/s: {rates})",
        *_rows([(k, f"{v:.3f} s ({v / plan.step_seconds:.0%})") for k, v in plan.seconds.items()]),
        *_rows([
            ("step", f"{plan.step_seconds:.2f} s"),
            ("tokens/s", f"{plan.tokens_per_s:,.0f}"),
            (f"total ({plan.steps} steps)", f"{_duration(plan.total_seconds)} (the steps alone: no model loading, "
                                            "checkpoints or eval)"),
        ]),
    ]
