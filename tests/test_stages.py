"""The stage layer: facts decided once (the teacher's dtype), a diverging run stops, a changed training set refuses
to resume."""
from __future__ import annotations


import pytest
import torch

from conftest import logged_steps, tiny_recipe
from distill.cli import main
from distill.errors import DistillError
from distill.recipe import recipe_from_dict
from distill.stages import capture, evaluate, facts, train
from distill.training.checkpoint import list_checkpoints

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize("teacher_dtype", ["auto", "float32", "bfloat16"])
@pytest.mark.parametrize("train_dtype", ["auto", "float32", "bfloat16"])
def test_teacher_dtype_follows_one_rule_on_a_bf16_gpu(tmp_path, tiny_teacher_dir, pairs_jsonl, monkeypatch,
                                                     teacher_dtype, train_dtype):
    """On a bf16-capable GPU: an explicit teacher.dtype wins; `auto` follows train.dtype (auto -> bf16)."""
    monkeypatch.setattr(facts, "device", lambda recipe: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: True)
    recipe = recipe_from_dict(tiny_recipe(tmp_path, tiny_teacher_dir, pairs_jsonl, teacher={"dtype": teacher_dtype},
                                          train={"dtype": train_dtype}))
    train_expected = DTYPES.get(train_dtype, torch.bfloat16)
    expected = DTYPES.get(teacher_dtype, train_expected)
    assert facts.compute_dtype(recipe) == train_expected
    assert facts.teacher_dtype(recipe) == expected


@pytest.mark.parametrize("teacher_dtype,train_dtype", [("auto", "float32"), ("bfloat16", "float32"),
                                                       ("float32", "bfloat16")])
def test_capture_live_kd_and_eval_load_the_teacher_in_the_same_dtype(tmp_path, tiny_teacher_dir, pairs_jsonl,
                                                                    monkeypatch, teacher_dtype, train_dtype):
    loads = []
    real_load = facts.load_model

    def recording_load(path, gguf=None, **kwargs):
        loads.append(kwargs["dtype"])
        return real_load(path, gguf, **kwargs)

    monkeypatch.setattr(facts, "load_model", recording_load)
    sections = dict(teacher={"dtype": teacher_dtype}, train={"dtype": train_dtype, "steps": 2},
                    eval={"measure_speed": False, "before_training": False, "general_text": False})
    live = recipe_from_dict(tiny_recipe(tmp_path / "live", tiny_teacher_dir, pairs_jsonl, **sections))
    train(live, progress=False)  # loads the teacher for the student and live KD
    evaluate(live, progress=False)
    cached = recipe_from_dict(tiny_recipe(tmp_path / "cached", tiny_teacher_dir, pairs_jsonl, **{
        **sections, "teacher": {"dtype": teacher_dtype, "cache": str(tmp_path / "cache"), "cache_k": 8}}))
    capture(cached, progress=False)
    expected = facts.teacher_dtype(live)
    assert len(loads) == 3 and set(loads) == {expected}, loads
    assert expected == DTYPES.get(teacher_dtype, DTYPES[train_dtype])


def _diverging(tmp_path, tiny_teacher_dir, pairs_jsonl, **train_keys):
    return recipe_from_dict(tiny_recipe(tmp_path, tiny_teacher_dir, pairs_jsonl, train={
        "steps": 8, "checkpoint_every": 2, "lr": 3e-3, "max_grad_norm": None, **train_keys}))


def _poison_from(step: int, monkeypatch):
    """Make every optimizer step from `step` (1-based) produce a NaN loss, as a diverged run does."""
    from distill.training import loop

    real = loop.loss_on_batch
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= step:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loop, "loss_on_batch", poisoned)


