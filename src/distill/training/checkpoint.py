"""Checkpoints that let a killed run continue exactly: weights, optimizer, schedule, RNG and step."""
from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import safetensors.torch
import torch

from distill.errors import DistillError
from distill.runtime import atomic_directory, remove_stale_temporaries

STEP_PREFIX = "step_"
MATCHER_FILE = "matcher.safetensors"
TRAINER_STATE = "trainer_state.pt"
BEST_STATE = "best.json"  # train.keep_best: the best held-out value so far, its step, evals since, early stop
BEST_WEIGHTS = "best.safetensors"  # the student at that step, when it is not this checkpoint's own step


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, lists and numbers: torch.load(weights_only=True) reads it without code."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state = {
        "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    checkpoint_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any, keep: int, matcher: torch.nn.Module | None = None, training_set: str = "",
    best: dict | None = None, best_weights: dict[str, torch.Tensor] | None = None,
    gathered: tuple[dict, dict, dict | None] | None = None,
) -> Path:
    """Write checkpoints/step_N atomically, then drop all but the newest `keep`.

    `matcher` is a training-only module the optimizer also steps (hidden-state projections); it is saved
    beside the student as matcher.safetensors. `training_set` (a hash of the data) is kept so that a resume on
    other data is refused. `best` (JSON values) and `best_weights` (the student at the best step, when that is an
    earlier step) keep train.keep_best's best-so-far. `gathered` (student, optimizer and matcher states gathered
    whole from FSDP's shards) replaces what the modules' own state dicts would give.
    """
    final = checkpoint_dir / f"{STEP_PREFIX}{step}"
    remove_stale_temporaries(checkpoint_dir)  # a killed save's half-written step_N (only this run writes here)
    with atomic_directory(final) as tmp:
        optimizer_state = optimizer.state_dict() if gathered is None else gathered[1]
        if gathered is None:  # save_model (not save_file) copes with tied weights that share storage
            safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
            if matcher is not None:
                safetensors.torch.save_model(matcher, str(tmp / MATCHER_FILE))
        else:
            safetensors.torch.save_file(_untied(model, gathered[0]), str(tmp / "model.safetensors"))
            if gathered[2] is not None:
                safetensors.torch.save_file(_untied(matcher, gathered[2]), str(tmp / MATCHER_FILE))
        if best is not None:
            (tmp / BEST_STATE).write_text(json.dumps(best))
        if best_weights is not None:
            safetensors.torch.save_file({k: v.contiguous() for k, v in best_weights.items()}, str(tmp / BEST_WEIGHTS))
        torch.save(
            {"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
             "rng": _rng_state(), "training_set": training_set},
            tmp / TRAINER_STATE,
        )
    for old in list_checkpoints(checkpoint_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _untied(model: torch.nn.Module, whole: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gathered tensors with one name per parameter the model shares (tied embeddings), as save_model keeps."""
    every_parameter = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    first_names = {name for name, _ in model.named_parameters()}  # a shared parameter under its first name only
    return {name: tensor.contiguous() for name, tensor in whole.items()
            if name in first_names or name not in every_parameter}


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs of an interrupted save are ignored)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
             and (p / TRAINER_STATE).is_file() and (p / "model.safetensors").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    matcher: torch.nn.Module | None = None, training_set: str = "",
) -> int:
    """Restore a checkpoint into live objects; return the number of completed steps.

    A checkpoint trained on another training set (its hash differs from `training_set`) is refused.
    """
    load_weights(path, model, matcher)
    return load_trainer_state(path, optimizer, scheduler, training_set)


def load_weights(path: Path, model: torch.nn.Module, matcher: torch.nn.Module | None = None) -> None:
    """The checkpoint's student (and hidden-state projections) into unsharded modules."""
    missing, unexpected = safetensors.torch.load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise DistillError(
            f"{path}: checkpoint does not match the student (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "was the recipe's student changed? Start a new output_dir or drop --resume"
        )
    _load_matcher(path, matcher)


def load_trainer_state(
    path: Path, optimizer: torch.optim.Optimizer, scheduler: Any, training_set: str = "",
    shard: Callable[[dict, torch.optim.Optimizer], dict] | None = None,
) -> int:
    """The checkpoint's optimizer (its moments sharded by `shard` under FSDP), schedule and RNG; its step."""
    state = _trainer_state(path / TRAINER_STATE)
    if state.get("training_set") and training_set and state["training_set"] != training_set:
        raise DistillError(f"{path}: this checkpoint was trained on other data (the training set changed since: edited "
                           "data files, or teacher answers that failed before and were answered on a re-run); restore "
                           "the data, choose a new output_dir, or pass --restart to discard the checkpoints")
    optimizer.load_state_dict(state["optimizer"] if shard is None else shard(state["optimizer"], optimizer))
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return int(state["step"])


def read_best(path: Path) -> dict | None:
    """The best-so-far state a checkpoint keeps (train.keep_best), or None when it keeps none."""
    file = path / BEST_STATE
    if not file.is_file():
        return None
    try:
        state = json.loads(file.read_text())
    except (ValueError, OSError) as err:
        raise DistillError(f"{file}: unreadable ({err.__class__.__name__}); re-run with --restart") from None
    if not isinstance(state, dict) or not isinstance(state.get("metric"), str):
        raise DistillError(f"{file}: not a best-so-far state; re-run with --restart")
    return state


def read_best_weights(path: Path) -> dict[str, torch.Tensor] | None:
    """The student at the best step, when the checkpoint keeps it apart from its own weights; else None."""
    file = path / BEST_WEIGHTS
    return safetensors.torch.load_file(str(file)) if file.is_file() else None


def _trainer_state(file: Path) -> dict[str, Any]:
    """Optimizer, schedule, RNG and step, read without running any code the file may carry."""
    refused = (f"{file}: refusing to load it: it holds more than tensors and plain values (a checkpoint of an "
               "older distill, or a tampered file); re-run with --restart")
    try:
        # weights_only: a pickle naming any other global (a __reduce__ payload, numpy arrays) is rejected unrun.
        state = torch.load(file, weights_only=True)
    except pickle.UnpicklingError:
        raise DistillError(refused) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:  # truncated or not a torch file
        raise DistillError(f"{file}: unreadable checkpoint state ({err.__class__.__name__}); "
                           "re-run with --restart") from None
    if not _is_trainer_state(state):
        raise DistillError(refused)
    return state


def _is_trainer_state(state: Any) -> bool:
    """The keys save_checkpoint writes, with the RNG states in this version's layout."""
    if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "rng"} <= state.keys():
        return False
    rng = state["rng"]
    return isinstance(rng, dict) and isinstance(rng.get("python"), dict) and isinstance(rng.get("numpy"), dict)


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
