"""The typed recipe schema: one YAML file drives every stage."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distill.errors import DistillError

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# The filter section's classes live beside the filters they configure; they subclass Section, so import after it.
from distill.data.filters import FilterSpec  # noqa: E402
from distill.data.examples import HUB_DATASET  # noqa: E402  # data.prompts may name a hub dataset


class TeacherSpec(Section):
    """Where the teacher comes from: a hub id, a local HF directory, a .gguf file or pkg://package/file."""

    model: str
    gguf_file: Optional[str] = None  # for a hub repo or directory that holds several .gguf files
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    # How a local teacher writes text (generate, the filter's judge): transformers in-process, or vLLM's offline
    # engine (much faster, but it needs a CUDA GPU and `pip install vllm`). Training and eval load it with transformers.
    engine: Literal["transformers", "vllm"] = "transformers"
    # A top-k cache of the teacher's log-probs (`distill capture` writes it): KD trains from it without
    # loading the teacher's weights; `model` still names the tokenizer and the teacher the cache must come from.
    cache: Optional[str] = None
    cache_k: int = Field(default=64, gt=0)  # log-probs kept per position at capture
    cache_exact: bool = False  # float32 log-probs instead of quantized ones (~2.7x larger)
    # An OpenAI-compatible server (vLLM, llama.cpp, Ollama, `distill serve`, a hosted API) writes the teacher data;
    # `model` is then the model name the server knows. The key is read from the env var named here, never logged.
    endpoint: Optional[str] = None  # e.g. http://127.0.0.1:8000/v1
    api_key_env: Optional[str] = None
    concurrency: int = Field(default=8, gt=0)  # requests in flight
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=5, ge=0)

    @model_validator(mode="after")
    def _one_way_to_generate(self) -> "TeacherSpec":
        if self.engine == "vllm" and self.endpoint is not None:
            raise ValueError("teacher.engine: vllm runs a local teacher; remove it or teacher.endpoint")
        return self


class StudentConfig(Section):
    """Shape of a student built from scratch on the teacher's tokenizer (Llama layout)."""

    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: Optional[int] = Field(default=None, gt=0)
    intermediate_size: Optional[int] = Field(default=None, gt=0)  # default: ~2.75 x hidden, multiple of 64
    tie_embeddings: bool = True
    max_position_embeddings: Optional[int] = None  # default: the teacher's


class CalibrationSpec(Section):
    """Text the pruner runs the teacher on to measure which layers, channels and heads matter."""

    file: Optional[str] = None  # default: the recipe's training data (teacher answers), else its prompts
    samples: int = Field(default=64, gt=0)
    max_length: int = Field(default=256, gt=8)


class FromTeacherSpec(Section):
    """A student cut out of the teacher: fewer layers (depth) and/or narrower layers (width)."""

    layers: Optional[int] = Field(default=None, gt=0)  # how many teacher layers to keep
    keep_layers: Optional[list[int]] = None  # or exactly which ones (0-based)
    layer_selection: Literal["importance", "uniform"] = "importance"  # how `layers` are chosen
    layer_importance: Literal["block_influence", "skip_loss"] = "block_influence"
    hidden_size: Optional[int] = Field(default=None, gt=0)  # width targets; None keeps the teacher's
    intermediate_size: Optional[int] = Field(default=None, gt=0)
    num_heads: Optional[int] = Field(default=None, gt=0)
    num_kv_heads: Optional[int] = Field(default=None, gt=0)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    @model_validator(mode="after")
    def _one_depth_rule(self) -> "FromTeacherSpec":
        if self.layers is not None and self.keep_layers is not None:
            raise ValueError("give student.from_teacher.layers or keep_layers, not both")
        if self.keep_layers is not None and len(set(self.keep_layers)) != len(self.keep_layers):
            raise ValueError("student.from_teacher.keep_layers: a layer is listed twice")
        return self