def test_a_diverging_run_stops_at_the_first_nan_keeping_the_last_good_checkpoint(
        tmp_path, tiny_teacher_dir, pairs_jsonl, monkeypatch, capsys):
    recipe = _diverging(tmp_path, tiny_teacher_dir, pairs_jsonl)
    _poison_from(5, monkeypatch)
    with pytest.raises(DistillError, match=r"step 5 diverged.*step_4"):
        train(recipe, progress=False)
    assert [p.name for p in list_checkpoints(recipe.run_dir / "checkpoints")] == ["step_2", "step_4"]
    assert not (recipe.run_dir / "student").exists()  # no student saved, let alone a NaN one
    for path in list_checkpoints(recipe.run_dir / "checkpoints"):
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values())


def test_the_cli_exits_2_with_one_line_naming_the_step(tmp_path, tiny_teacher_dir, pairs_jsonl, monkeypatch, capsys):
    import yaml

    _poison_from(3, monkeypatch)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl)))
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("distill: error: train: step 3 diverged") and "Traceback" not in "\n".join(err)


def test_nan_tolerance_skips_non_finite_steps_without_an_update(tmp_path, tiny_teacher_dir, pairs_jsonl,
                                                                monkeypatch):
    from distill.training import loop

    real, calls = loop.loss_on_batch, {"n": 0}

    def one_bad_step(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loop, "loss_on_batch", one_bad_step)
    recipe = _diverging(tmp_path, tiny_teacher_dir, pairs_jsonl, nan_tolerance=1)
    result = train(recipe, progress=False)
    metrics = logged_steps(recipe.run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert metrics[2]["loss"] != metrics[2]["loss"]  # the skipped step is logged as it was (NaN)
    assert all(m["loss"] == m["loss"] for i, m in enumerate(metrics) if i != 2)
    assert result.final_loss == result.final_loss


def test_a_changed_training_set_refuses_to_resume(tmp_path, tiny_teacher_dir, pairs_jsonl):
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl))
    assert train(recipe, progress=False, stop_after=2) is None
    lines = pairs_jsonl.read_text().splitlines()
    pairs_jsonl.write_text("\n".join(lines[:-1]) + "\n")  # one example fewer, edited between kill and resume
    with pytest.raises(DistillError, match="step_2: this checkpoint was trained on other data"):
        train(recipe, progress=False)
    pairs_jsonl.write_text("\n".join(lines) + "\n")  # restored: resumes
    assert train(recipe, progress=False).steps == 6


def test_a_finished_run_rerun_reports_the_logged_loss_not_nan(tmp_path, tiny_teacher_dir, pairs_jsonl):
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl))
    first = train(recipe, progress=False)
    (recipe.run_dir / "student" / "config.json").unlink()  # killed between the last checkpoint and the save
    again = train(recipe, progress=False)
    assert again.final_loss == pytest.approx(first.final_loss)


def test_a_teacher_replaced_at_the_same_path_invalidates_its_cache(tmp_path, tiny_teacher_dir, pairs_jsonl):
    import shutil

    from transformers import AutoModelForCausalLM

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", teacher, pairs_jsonl, student={
        "model": str(tiny_teacher_dir), "config": None}, teacher={"cache": str(tmp_path / "cache"), "cache_k": 8}))
    capture(recipe, progress=False)
    assert train(recipe, progress=False, stop_after=1) is None  # the cache is accepted as captured
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    model.save_pretrained(teacher)  # other weights, same path and config
    with pytest.raises(DistillError, match="teacher's weight files changed since this cache was captured"):
        train(recipe, progress=False)


@pytest.mark.parametrize("command", ["train", "run"])
def test_a_malformed_data_file_fails_before_any_model_is_built(tmp_path, tiny_teacher_dir, pairs_jsonl, capsys,
                                                              command):
    import yaml

    with pairs_jsonl.open("a") as f:
        f.write("{not json\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl)))
    assert main([command, str(path), "--no-progress"]) == 2
    assert str(pairs_jsonl) in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "student_init").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_directory_that_is_not_a_model_names_the_recipe_key(tmp_path, tiny_teacher_dir, pairs_jsonl, capsys):
    import yaml

    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("hello")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl, student={
        "model": str(not_a_model), "config": None})))
    assert main(["train", str(path), "--no-progress"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("distill: error: student.model: ") and str(not_a_model) in line and "config.json" in line
