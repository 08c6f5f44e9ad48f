"""Measured on this machine, on the recipe's shapes: micro-benchmarks of a step's parts, and resident memory.

Each measurement is cached per process; `threads` (torch's thread count) is part of the cache key.
"""
from __future__ import annotations

import importlib
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from functools import lru_cache
from typing import Callable, Iterator, Optional

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill.losses import kd_loss_chunked
from distill.models import decoder_hidden_states
from distill.plan.shapes import LAYER_PROJECTIONS, ModelShape


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
    grad = mode != "frozen"
    # The trainer keeps a trained student's weights in fp32 and runs its body under autocast.
    model = _llama(shape, torch.float32 if grad else dtype)
    if mode == "lora":
        # Imported here: baseline_rss counts peft's memory only for LoRA recipes, so nothing loads it earlier.
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


def _llama(shape: ModelShape, dtype: torch.dtype) -> LlamaForCausalLM:
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
def torch_threads(wanted: Optional[int]) -> Iterator[int]:
    """Measure with the thread count the trainer will use (train.threads), then restore torch's."""
    saved = torch.get_num_threads()
    if wanted:
        torch.set_num_threads(wanted)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(saved)


def baseline_rss(with_peft: bool) -> int:
    """This process's resident memory with the code training imports loaded (what it holds before any weight)."""
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