class StudentSpec(Section):
    """An existing model (`model`), a new one (`config` or `preset`), or one cut from the teacher (`from_teacher`)."""

    model: Optional[str] = None
    gguf_file: Optional[str] = None
    config: Optional[StudentConfig] = None
    preset: Optional[str] = None  # a named StudentConfig, see distill.models.presets
    from_teacher: Optional[FromTeacherSpec] = None
    init_embeddings: Literal["random", "slice", "project"] = "project"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> "StudentSpec":
        given = [k for k in ("model", "config", "preset", "from_teacher") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of student.model, student.config, student.preset or student.from_teacher"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    @property
    def built_from_teacher(self) -> bool:
        """Whether the student is made from the teacher's weights or shape (so training needs the teacher)."""
        return self.model is None


class DataSpec(Section):
    """Training data: prompts for the teacher to answer, and/or ready-made examples."""

    prompts: Optional[str] = None  # JSONL of prompts (or hf://OWNER/NAME, a hub dataset); the teacher answers them
    prompts_split: str = "train"  # for hf:// prompts: the dataset split
    prompts_config: Optional[str] = None  # for hf:// prompts: the dataset configuration (e.g. "main" for gsm8k)
    train: Optional[str] = None  # JSONL of prompt/response, messages, or text; or a .txt file
    eval: Optional[str] = None  # held-out examples; default: a split of the training data
    eval_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    max_eval_examples: int = Field(default=64, gt=0)
    system_prompt: Optional[str] = None
    max_length: int = Field(default=512, gt=8)
    text_files: list[str] = Field(default_factory=list)  # plain reference text for perplexity
    # The prompt file's own key names, ours -> theirs: e.g. {prompt: question, reference: answer} for GSM8K.
    fields: dict[str, str] = Field(default_factory=dict)
    on_error: Literal["stop", "skip"] = "stop"  # malformed prompt records: stop at the first, or skip and count

    @model_validator(mode="after")
    def _some_data(self) -> "DataSpec":
        if self.prompts is None and self.train is None:
            raise ValueError("give data.prompts (for the teacher to answer) or data.train")
        return self


class GenerationTeacherSpec(Section):
    """Another teacher that writes answers (a mixture of teachers); `teacher` stays the KD and tokenizer teacher."""

    model: str  # hub id, directory, .gguf or pkg://; with `endpoint`, the model name the server knows
    gguf_file: Optional[str] = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    endpoint: Optional[str] = None
    api_key_env: Optional[str] = None
    concurrency: int = Field(default=8, gt=0)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=5, ge=0)
    tags: list[str] = Field(default_factory=list)  # mixture "route": prompts with one of these tags come here


class GenerateSpec(Section):
    """How the teacher answers the prompts (response distillation data)."""

    max_new_tokens: int = Field(default=256, gt=0)
    # Longer prompts are skipped and counted (data.on_error: stop refuses them); default: the teacher's context
    # less max_new_tokens (a served teacher's context is unknown: only an explicit value applies there).
    max_prompt_tokens: Optional[int] = Field(default=None, gt=0)
    batch_size: int = Field(default=8, gt=0)
    temperature: float = Field(default=0.0, ge=0.0)  # 0 = greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_prompts: Optional[int] = Field(default=None, gt=0)
    samples: int = Field(default=1, gt=0)  # answers per prompt (needs temperature > 0 when > 1)
    stop: list[str] = Field(default_factory=list)  # stop strings
    # Chain of thought: ask the teacher to reason step by step, then keep the reasoning in the training text
    # or strip it (train on the final answer only; the reasoning stays in the record).
    reasoning: Literal["off", "keep", "strip"] = "off"
    reasoning_prompt: str = (
        "Think step by step and show your reasoning. Then give the final answer on its own line, "
        "starting with 'Answer:'."
    )
    answer_marker: str = "Answer:"
    shard_records: int = Field(default=5000, gt=0)  # records per teacher-data shard
    # More teachers: "route" sends each prompt to the first of them whose tags it has (else to `teacher`);
    # "all" has every teacher answer every prompt (keep the best with filter.judge.best_per_prompt).
    teachers: list[GenerationTeacherSpec] = Field(default_factory=list)
    mixture: Literal["route", "all"] = "route"
    # Keep the teacher's top-k log-probs (teacher.cache_k) at every token it writes, so `distill capture` builds
    # the teacher cache from them instead of a second teacher pass. Default (null): on for a local teacher when
    # teacher.cache is set and method.kind is kd; set true for a served teacher that returns top_logprobs.
    capture_topk: Optional[bool] = None

    @model_validator(mode="after")
    def _samples_need_sampling(self) -> "GenerateSpec":
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("generate.samples > 1 needs generate.temperature > 0 (greedy answers are all the same)")
        return self


