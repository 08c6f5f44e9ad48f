"""The training loop: schedules, exact resume, LoRA, checkpoints, run-directory safety."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distill import stages
from distill.errors import DistillError
from distill.recipe import recipe_from_dict
from distill.training.checkpoint import list_checkpoints
from distill.training.schedule import lr_multiplier
from distill.stages import train
from conftest import logged_steps, tiny_recipe


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in logged_steps(run_dir)]


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules_warm_up_then_reach_their_floor(schedule):
    f = lr_multiplier(schedule, total_steps=100, warmup_steps=10, min_ratio=0.1, decay_fraction=0.2)
    values = [f(s) for s in range(100)]
    assert values[0] < values[5] < values[9] <= 1.0  # linear warm-up
    assert max(values) == pytest.approx(1.0, abs=0.02)
    if schedule == "constant":
        assert values[-1] == 1.0
    else:
        assert values[-1] == pytest.approx(0.1, abs=0.02)
        assert all(b <= a + 1e-12 for a, b in zip(values[10:], values[11:]))  # never rises after warm-up
    if schedule == "wsd":
        assert values[79] == 1.0 and values[80] < 1.0  # stable until the last 20%


def test_resume_continues_exactly(tmp_path, tiny_teacher_dir, pairs_jsonl):
    whole = recipe_from_dict(tiny_recipe(tmp_path / "a", tiny_teacher_dir, pairs_jsonl))
    train(whole, progress=False)
    split = recipe_from_dict(tiny_recipe(tmp_path / "b", tiny_teacher_dir, pairs_jsonl,
                                         train={"checkpoint_every": 100}))
    assert train(split, progress=False, stop_after=3) is None  # "killed" after step 3
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_3"]
    train(split, progress=False)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == len(b) == 6
    assert all(math.isfinite(x) for x in a)
    assert b == pytest.approx(a, rel=1e-5)
    assert a[-1] < a[0]  # it learns


def test_without_resume_starts_over(tmp_path, tiny_teacher_dir, pairs_jsonl):
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl))
    train(recipe, progress=False, stop_after=2)
    train(recipe, progress=False, resume=False)
    assert [r["step"] for r in logged_steps(tmp_path / "r")] == \
        [1, 2, 3, 4, 5, 6]


def test_keeps_only_newest_checkpoints(tmp_path, tiny_teacher_dir, pairs_jsonl):
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl,
                                          train={"checkpoint_every": 1, "keep_checkpoints": 2}))
    train(recipe, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "r" / "checkpoints")] == ["step_5", "step_6"]
    assert (tmp_path / "r" / "student" / "config.json").is_file()


def test_lora_trains_only_adapters_and_saves_a_plain_model(tmp_path, tiny_teacher_dir, tiny_student_dir,
                                                           pairs_jsonl):
    from transformers import AutoModelForCausalLM

    recipe = recipe_from_dict(tiny_recipe(
        tmp_path / "r", tiny_teacher_dir, pairs_jsonl,
        student={"model": str(tiny_student_dir), "config": None},
        train={"lora": {"r": 4, "alpha": 8}, "steps": 3},
    ))
    train(recipe, progress=False)
    losses = _losses(tmp_path / "r")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "student")
    assert not any("lora" in name for name, _ in saved.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    changed = any((p - q).abs().max() > 0 for p, q in zip(saved.parameters(), base.parameters()))
    assert changed  # merged adapters moved the weights


def test_sft_trains_without_teacher_logits(tmp_path, tiny_teacher_dir, pairs_jsonl):
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl,
                                          method={"kind": "sft"}, train={"steps": 4}))
    train(recipe, progress=False)
    rows = logged_steps(tmp_path / "r")
    assert all(r["kd"] == 0.0 and r["loss"] == pytest.approx(r["ce"]) for r in rows)


def test_run_dir_refuses_a_different_recipe(tmp_path, tiny_teacher_dir, pairs_jsonl):
    first = recipe_from_dict(tiny_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl))
    stages.prepare_run_dir(first)
    train(first, progress=False, stop_after=2)
    changed = recipe_from_dict(tiny_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl, train={"lr": 1e-2}))
    with pytest.raises(DistillError, match=r"train\.lr differs"):
        stages.prepare_run_dir(changed)
    longer = recipe_from_dict(tiny_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl, train={"steps": 8}))
    stages.prepare_run_dir(longer)  # more steps of the same recipe is a continuation
    stages.prepare_run_dir(changed, restart=True)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_bf16_compute_keeps_fp32_master_weights(tmp_path, tiny_teacher_dir, pairs_jsonl):
    from transformers import AutoModelForCausalLM

    recipe = recipe_from_dict(tiny_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl,
                                          train={"dtype": "bfloat16", "steps": 2}))
    train(recipe, progress=False)
    losses = _losses(tmp_path / "r")
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "student")
    assert next(saved.parameters()).dtype == torch.float32


def test_a_run_dir_from_an_older_distill_still_resumes(tmp_path, tiny_teacher_dir, pairs_jsonl):
    """Keys a newer distill added (absent from the saved recipe.yaml) are not recipe differences."""
    import yaml

    recipe = recipe_from_dict(tiny_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl))
    stages.prepare_run_dir(recipe)
    train(recipe, progress=False, stop_after=2)
    saved_path = tmp_path / "r" / "recipe.yaml"
    saved = yaml.safe_load(saved_path.read_text())
    for key in ("lmbda", "sampling", "weighting"):
        del saved["method"][key]
    del saved["train"]["eval_every"]
    saved_path.write_text(yaml.safe_dump(saved))
    stages.prepare_run_dir(recipe)  # no error: the missing keys take their defaults
    changed = recipe_from_dict(tiny_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl, train={"lr": 1e-2}))
    with pytest.raises(DistillError, match=r"train\.lr differs"):
        stages.prepare_run_dir(changed)
