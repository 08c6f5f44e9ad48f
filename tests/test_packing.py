"""Packing: no attention across packed examples, boundary labels, the same loss as unpacked, resume, refusals."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distill.data.layouts import Example
from distill.data.packing import (
    check_packing_support,
    collate_packed,
    fill_ratio,
    pack_examples,
    pack_rows,
)
from distill.data.tokenize import IGNORE, EncodedExample, collate, encode_example, padding_id
from distill.errors import DistillError
from distill.recipe import MethodSpec, recipe_from_dict
from distill.training.checkpoint import list_checkpoints
from distill.signals.teacher_signal import LiveTeacher
from distill.stages.training import batch_objective
from distill.training.step import loss_on_batch
from distill.stages import train
from conftest import logged_steps, tiny_recipe


def _load(model_dir: Path, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn).eval()


def _random_examples(lengths: list[int], vocab: int, seed: int = 0) -> list[EncodedExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append(EncodedExample(input_ids=ids, labels=list(ids)))
    return out


def _encoded(tokenizer) -> list[EncodedExample]:
    """Chat examples (prompt masked) and plain text (every token trained), of different lengths."""
    examples = [
        Example(id=f"c{i}", messages=[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                                      {"role": "assistant", "content": "The answer is " + "four " * i}])
        for i in range(1, 5)
    ] + [Example(id=f"t{i}", text="The quick brown fox jumps over the lazy dog. " * i) for i in range(1, 4)]
    return [encode_example(e, tokenizer, max_length=64) for e in examples]


def _trained(labels: list[int]) -> int:
    """Positions with a target when the example runs alone: its labels after the first token."""
    return sum(label != IGNORE for label in labels[1:])


# ---------------------------------------------------------------- the packing plan


def test_pack_rows_keeps_every_example_whole_and_is_a_pure_function_of_its_inputs():
    lengths = [int(x) for x in torch.randint(2, 40, (200,), generator=torch.Generator().manual_seed(0))]
    rows = pack_rows(lengths, 64, seed=5)
    assert sorted(i for row in rows for i in row) == list(range(200))  # each example once, none split
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) < 200 * 0.6  # examples of ~21 tokens: about 3 to a row
    assert pack_rows(lengths, 64, seed=5) == rows
    assert pack_rows(lengths, 64, seed=6) != rows  # the seed orders equal lengths
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([65], 64, seed=0)


def test_labels_at_every_boundary_are_ignored_and_trained_tokens_add_up(tiny_teacher_dir):
    from transformers import AutoTokenizer

    encoded = _encoded(AutoTokenizer.from_pretrained(tiny_teacher_dir))
    rows = pack_examples(encoded, 96, seed=0)
    assert len(rows) < len(encoded)  # something was packed
    for row in rows:
        start = 0
        for i in row.examples:
            n = len(encoded[i].input_ids)
            assert row.labels[start] == IGNORE
            assert row.position_ids[start:start + n] == list(range(n))
            assert row.input_ids[start:start + n] == encoded[i].input_ids
            start += n
        assert start == len(row.input_ids) <= 96
    batch = collate_packed(rows, pad_id=0)
    trained = int((batch["labels"][:, 1:] != IGNORE).sum())  # what the trainer counts after its shift
    assert trained == sum(_trained(e.labels) for e in encoded)
    assert int(batch["attention_mask"].sum()) == sum(len(e.input_ids) for e in encoded)
    assert 0.5 < fill_ratio(rows, 96) <= 1.0


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_packed_example_sees_only_itself(tiny_teacher_dir, attn):
    model = _load(tiny_teacher_dir, attn)
    # 14 + 9 + 5 fill one row of 28; the 6-token example gets a row of its own, padded to 28.
    examples = _random_examples([5, 9, 14, 6], model.config.vocab_size)
    rows = pack_examples(examples, 28, seed=0)
    assert sorted(len(r.examples) for r in rows) == [1, 3]
    batch = collate_packed(rows, pad_id=0)
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers does not look for packed sequences.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for b, row in enumerate(rows):
            start = 0
            for i in row.examples:
                ids = torch.tensor([examples[i].input_ids])
                alone = model(input_ids=ids).logits[0]
                torch.testing.assert_close(packed[b, start:start + ids.shape[1]], alone, atol=1e-5, rtol=1e-5)
                start += ids.shape[1]


def test_a_model_whose_mask_ignores_packing_is_refused(tiny_teacher_dir, monkeypatch):
    from transformers import masking_utils

    model = _load(tiny_teacher_dir)
    check_packing_support(model, "teacher")
    # As if the attention bypassed transformers' packed-sequence detection: a plain causal mask over the row.
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(DistillError, match="teacher's attention crosses packed examples"):
        check_packing_support(model, "teacher")


# ---------------------------------------------------------------- the loss


def _loss_and_grads(student, teacher, batch, method, matcher=None):
    student.zero_grad(set_to_none=True)
    signal = LiveTeacher(teacher) if teacher is not None else None
    out = loss_on_batch(student, signal, batch, batch_objective(method), matcher=matcher)
    out.loss.backward()
    grads = [p.grad.clone() for p in student.parameters()]
    return out, grads


@pytest.mark.parametrize("kind", ["sft", "kd", "kd_hidden"])
def test_packed_loss_equals_the_token_weighted_unpacked_loss(tiny_teacher_dir, tiny_student_dir, kind):
    from transformers import AutoTokenizer

    from distill.losses.hidden import HiddenStateMatcher

    student, teacher = _load(tiny_student_dir), _load(tiny_teacher_dir)
    method = MethodSpec(kind="sft" if kind == "sft" else "kd", divergence="forward_kl", alpha=0.3,
                        temperature=2.0, chunk_size=16, hidden={"weight": 0.5} if kind == "kd_hidden" else None)
    matcher = HiddenStateMatcher([(0, 1)], 32, 64, seed=0) if kind == "kd_hidden" else None
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    encoded = _encoded(tokenizer)
    rows = pack_examples(encoded, 96, seed=0)
    assert len(rows) < len(encoded)
    packed, packed_grads = _loss_and_grads(student, teacher if kind != "sft" else None,
                                           collate_packed(rows, padding_id(tokenizer)), method, matcher)
    plain, plain_grads = _loss_and_grads(student, teacher if kind != "sft" else None,
                                         collate(encoded, padding_id(tokenizer)), method, matcher)
    assert packed.n_tokens == plain.n_tokens == sum(_trained(e.labels) for e in encoded)
    for key in ("loss", "ce", "kd", "hidden"):
        a, b = getattr(packed, key), getattr(plain, key)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if kind != "sft":
        assert float(packed.kd) > 0
    for a, b in zip(packed_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the training loop


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in logged_steps(run_dir)]


@pytest.mark.parametrize("kind", ["sft", "kd"])
def test_packed_training_learns_and_resumes_exactly(tmp_path, tiny_teacher_dir, pairs_jsonl, kind, caplog):
    def recipe(run_dir: Path, **train_keys):
        raw = tiny_recipe(run_dir, tiny_teacher_dir, pairs_jsonl, method={"kind": kind},
                          train={"packing": True, "batch_size": 2, **train_keys})
        raw["data"]["max_length"] = 96  # room for about three examples a row
        return recipe_from_dict(raw)

    with caplog.at_level("INFO", logger="distill"):
        train(recipe(tmp_path / "a"), progress=False)
    assert "packing:" in caplog.text
    split = recipe(tmp_path / "b", checkpoint_every=100)
    assert train(split, progress=False, stop_after=3) is None
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_3"]
    train(split, progress=False)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == len(b) == 6
    assert all(math.isfinite(x) for x in a)
    assert b == pytest.approx(a, rel=1e-5)
    assert a[-1] < a[0]


def test_packing_with_a_teacher_cache_is_refused(tmp_path, tiny_teacher_dir, pairs_jsonl):
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl,
                                          teacher={"cache": str(tmp_path / "cache")}, train={"packing": True}))
    with pytest.raises(DistillError, match="train.packing does not work with teacher.cache yet"):
        train(recipe, progress=False)
