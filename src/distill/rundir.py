"""The run directory: where every artifact of a run lives, named once (docs/architecture.md lists them)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

STAGES = "stages"  # <run>/stages/<name>/: one training stage's artifacts in a `stages:` recipe


@dataclass(frozen=True)
class RunDir:
    """Every artifact path of one run directory; stages ask it instead of joining names themselves.

    A training stage of a `stages:` recipe (`for_stage`) keeps its checkpoints, metrics, pairs and student under
    <run>/stages/<name>/; the final stage's student is <run>/student (what export and eval read). A stage with data
    of its own also keeps its filtered teacher answers and default teacher cache there.
    """

    root: Path
    stage: Optional[str] = None
    final: bool = True  # the final stage: its student (and student_last) are the run's
    own_data: bool = False  # the stage overrides the recipe's data section

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def for_stage(self, name: str, *, final: bool, own_data: bool = False) -> "RunDir":
        """The paths of the training stage `name` of this run."""
        return replace(self, stage=name, final=final, own_data=own_data)

    @property
    def stage_root(self) -> Path:
        """Where this stage's own artifacts live (the run directory itself outside a `stages:` recipe)."""
        return self.root if self.stage is None else self.root / STAGES / self.stage

    @property
    def stages(self) -> Path:
        """The training stages' directories of a `stages:` recipe."""
        return self.root / STAGES

    def _data_root(self) -> Path:
        return self.stage_root if self.own_data else self.root

    def _student_root(self) -> Path:
        return self.root if self.final else self.stage_root

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
        return self._data_root() / "teacher_data.filtered.jsonl"

    @property
    def pairs(self) -> Path:
        """Preference pairs with their reference log-probs (`distill pairs`): resumable shards like teacher_data."""
        return self.stage_root / "pairs"

    @property
    def pairs_filter_report(self) -> Path:
        """What the filter section dropped of the built pairs, per filter (`distill pairs` with `filter:`)."""
        return self.stage_root / "pairs.filter.report.json"

    @property
    def student_init(self) -> Path:
        """The student as built before training (cut from the teacher, or new)."""
        return self.root / "student_init"

    @property
    def sampler_model(self) -> Path:
        """The student's config and tokenizer that method.sampling.engine: vllm builds its engine from."""
        return self.stage_root / "sampler_model"

    @property
    def teacher_cache(self) -> Path:
        """Where `distill capture` writes the top-k cache when the recipe names no teacher.cache path."""
        return self._data_root() / "teacher_cache"

    @property
    def checkpoints(self) -> Path:
        """Resumable training checkpoints, step_N/."""
        return self.stage_root / "checkpoints"

    @property
    def metrics(self) -> Path:
        """One JSON object per logged training step."""
        return self.stage_root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files (train.report_to tensorboard; by default when tensorboard is installed)."""
        return self.stage_root / "tensorboard"

    @property
    def mlruns(self) -> Path:
        """train.report_to mlflow: MLflow's local store (one for all stages), unless MLFLOW_TRACKING_URI names another."""
        return self.root / "mlruns"

    @property
    def trackers(self) -> Path:
        """train.report_to wandb: where Weights & Biases keeps its run files (its own wandb/ folder inside)."""
        return self.root

    @property
    def tracker_run_name(self) -> str:
        """How trackers name this training: the run directory's name, and the stage's in a `stages:` recipe."""
        return self.root.name if self.stage is None else f"{self.root.name}/{self.stage}"

    @property
    def student(self) -> Path:
        """The trained student (HF directory)."""
        return self._student_root() / "student"

    @property
    def student_last(self) -> Path:
        """With train.keep_best: the student at the last step (student/ is then the best held-out step's)."""
        return self._student_root() / "student_last"

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
