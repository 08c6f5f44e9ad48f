"""train.report_to: experiment trackers through accelerate's tracker API get what metrics.jsonl gets."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import logged_evals, logged_steps, tiny_recipe
from distill.cli import main
from distill.recipe import recipe_from_dict
from distill.stages import prepare_run_dir, train
from distill.training.trackers import flat_config, installed


def _scalars(event_dir) -> dict[str, dict[int, float]]:
    """Every scalar TensorBoard reads back from the event files: {tag: {step: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, dict[int, float]] = {}
    for events in sorted(event_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return found


def test_tensorboard_gets_every_logged_step_and_evaluation(tmp_path, tiny_teacher_dir, pairs_jsonl):
    if not installed("tensorboard"):
        pytest.skip("tensorboard is not installed (pip install 'distill[tensorboard]')")
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl,
                                          train={"report_to": ["tensorboard"], "eval_every": 3}))
    prepare_run_dir(recipe)
    train(recipe, progress=False)
    scalars = _scalars(tmp_path / "run" / "tensorboard")
    steps, evals = logged_steps(tmp_path / "run"), logged_evals(tmp_path / "run")
    assert {s["step"]: pytest.approx(s["loss"]) for s in steps} == scalars["train/loss"]
    assert {s["step"]: pytest.approx(s["grad_norm"]) for s in steps} == scalars["train/grad_norm"]
    assert {e["step"]: pytest.approx(e["eval_loss"]) for e in evals} == scalars["eval/loss"]
    assert len(evals) == 2


def test_no_tracker_writes_nothing_and_trackers_can_change_on_resume(tmp_path, tiny_teacher_dir, pairs_jsonl):
    spec = tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl, train={"report_to": []})
    recipe = recipe_from_dict(spec)
    prepare_run_dir(recipe)
    assert train(recipe, progress=False, stop_after=2) is None
    assert not (tmp_path / "run" / "tensorboard").exists()
    spec["train"]["report_to"] = ["tensorboard"] if installed("tensorboard") else []
    resumed = recipe_from_dict(spec)
    prepare_run_dir(resumed)  # another tracker list is not another recipe
    assert train(resumed, progress=False).steps == 6
    assert [s["step"] for s in logged_steps(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_tracker_that_is_not_installed_is_one_line_before_any_model_loads(tmp_path, capsys, pairs_jsonl, name):
    if installed(name):
        pytest.skip(f"{name} is installed here")
    spec = tiny_recipe(tmp_path / "run", tmp_path / "no-such-teacher", pairs_jsonl, train={"report_to": [name]})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"distill: error: train.report_to: {name} is not installed (pip install ")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_unknown_tracker_names_the_key(tmp_path, tiny_teacher_dir, pairs_jsonl):
    with pytest.raises(Exception, match="report_to"):
        recipe_from_dict(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl, train={"report_to": ["neptune"]}))


def test_the_recipe_reaches_trackers_as_flat_scalars():
    flat = flat_config({"train": {"lr": 0.001, "betas": [0.9, 0.95], "lora": None, "report_to": ["wandb"]},
                        "seed": 3})
    assert flat == {"train.lr": 0.001, "train.betas": "[0.9, 0.95]", "train.lora": "None",
                    "train.report_to": "['wandb']", "seed": 3}
    assert json.dumps(flat)  # every value is a plain scalar
