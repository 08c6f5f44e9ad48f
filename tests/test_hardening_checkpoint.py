"""Resuming never runs code from a checkpoint: trainer_state.pt loads with torch.load(weights_only=True)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distill.cli import main
from distill.errors import DistillError
from distill.recipe import recipe_from_dict
from distill.training.checkpoint import TRAINER_STATE, list_checkpoints, load_checkpoint, save_checkpoint
from distill.stages import train
from conftest import tiny_recipe


class _Payload:
    """Pickles as a call that writes `marker`: what a tampered trainer_state.pt would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _tiny_training_objects():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_trainer_state_loads_without_code_and_restores_every_rng(tmp_path):
    model, optimizer, scheduler = _tiny_training_objects()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    path = save_checkpoint(tmp_path / "checkpoints", 1, model, optimizer, scheduler, keep=2)
    expected = (random.random(), np.random.standard_normal(), np.random.random(), torch.rand(2).tolist())

    state = torch.load(path / TRAINER_STATE, weights_only=True)  # raises on any global beyond tensors and containers
    assert set(state) == {"step", "optimizer", "scheduler", "rng", "training_set"}

    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    fresh_model, fresh_optimizer, fresh_scheduler = _tiny_training_objects()
    assert load_checkpoint(path, fresh_model, fresh_optimizer, fresh_scheduler) == 1
    assert (random.random(), np.random.standard_normal(), np.random.random(), torch.rand(2).tolist()) == expected
    assert fresh_scheduler.last_epoch == scheduler.last_epoch
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_a_tampered_trainer_state_is_refused_and_its_code_never_runs(tmp_path, tiny_teacher_dir, pairs_jsonl,
                                                                     capsys):
    raw = tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl)
    recipe = recipe_from_dict(raw)
    assert train(recipe, progress=False, stop_after=2) is None
    (checkpoint,) = list_checkpoints(tmp_path / "run" / "checkpoints")
    state_file = checkpoint / TRAINER_STATE
    marker = tmp_path / "payload_ran"
    state = torch.load(state_file, weights_only=True)
    torch.save({**state, "extra": _Payload(marker)}, state_file)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(raw))

    assert main(["train", str(recipe_file), "--no-progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distill: error:")]
    assert not marker.exists()  # the payload did not run
    assert len(errors) == 1, errors  # one line (exit code 2: a DistillError, not a crash)
    assert errors[0].startswith(f"distill: error: {state_file}: refusing to load") and "--restart" in errors[0]
    # The file really carries a payload: loading it the unsafe way would have run it.
    torch.load(state_file, weights_only=False)
    assert marker.read_text() == "pwned"


def test_an_old_format_trainer_state_is_refused_with_the_way_out(tmp_path):
    model, optimizer, scheduler = _tiny_training_objects()
    path = save_checkpoint(tmp_path / "checkpoints", 1, model, optimizer, scheduler, keep=2)
    # What distill wrote before: RNG states as Python tuples with a numpy array inside.
    torch.save({"step": 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}},
               path / TRAINER_STATE)
    with pytest.raises(DistillError) as caught:
        load_checkpoint(path, *_tiny_training_objects())
    message = str(caught.value)
    assert message.startswith(f"{path / TRAINER_STATE}: refusing to load") and "re-run with --restart" in message
    assert "\n" not in message


def test_a_truncated_trainer_state_is_one_clear_error(tmp_path):
    model, optimizer, scheduler = _tiny_training_objects()
    path = save_checkpoint(tmp_path / "checkpoints", 1, model, optimizer, scheduler, keep=2)
    data = (path / TRAINER_STATE).read_bytes()
    (path / TRAINER_STATE).write_bytes(data[: len(data) // 2])
    with pytest.raises(DistillError, match=r"trainer_state\.pt: unreadable checkpoint state .*--restart"):
        load_checkpoint(path, *_tiny_training_objects())
