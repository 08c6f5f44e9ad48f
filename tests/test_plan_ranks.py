"""`distill plan --processes N`: one rank's memory under DDP, FSDP and ZeRO-3, against sums worked out by hand."""
from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from conftest import tiny_recipe
from distill.cli import main
from distill.data.tokenize import batch_indices
from distill.plan import (
    BatchStats,
    ModelShape,
    Sharding,
    StepSetup,
    batch_stats,
    format_plan,
    memory_at_peak,
    plan_recipe,
)
from distill.plan.batches import sample_batches
from distill.recipe import LoraSpec, recipe_from_dict

TEACHER = ModelShape(layers=4, hidden=96, heads=6, kv_heads=2, head_dim=16, intermediate=256, vocab=1000, tied=False)
STUDENT = ModelShape(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=1000, tied=True)
BATCH = BatchStats(batch_size=2, padded_tokens=80, real_tokens=70, loss_rows=30, square_tokens=3200,
                   max_padded_tokens=96, max_seq_len=48, examples=100, example_tokens=40, source="by hand")
BASELINE = 300 * 2**20


def _setup(lora=None, grad_accum=1) -> StepSetup:
    return StepSetup(teacher_online=True, grad_accum=grad_accum, lora=lora, divergence="forward_kl", temperature=1.0,
                     alpha=0.5, chunk_size=16)


def _memory(sharding: Sharding, lora=None, grad_accum=1, teacher_dtype=torch.bfloat16):
    trainable = STUDENT.params if lora is None else 10_000
    return memory_at_peak(_setup(lora, grad_accum), TEACHER, STUDENT, BATCH, trainable, BASELINE, teacher_dtype,
                          sharding)


def test_hand_counted_shapes():
    """The sums the tests below build on, counted here from the shapes' own numbers."""
    # student layer: q 64x64, k and v 64x32, o 64x64, gate/up/down 3 x 64x128, two norms of 64
    assert STUDENT.layer_params == 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64 == 36_992
    assert STUDENT.params == 1000 * 64 + 2 * 36_992 + 64  # tied: one embedding
    assert TEACHER.params == 2 * 1000 * 96 + 4 * TEACHER.layer_params + 96  # untied: embedding and head


def test_one_process_is_the_one_process_prediction():
    """N = 1: every strategy gives exactly what `distill plan` predicts today (nothing sharded, nothing gathered)."""
    alone = memory_at_peak(_setup(), TEACHER, STUDENT, BATCH, STUDENT.params, BASELINE, torch.bfloat16)
    for strategy in ("ddp", "fsdp", "zero3"):
        assert _memory(Sharding(strategy, 1)) == alone


def test_ddp_replicates_and_adds_its_gradient_buckets():
    memory, *_ = _memory(Sharding("ddp", 4))
    assert memory["student weights (fp32)"] == 4 * STUDENT.params
    assert memory["optimizer state (AdamW m, v)"] == 2 * 4 * STUDENT.params
    assert memory["teacher weights"] == 2 * TEACHER.params  # bf16, whole on every rank
    assert memory["DDP gradient buckets"] == 4 * STUDENT.params
    assert memory["gradients"] == 4 * STUDENT.params  # the optimizer step's peak: every gradient, unsharded
    assert not any(part.startswith("gathered") for part in memory)


@pytest.mark.parametrize("processes", [2, 4, 8])
def test_fsdp_divides_by_the_processes_and_gathers_the_root_and_one_layer(processes):
    memory, phase, *_ = _memory(Sharding("fsdp", processes))
    n = processes
    assert memory["student weights (fp32)"] == round(4 * STUDENT.params / n)
    assert memory["optimizer state (AdamW m, v)"] == round(8 * STUDENT.params / n)
    assert memory["teacher weights"] == round(2 * TEACHER.params / n)
    # gathered: the root unit (tied embedding + final norm) and one layer of the student in fp32; the teacher's
    # root (embedding and head: untied) and one of its layers in bf16
    student_gathered = (1000 * 64 + 64 + 36_992) * 4
    teacher_gathered = (2 * 1000 * 96 + 96 + TEACHER.layer_params) * 2
    assert memory["gathered weights (student, teacher)"] == student_gathered + teacher_gathered
    assert "DDP gradient buckets" not in memory
    # This batch peaks in the loss's forward, where the chunked loss holds the head's whole (unsharded) gradient.
    assert phase == "loss forward" and memory["gradients"] == 1000 * 64 * 4
    # With accumulation, each rank keeps its shard of the accumulated gradients (more than the head's, for n = 2).
    accumulating, *_ = _memory(Sharding("fsdp", n), grad_accum=2)
    assert accumulating["gradients"] == max(1000 * 64 * 4, round(4 * STUDENT.params / n))