class HiddenStateSpec(Section):
    """Hidden-state KD: student layer i's output matches teacher layer j's, through a learned projection."""

    weight: float = Field(default=1.0, gt=0.0)  # added to the logit loss
    loss: Literal["mse", "cosine"] = "mse"  # mse is normalised by the teacher states' mean square
    layer_map: Optional[list[tuple[int, int]]] = None  # [[student, teacher], ...]; default: derived


class MethodSpec(Section):
    """What the student learns from: teacher logits (kd) or only teacher text (sft)."""

    kind: Literal["kd", "sft"] = "kd"
    divergence: Divergence = "forward_kl"
    temperature: float = Field(default=1.0, gt=0.0)
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)  # weight of cross-entropy on labels; 1-alpha on KD
    beta: float = Field(default=0.5, gt=0.0, lt=1.0)  # JSD mixing weight
    skew: float = Field(default=0.1, ge=0.0, lt=1.0)  # skew KL mixing weight
    chunk_size: int = Field(default=192, gt=0)  # positions per chunk in the memory-safe loss (see docs/benchmarks.md)
    hidden: Optional[HiddenStateSpec] = None  # also match intermediate hidden states



class LoraSpec(Section):
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class TrainSpec(Section):
    """Optimisation: steps, batch, schedule, checkpoints."""

    steps: int = Field(default=200, gt=0)
    batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    lr: float = Field(default=1e-3, gt=0.0)
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(default=10, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = Field(default=0.2, gt=0.0, le=1.0)  # WSD: share of steps spent decaying
    max_grad_norm: Optional[float] = Field(default=1.0, gt=0.0)
    checkpoint_every: int = Field(default=100, gt=0)
    keep_checkpoints: int = Field(default=2, gt=0)
    log_every: int = Field(default=10, gt=0)
    lora: Optional[LoraSpec] = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPUs that support it, else fp32
    device: str = "auto"
    threads: Optional[int] = Field(default=None, gt=0)
    packing: bool = False  # pack several examples into rows of data.max_length tokens (no attention across them)


class JudgeSpec(Section):
    """Pairwise judging of student vs teacher answers (each pair twice, positions swapped)."""

    model: Optional[str] = None  # default: the recipe's teacher (local weights or teacher.endpoint)
    endpoint: Optional[str] = None  # an OpenAI-compatible server for the judge
    api_key_env: Optional[str] = None
    rubric: Optional[str] = None  # default: distill.eval.judge.DEFAULT_RUBRIC
    max_items: int = Field(default=32, gt=0)
    max_new_tokens: int = Field(default=64, gt=0)  # the verdict is asked for on the last line


class EvalSpec(Section):
    """What `distill eval` measures."""

    max_new_tokens: int = Field(default=64, gt=0)
    batch_size: int = Field(default=8, gt=0)
    speed_prompt_tokens: int = Field(default=64, gt=0)
    speed_new_tokens: int = Field(default=32, gt=0)
    speed_batch_sizes: list[int] = Field(default_factory=lambda: [1, 8])
    measure_speed: bool = True
    speed_threads: Optional[int] = Field(default=None, gt=0)  # CPU threads while timing (default: train.threads/all)
    before_training: bool = True  # also measure <run>/student_init, so the report shows what training recovered
    general_text: bool = True  # perplexity on general text outside the training domain (capability collapse)
    calibration: bool = True  # expected calibration error of next-token probabilities on the held-out text
    suites: list[str] = Field(default_factory=list)  # shipped suite names or suite YAML paths (docs/eval.md)
    judge: Optional[JudgeSpec] = None
    contamination_ngram: int = Field(default=13, gt=1)  # eval items sharing an n-gram with training are flagged
    # lm-evaluation-harness tasks (pip install distill[lm-eval]): lm-eval names (need the hub) or local
    # NAME=PATH.jsonl:KIND (multiple_choice | generate | perplexity), comma-separated; see docs/eval.md.
    lm_eval: Optional[str] = None
    lm_eval_limit: Optional[int] = Field(default=None, gt=0)
    lm_eval_fewshot: Optional[int] = Field(default=None, ge=0)


class ExportSpec(Section):
    """What `distill run` ships after training, into <run>/exports/ (where `distill eval` measures each one)."""

    # "FORMAT[:QUANT]": hf, hf:int8, hf:int4 (pip install distill[quantize]), gguf (f16), gguf:q8_0, gguf:q4_0, ...
    formats: list[str] = Field(default_factory=list)


class Recipe(Section):
    """A whole distillation run."""

    output_dir: str
    seed: int = 0
    teacher: TeacherSpec
    student: StudentSpec
    data: DataSpec
    generate: GenerateSpec = Field(default_factory=GenerateSpec)
    filter: Optional[FilterSpec] = None  # when given, training uses only the teacher answers that pass it
    method: MethodSpec = Field(default_factory=MethodSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    # Where the recipe file lives; relative paths in it are resolved against this.
    base_dir: Path = Field(default=Path("."), exclude=True)

    def path(self, value: str) -> Path:
        """Resolve a path from the recipe relative to the recipe file's directory (hf:// datasets: unchanged)."""
        if value.startswith(HUB_DATASET):
            return value  # type: ignore[return-value]  # a hub dataset, not a file: readers take it as it is
        p = Path(value).expanduser()
        return Path(os.path.normpath(p if p.is_absolute() else self.base_dir / p))

    @property
    def run_dir(self) -> Path:
        return self.path(self.output_dir)

    def dump(self) -> str:
        """The resolved recipe as YAML (what a run directory keeps as recipe.yaml)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (`1e-4` -> float, `true` -> bool, `[1,2]` -> list)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads `1e-4` as a string
        except ValueError:
            return value
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` overrides to a raw recipe dict."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise DistillError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise DistillError(f"--set {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_value(text)
    return data


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "missing required key"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {where}: {msg}{more}"


def recipe_from_dict(data: dict, source: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    """Validate a raw dict into a Recipe; errors name the source and the key path."""
    if not isinstance(data, dict):
        raise DistillError(f"{source}: a recipe must be a mapping of sections, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise DistillError(_format_error(source, err)) from None
    recipe.base_dir = base_dir or Path(".")
    _check_files(recipe, source)
    return recipe


def _check_files(recipe: Recipe, source: str) -> None:
    """Report missing local files now, before any model is loaded."""
    d = recipe.data
    named = {"data.prompts": d.prompts, "data.train": d.train, "data.eval": d.eval}
    for i, f in enumerate(d.text_files):
        named[f"data.text_files.{i}"] = f
    for key, value in named.items():
        if value is None or (key == "data.prompts" and value.startswith(HUB_DATASET)):
            continue  # a hub dataset is checked when it is loaded
        if value.startswith(HUB_DATASET):
            raise DistillError(f"{source}: {key}: hf:// datasets are read only for data.prompts; give a file")
        if not recipe.path(value).exists():
            raise DistillError(f"{source}: {key}: file not found: {recipe.path(value)}")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a YAML recipe file."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise DistillError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    data = apply_overrides(data or {}, overrides or [])
    return recipe_from_dict(data, source=str(path), base_dir=path.resolve().parent)
