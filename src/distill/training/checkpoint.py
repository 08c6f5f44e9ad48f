"""Checkpoints that let a killed run continue exactly: weights, optimizer, schedule, RNG and step."""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from distill.errors import DistillError
from distill.runtime import atomic_directory

STEP_PREFIX = "step_"
MATCHER_FILE = "matcher.safetensors"


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    checkpoint_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any, keep: int, matcher: torch.nn.Module | None = None,
) -> Path:
    """Write checkpoints/step_N atomically, then drop all but the newest `keep`.

    `matcher` is a training-only module the optimizer also steps (hidden-state projections); it is saved
    beside the student as matcher.safetensors.
    """
    final = checkpoint_dir / f"{STEP_PREFIX}{step}"
    with atomic_directory(final) as tmp:
        # save_model (not save_file) copes with tied weights that share storage.
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        if matcher is not None:
            safetensors.torch.save_model(matcher, str(tmp / MATCHER_FILE))
        torch.save(
            {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": _rng_state()},
            tmp / "trainer_state.pt",
        )
    for old in list_checkpoints(checkpoint_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs of an interrupted save are ignored)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
             and (p / "trainer_state.pt").is_file() and (p / "model.safetensors").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    matcher: torch.nn.Module | None = None,
) -> int:
    """Restore a checkpoint into live objects; return the number of completed steps."""
    missing, unexpected = safetensors.torch.load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise DistillError(
            f"{path}: checkpoint does not match the student (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "was the recipe's student changed? Start a new output_dir or drop --resume"
        )
    _load_matcher(path, matcher)
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return int(state["step"])


def _load_matcher(path: Path, matcher: torch.nn.Module | None) -> None:
    """Restore the hidden-state projections; the checkpoint must have them exactly when the run does."""
    saved = (path / MATCHER_FILE).is_file()
    if saved != (matcher is not None):
        state = "has" if saved else "has no"
        raise DistillError(
            f"{path}: checkpoint {state} hidden-state projections ({MATCHER_FILE}) but the recipe "
            f"{'no longer sets' if saved else 'sets'} method.hidden; start a new output_dir or drop --resume"
        )
    if matcher is None:
        return
    try:
        missing, unexpected = safetensors.torch.load_model(matcher, str(path / MATCHER_FILE), strict=False)
    except RuntimeError:  # a projection of another shape
        missing, unexpected = ["(shape mismatch)"], []
    if missing or unexpected:
        raise DistillError(
            f"{path}: {MATCHER_FILE} does not match method.hidden (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); was method.hidden.layer_map changed? Start a new output_dir or drop --resume"
        )
