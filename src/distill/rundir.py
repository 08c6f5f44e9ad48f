"""The run directory: where every artifact of a run lives, named once (docs/architecture.md lists them)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """Every artifact path of one run directory; stages ask it instead of joining names themselves."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def recipe(self) -> Path:
        """The resolved recipe the run was made with (after --set overrides)."""
        return self.root / "recipe.yaml"

    @property
    def log(self) -> Path:
        """The run's log file."""
        return self.root / "log.txt"

    @property
    def teacher_data(self) -> Path:
        """The generate stage's resumable shards of teacher answers (and kept top-k rows under topk/)."""
        return self.root / "teacher_data"

    @property
    def filtered_data(self) -> Path:
        """The teacher answers that pass the recipe's filters (training reads this file when it exists)."""
        return self.root / "teacher_data.filtered.jsonl"

    @property
    def pairs(self) -> Path:
        """Preference pairs with their reference log-probs (`distill pairs`): resumable shards like teacher_data."""
        return self.root / "pairs"

    @property
    def student_init(self) -> Path:
        """The student as built before training (cut from the teacher, or new)."""
        return self.root / "student_init"

    @property
    def teacher_cache(self) -> Path:
        """Where `distill capture` writes the top-k cache when the recipe names no teacher.cache path."""
        return self.root / "teacher_cache"

    @property
    def checkpoints(self) -> Path:
        """Resumable training checkpoints, step_N/."""
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        """One JSON object per logged training step."""
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files (train.report_to tensorboard; by default when tensorboard is installed)."""
        return self.root / "tensorboard"

    @property
    def mlruns(self) -> Path:
        """train.report_to mlflow: MLflow's local store, unless MLFLOW_TRACKING_URI names another."""
        return self.root / "mlruns"

    @property
    def trackers(self) -> Path:
        """train.report_to wandb: where Weights & Biases keeps its run files (its own wandb/ folder inside)."""
        return self.root

    @property
    def student(self) -> Path:
        """The trained student (HF directory)."""
        return self.root / "student"

    @property
    def student_last(self) -> Path:
        """With train.keep_best: the student at the last step (student/ is then the best held-out step's)."""
        return self.root / "student_last"

    @property
    def exports(self) -> Path:
        """What the export stage shipped; eval measures each."""
        return self.root / "exports"

    @property
    def report_json(self) -> Path:
        """Every metric of teacher, student and exports."""
        return self.root / "report.json"

    @property
    def samples(self) -> Path:
        """Teacher and student answers to the eval prompts, side by side."""
        return self.root / "samples.jsonl"

    @property
    def suite_samples(self) -> Path:
        """Per-item rows of the task suites."""
        return self.root / "suite_samples.jsonl"

    @property
    def judge(self) -> Path:
        """Per-pair verdicts of the judge."""
        return self.root / "judge.jsonl"

    @property
    def report_html(self) -> Path:
        """The self-contained HTML report."""
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        """The Markdown summary."""
        return self.root / "report.md"