def test_zero3_gathers_the_largest_tensor_and_leaves_the_activations_alone():
    fsdp, *_ = _memory(Sharding("fsdp", 4))
    zero3, *_ = _memory(Sharding("zero3", 4))
    ddp, *_ = _memory(Sharding("ddp", 4))
    # the largest single weight: the student's embedding (1000 x 64 > 64 x 128); the teacher is whole (bf16) on
    # every rank, as train.parallel: zero3 gives DeepSpeed the student alone
    assert zero3["gathered weights (student)"] == 1000 * 64 * 4
    assert zero3["teacher weights"] == ddp["teacher weights"] == 2 * TEACHER.params
    for part in ("activations", "allocator retention", "tokenised training data",
                 "process baseline (torch, transformers, tokenizer)"):
        assert ddp[part] == fsdp[part] == zero3[part]  # the same rows per rank under every strategy
    assert sum(zero3.values()) < sum(ddp.values())


def test_lora_shards_the_frozen_base_and_the_adapters_state():
    lora = LoraSpec(r=4)
    memory, *_ = _memory(Sharding("fsdp", 2), lora=lora)
    assert memory["student weights (fp32)"] == round(4 * STUDENT.params / 2)  # base weights are sharded too
    assert memory["optimizer state (AdamW m, v)"] == 8 * 10_000 // 2
    ddp, *_ = _memory(Sharding("ddp", 2), lora=lora)
    assert ddp["DDP gradient buckets"] == 4 * 10_000  # only the adapters have gradients


def test_rank_batches_are_each_rank_share_of_the_global_micro_batch():
    """2 ranks: each global micro-batch of 4 rows is cut in two halves, each padded to its own longest row."""
    lengths = [(10 + 7 * i % 30, 5 + i % 4) for i in range(40)]
    one = sample_batches(lengths, 40, "by hand", 4, 12, seed=3)
    two = sample_batches(lengths, 40, "by hand", 4, 12, seed=3, processes=2)
    padded = real = rows = 0
    widest = 0
    for micro in range(12):
        drawn = [lengths[i] for i in batch_indices(40, 4, 3, micro)]
        for half in (drawn[:2], drawn[2:]):
            width = max(n for n, _ in half)
            padded += 2 * width
            real += sum(n for n, _ in half)
            rows += sum(v for _, v in half)
            widest = max(widest, width)
    assert two.batch_size == 2
    assert two.padded_tokens == pytest.approx(padded / 24)
    assert two.real_tokens == pytest.approx(real / 24) == pytest.approx(one.real_tokens / 2)
    assert two.loss_rows == pytest.approx(rows / 24) == pytest.approx(one.loss_rows / 2)
    assert two.max_padded_tokens == 2 * widest and two.max_seq_len == widest
    assert two.padded_tokens <= one.padded_tokens / 2  # a half pads to its own longest row, never longer


def test_plan_recipe_per_rank(tmp_path, tiny_teacher_dir, pairs_jsonl, monkeypatch):
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl))
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun or accelerate launch set it
    plan = plan_recipe(recipe)
    assert plan.processes == 2 and set(plan.per_rank) == {"ddp", "fsdp", "zero3"}
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    assert plan.rank_batch == batch_stats(recipe, tokenizer, 2)
    assert plan.per_rank["ddp"]["student weights (fp32)"] == plan.memory["student weights (fp32)"]
    assert plan.per_rank["fsdp"]["student weights (fp32)"] == round(plan.memory["student weights (fp32)"] / 2)
    assert plan.per_rank["ddp"]["activations"] < plan.memory["activations"]  # half the rows per rank
    text = format_plan(plan)
    assert "Memory per rank on 2 processes (2 of train.batch_size=4 rows each" in text
    for name in ("DDP", "FSDP", "ZeRO-3", "per rank at the peak", *plan.per_rank["fsdp"]):
        assert name in text
    monkeypatch.delenv("WORLD_SIZE")
    alone = plan_recipe(recipe)
    assert alone.processes == 1 and not alone.per_rank and "Memory per rank" not in format_plan(alone)


def test_cli_processes_flag_and_a_batch_that_does_not_divide(tmp_path, tiny_teacher_dir, pairs_jsonl, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl)))
    assert main(["plan", str(path), "--processes", "4"]) == 0
    assert "Memory per rank on 4 processes (1 of train.batch_size=4 rows each" in capsys.readouterr().out
    assert main(["plan", str(path), "--processes", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("distill: error: train.batch_size=4 does not divide across 3 processes (each takes an equal "
                   "share of every micro-batch); make it a multiple of the process count")
    assert not (tmp_path / "run").exists()
