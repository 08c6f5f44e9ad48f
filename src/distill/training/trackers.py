"""Experiment trackers (train.report_to) through accelerate's tracker API: TensorBoard, Weights & Biases, MLflow.

Every tracker writes under the run directory unless its own environment says otherwise (WANDB_MODE=offline,
MLFLOW_TRACKING_URI), so none needs a network. metrics.jsonl stays the run's record; trackers get a copy.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from distill.errors import DistillError

TRACKERS = ("tensorboard", "wandb", "mlflow")
INSTALL = {"tensorboard": "pip install 'distill[tensorboard]'", "wandb": "pip install wandb",
           "mlflow": "pip install mlflow-skinny"}


def installed(name: str) -> bool:
    """Whether the tracker's own library imports here."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
            "mlflow": is_mlflow_available}[name]()


def check_trackers(names: Sequence[str]) -> None:
    """Refuse a requested tracker that is not installed (one line), before any model loads."""
    for name in names:
        if not installed(name):
            raise DistillError(f"train.report_to: {name} is not installed ({INSTALL[name]}), or remove it from "
                               "train.report_to")


def open_trackers(names: Optional[Sequence[str]], *, tensorboard_dir: Path, mlflow_dir: Path, wandb_dir: Path,
                  run_name: str, config: dict) -> list:
    """Started trackers for `names`, given the recipe as their configuration; None means TensorBoard when installed
    (distill's default), else none."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    if names is None:
        names = ["tensorboard"] if installed("tensorboard") else []
    check_trackers(names)
    trackers = []
    for name in names:
        if name == "tensorboard":
            tracker = TensorBoardTracker("", tensorboard_dir)  # an empty run name: events straight in the folder
        elif name == "wandb":
            tracker = WandBTracker(run_name, project=os.environ.get("WANDB_PROJECT", "distill"), dir=str(wandb_dir))
        else:
            if "MLFLOW_TRACKING_URI" not in os.environ:
                import mlflow

                mlflow.set_tracking_uri(mlflow_dir.resolve().as_uri())
            tracker = MLflowTracker(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "distill"),
                                    run_name=run_name)
        tracker.start()
        tracker.store_init_configuration(flat_config(config))
        trackers.append(tracker)
    return trackers


def flat_config(config: dict, prefix: str = "") -> dict:
    """A nested recipe as dotted keys with the scalar values trackers accept (lists and nulls as text)."""
    flat: dict = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat
