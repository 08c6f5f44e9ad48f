"""The typed recipe schema: one YAML file drives every stage."""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from distill.errors import DistillError
from distill.rundir import RunDir

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]

RECIPE_DIR = "recipe_dir"  # where the relative paths of a dumped recipe resolve (Recipe.dump writes it)
HUB_DATASET = "hf://"  # data.prompts may name a hub dataset (the same prefix distill.data.examples reads)
CONTAMINATION_NGRAM = 13  # the GPT-3 paper's contamination n-gram (distill.data.contamination.DEFAULT_N)


def _not_a_boolean(value: Any) -> Any:
    """Refuse true/false where a number belongs: pydantic would otherwise read `steps: true` as 1."""
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "Input should be a number, not a boolean ({value})",
                                  {"value": str(value).lower()})
    return value


# Numbers as the recipe reads them: YAML "3" is still 3 (pydantic's lax mode), but true/false are errors.
Int = Annotated[int, BeforeValidator(_not_a_boolean)]
Float = Annotated[float, BeforeValidator(_not_a_boolean)]


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSource(Section):
    """A model read from a hub id, a local HF directory, a .gguf file or pkg://package/file."""

    model: str
    gguf_file: Optional[str] = None  # for a hub repo or directory that holds several .gguf files
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False


class Endpoint(Section):
    """An OpenAI-compatible server (vLLM, llama.cpp, Ollama, `distill serve`, a hosted API) and its key.

    The key is read from the environment variable named by `api_key_env`, never written in the recipe or logged.
    """

    endpoint: Optional[str] = None  # e.g. http://127.0.0.1:8000/v1
    api_key_env: Optional[str] = None


class ServedModel(Endpoint):
    """How a model behind `endpoint` is called: requests in flight, the time each may take, and retries."""

    concurrency: Int = Field(default=8, gt=0)  # requests in flight
    timeout_s: Float = Field(default=120.0, gt=0)
    max_retries: Int = Field(default=5, ge=0)


class TeacherSpec(ServedModel, ModelSource):
    """Where the teacher comes from: local weights (ModelSource), or an OpenAI-compatible server (`endpoint`)."""

    # How a local teacher writes text (generate, the filter's judge): transformers in-process, or vLLM's offline
    # engine (much faster, but it needs a CUDA GPU and `pip install vllm`). Training and eval load it with transformers.
    engine: Literal["transformers", "vllm"] = "transformers"
    # A top-k cache of the teacher's log-probs (`distill capture` writes it): KD trains from it without
    # loading the teacher's weights; `model` still names the tokenizer and the teacher the cache must come from.
    cache: Optional[str] = None
    cache_k: Int = Field(default=64, gt=0)  # log-probs kept per position at capture
    cache_exact: bool = False  # float32 log-probs instead of quantized ones (~2.7x larger)

    @model_validator(mode="after")
    def _one_way_to_generate(self) -> "TeacherSpec":
        if self.engine == "vllm" and self.endpoint is not None:
            raise ValueError("teacher.engine: vllm runs a local teacher; remove it or teacher.endpoint")
        return self


class StudentConfig(Section):
    """Shape of a student built from scratch on the teacher's tokenizer (Llama layout)."""

    num_layers: Int = Field(gt=0)
    hidden_size: Int = Field(gt=0)
    num_heads: Int = Field(gt=0)
    num_kv_heads: Optional[Int] = Field(default=None, gt=0)
    intermediate_size: Optional[Int] = Field(default=None, gt=0)  # default: ~2.75 x hidden, multiple of 64
    tie_embeddings: bool = True
    max_position_embeddings: Optional[Int] = None  # default: the teacher's


class CalibrationSpec(Section):
    """Text the pruner runs the teacher on to measure which layers, channels and heads matter."""

    file: Optional[str] = None  # default: the recipe's training data (teacher answers), else its prompts
    samples: Int = Field(default=64, gt=0)
    max_length: Int = Field(default=256, gt=8)


class FromTeacherSpec(Section):
    """A student cut out of the teacher: fewer layers (depth) and/or narrower layers (width)."""

    layers: Optional[Int] = Field(default=None, gt=0)  # how many teacher layers to keep
    keep_layers: Optional[list[Int]] = None  # or exactly which ones (0-based)
    layer_selection: Literal["importance", "uniform"] = "importance"  # how `layers` are chosen
    layer_importance: Literal["block_influence", "skip_loss"] = "block_influence"
    hidden_size: Optional[Int] = Field(default=None, gt=0)  # width targets; None keeps the teacher's
    intermediate_size: Optional[Int] = Field(default=None, gt=0)
    num_heads: Optional[Int] = Field(default=None, gt=0)
    num_kv_heads: Optional[Int] = Field(default=None, gt=0)
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
    preset: Optional[str] = None  # a named StudentConfig, see distill.stages.presets
    from_teacher: Optional[FromTeacherSpec] = None
    init_embeddings: Literal["random", "slice", "project"] = "project"
    trust_remote_code: bool = False
    # A new student (config or preset) on a tokenizer of its own, a path or hub id (docs/cross_tokenizer.md); its
    # chat template: its own (or the plain format without one), or the teacher's.
    tokenizer: Optional[str] = None
    chat_template: Literal["own", "teacher"] = "own"

    @model_validator(mode="after")
    def _one_source(self) -> "StudentSpec":
        given = [k for k in ("model", "config", "preset", "from_teacher") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of student.model, student.config, student.preset or student.from_teacher"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.tokenizer is not None and (self.model is not None or self.from_teacher is not None):
            raise ValueError("student.tokenizer: only a new student (student.config or student.preset) takes a "
                             "tokenizer of its own; student.model brings its own, from_teacher keeps the teacher's")
        if self.chat_template == "teacher" and self.tokenizer is None:
            raise ValueError("student.chat_template: teacher applies to a student.tokenizer of its own; without one "
                             "the student already uses the teacher's tokenizer and template")
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
    # preference pairs (chosen/rejected) for method.kind: dpo; labelled single answers (label/kto_tag) for kto
    pairs: Optional[str] = None
    eval: Optional[str] = None  # held-out examples; default: a split of the training data
    eval_fraction: Float = Field(default=0.1, ge=0.0, lt=1.0)
    max_eval_examples: Int = Field(default=64, gt=0)
    system_prompt: Optional[str] = None
    max_length: Int = Field(default=512, gt=8)
    text_files: list[str] = Field(default_factory=list)  # plain reference text for perplexity
    # The prompt file's own key names, ours -> theirs: e.g. {prompt: question, reference: answer} for GSM8K.
    fields: dict[str, str] = Field(default_factory=dict)
    on_error: Literal["stop", "skip"] = "stop"  # malformed prompt records: stop at the first, or skip and count

    @model_validator(mode="after")
    def _some_data(self) -> "DataSpec":
        if self.prompts is None and self.train is None and self.pairs is None:
            raise ValueError("give data.prompts (for the teacher to answer), data.train or data.pairs")
        return self


class GenerationTeacherSpec(ServedModel, ModelSource):
    """Another teacher that writes answers (a mixture of teachers); `teacher` stays the KD and tokenizer teacher."""

    tags: list[str] = Field(default_factory=list)  # mixture "route": prompts with one of these tags come here


class ScoringTeacherSpec(GenerationTeacherSpec):
    """Another teacher that scores (method.teachers): the rows whose example has one of its tags, on the student's
    tokenizer; `teacher` scores the rest."""


class GenerateSpec(Section):
    """How the teacher answers the prompts (response distillation data)."""

    max_new_tokens: Int = Field(default=256, gt=0)
    # Longer prompts are skipped and counted (data.on_error: stop refuses them); default: the teacher's context
    # less max_new_tokens (a served teacher's context is unknown: only an explicit value applies there).
    max_prompt_tokens: Optional[Int] = Field(default=None, gt=0)
    batch_size: Int = Field(default=8, gt=0)
    temperature: Float = Field(default=0.0, ge=0.0)  # 0 = greedy
    top_p: Float = Field(default=1.0, gt=0.0, le=1.0)
    max_prompts: Optional[Int] = Field(default=None, gt=0)
    samples: Int = Field(default=1, gt=0)  # answers per prompt (needs temperature > 0 when > 1)
    stop: list[str] = Field(default_factory=list)  # stop strings
    # Chain of thought: ask the teacher to reason step by step, then keep the reasoning in the training text
    # or strip it (train on the final answer only; the reasoning stays in the record).
    reasoning: Literal["off", "keep", "strip"] = "off"
    reasoning_prompt: str = (
        "Think step by step and show your reasoning. Then give the final answer on its own line, "
        "starting with 'Answer:'."
    )
    answer_marker: str = "Answer:"
    shard_records: Int = Field(default=5000, gt=0)  # records per teacher-data shard
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

    weight: Float = Field(default=1.0, gt=0.0)  # added to the logit loss
    loss: Literal["mse", "cosine"] = "mse"  # mse is normalised by the teacher states' mean square
    layer_map: Optional[list[tuple[Int, Int]]] = None  # [[student, teacher], ...]; default: derived


class OnPolicySampling(Section):
    """How the student (or, with method.seq_kd, the teacher) samples the responses an on-policy batch trains on."""

    max_new_tokens: Int = Field(default=128, gt=0)  # capped so prompt + sample fit data.max_length
    temperature: Float = Field(default=1.0, ge=0.0)  # 0 = greedy
    top_p: Float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)  # stop strings, besides the tokenizer's end-of-turn tokens
    # transformers: Hugging Face generate on the trained weights; vllm: an in-process vLLM engine, given the current
    # weights after each update (docs/on_policy.md)
    engine: Literal["transformers", "vllm"] = "transformers"
    vllm_gpu_memory_utilization: Float = Field(default=0.3, gt=0.0, le=1.0)  # the GPU share vLLM's engine takes


PreferenceLoss = Literal["sigmoid", "ipo", "hinge", "simpo"]  # distill.losses.preference.PAIR_LOSSES
DEFAULT_JSD_BETA, DEFAULT_DPO_BETA = 0.5, 0.1
PREFERENCE_KINDS = ("dpo", "kto")  # method kinds whose beta is the preference loss's, read from <run>/pairs/


class MethodSpec(Section):
    """What the student learns from: teacher logits on the teacher's text (kd) or on its own samples (on_policy),
    only teacher text (sft), preference pairs (dpo), or answers labelled desirable or not (kto)."""

    kind: Literal["kd", "on_policy", "sft", "dpo", "kto"] = "kd"
    divergence: Divergence = "forward_kl"  # on_policy: reverse_kl unless set
    temperature: Float = Field(default=1.0, gt=0.0)
    alpha: Float = Field(default=0.5, ge=0.0, le=1.0)  # weight of cross-entropy on labels; 1-alpha on KD
    # JSD mixing weight (kd, below 1; default 0.5), or DPO's or KTO's beta (dpo, kto; default 0.1)
    beta: Optional[Float] = Field(default=None, gt=0.0)
    skew: Float = Field(default=0.1, ge=0.0, lt=1.0)  # skew KL mixing weight
    chunk_size: Int = Field(default=192, gt=0)  # positions per chunk in the memory-safe loss (see docs/benchmarks.md)
    hidden: Optional[HiddenStateSpec] = None  # also match intermediate hidden states
    # on_policy (GKD): the share of batches whose responses the student samples; the rest train on the data's.
    lmbda: Float = Field(default=1.0, ge=0.0, le=1.0)
    seq_kd: bool = False  # on_policy: the other batches train on responses the teacher samples (not the data's)
    # on_policy: full = the divergence over the vocabulary on the samples; sampled_token = the per-token reverse-KL
    # estimate log p_student - log p_teacher of each sampled token as a policy-gradient loss (needs only those).
    estimator: Literal["full", "sampled_token"] = "full"
    sampling: OnPolicySampling = Field(default_factory=OnPolicySampling)
    # kd, on_policy: more scoring teachers; each row goes to the first whose tags its example has, else `teacher`
    teachers: list[ScoringTeacherSpec] = Field(default_factory=list)
    # Weight each position's KD term by the teacher's confidence there (losses/weighting.py); weights average 1.
    weighting: Literal["none", "teacher_confidence", "teacher_entropy"] = "none"
    weighting_floor: Float = Field(default=0.1, gt=0.0, le=1.0)  # confidences below it count as it
    weighting_temperature: Float = Field(default=1.0, gt=0.0)  # weights ~ confidence ** (1 / this)
    # method.kind: dpo (docs/preference.md)
    loss: PreferenceLoss = "sigmoid"
    label_smoothing: Float = Field(default=0.0, ge=0.0, lt=0.5)  # sigmoid and simpo: the share of flipped labels
    sft_weight: Float = Field(default=0.0, ge=0.0)  # RPO: weight of an NLL term on the chosen responses
    simpo_gamma: Float = Field(default=0.5, ge=0.0)  # SimPO's target reward margin
    # method.kind: kto: the weights of desirable and undesirable answers' losses (docs/preference.md)
    desirable_weight: Float = Field(default=1.0, gt=0.0)
    undesirable_weight: Float = Field(default=1.0, gt=0.0)
    # Teacher and student tokenizers differ: text (CE on the teacher's text, the default), uld or align (logit KD
    # across vocabularies; docs/cross_tokenizer.md). A same-tokenizer pair ignores it (ordinary logit KD).
    cross_tokenizer: Optional[Literal["text", "uld", "align"]] = None
    uld_top_k: Optional[Int] = Field(default=None, gt=0)  # ULD compares the top-k sorted probabilities (None: all)

    @model_validator(mode="after")
    def _beta_for_kind(self) -> "MethodSpec":
        if self.beta is None:
            self.beta = DEFAULT_DPO_BETA if self.kind in PREFERENCE_KINDS else DEFAULT_JSD_BETA
        elif self.kind not in PREFERENCE_KINDS and self.beta >= 1.0:
            raise ValueError(f"method.beta: the JSD mixing weight must be below 1, got {self.beta:g}")
        if self.kind == "dpo" and self.label_smoothing and self.loss not in ("sigmoid", "simpo"):
            raise ValueError(f"method.label_smoothing applies to method.loss sigmoid or simpo, not {self.loss}")
        if self.kind in PREFERENCE_KINDS and self.hidden is not None:
            raise ValueError(f"method.hidden: hidden-state KD needs method.kind: kd, not {self.kind}")
        return self

    @model_validator(mode="after")
    def _weighting_needs_a_teacher(self) -> "MethodSpec":
        if self.weighting != "none" and self.kind != "kd":
            raise ValueError(f"method.weighting: {self.weighting} weighs the KD term, which method.kind: "
                             f"{self.kind} does not have; set method.kind: kd or method.weighting: none")
        return self

    @model_validator(mode="after")
    def _scoring_teachers(self) -> "MethodSpec":
        if self.teachers and not self.learns_from_teacher_logits:
            raise ValueError(f"method.teachers: scoring teachers apply to method.kind kd or on_policy, not {self.kind}")
        untagged = next((i for i, t in enumerate(self.teachers) if not t.tags), None)
        if untagged is not None:
            raise ValueError(f"method.teachers[{untagged}].tags: a scoring teacher needs at least one tag (rows "
                             "without a matching tag go to `teacher`)")
        return self

    @model_validator(mode="after")
    def _on_policy_defaults(self) -> "MethodSpec":
        if self.kind == "on_policy" and "divergence" not in self.model_fields_set:
            self.divergence = "reverse_kl"  # GKD's and Thinking Machines' choice: mode-seeking on the samples
        return self

    @property
    def learns_from_teacher_logits(self) -> bool:
        """Whether the loss needs the teacher's distribution (kd, on_policy), not only its text (sft)."""
        return self.kind in ("kd", "on_policy")


class PairJudgeSpec(Endpoint):
    """The judge of `pairs.source: judged` (pairwise, each comparison asked in both orders, as eval.judge)."""

    model: Optional[str] = None  # default: the recipe's teacher (local weights or teacher.endpoint)
    rubric: Optional[str] = None  # default: distill.eval.judge.DEFAULT_RUBRIC
    max_new_tokens: Int = Field(default=64, gt=0)  # the verdict is asked for on the last line
    batch_size: Int = Field(default=8, gt=0)  # conversations per judge call (a local judge's batch)


JUDGED_ONLY = ("samples", "sample_from", "temperature", "scorer", "judge")  # keys only pairs.source: judged reads


class PairsSpec(Section):
    """Where method.kind: dpo gets its preference pairs (`distill pairs` builds them; docs/preference.md)."""

    # file: the ready pairs of data.pairs; teacher_vs_student: chosen = the teacher's answer to each of
    # data.prompts (its teacher data), rejected = the starting student's greedy answer to the same prompt;
    # judged: `samples` answers per prompt scored by the judge or the verifier, chosen = best, rejected = worst
    source: Literal["file", "teacher_vs_student", "judged"] = "file"
    max_new_tokens: Optional[Int] = Field(default=None, gt=0)  # the student's answers; default generate's
    batch_size: Int = Field(default=8, gt=0)  # pairs per batch of student generation and reference log-probs
    samples: Int = Field(default=4, gt=0)  # judged: answers per prompt from each sampler
    sample_from: Literal["teacher", "student", "both"] = "teacher"  # judged: who writes the answers
    temperature: Float = Field(default=1.0, ge=0.0)  # judged: sampling temperature (0 = greedy)
    scorer: Literal["judge", "verifier"] = "judge"  # judged: pairwise LLM judge, or the final-number check
    judge: Optional[PairJudgeSpec] = None  # judged with scorer judge: default the teacher, default rubric

    @model_validator(mode="after")
    def _judged_settings(self) -> "PairsSpec":
        if self.source != "judged":  # a default value is let through: a dumped recipe.yaml has them all
            given = next((k for k in JUDGED_ONLY if k in self.model_fields_set
                          and getattr(self, k) != type(self).model_fields[k].default), None)
            if given is not None:
                raise ValueError(f"pairs.{given}: only pairs.source: judged reads it (source is {self.source})")
            return self
        if self.judge is not None and self.scorer != "judge":
            raise ValueError("pairs.judge: only pairs.scorer: judge reads it; remove it for the verifier")
        candidates = self.samples * (2 if self.sample_from == "both" else 1)
        if candidates < 2:
            raise ValueError("pairs.samples: judged pairs need at least 2 answers per prompt (best vs worst)")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("pairs.temperature: pairs.samples > 1 needs temperature > 0 (greedy answers are all "
                             "the same)")
        return self


class LoraSpec(Section):
    r: Int = Field(default=16, gt=0)
    alpha: Int = Field(default=32, gt=0)
    dropout: Float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class TrainSpec(Section):
    """Optimisation: steps, batch, schedule, checkpoints."""

    steps: Int = Field(default=200, gt=0)
    batch_size: Int = Field(default=8, gt=0)
    grad_accum: Int = Field(default=1, gt=0)
    lr: Float = Field(default=1e-3, gt=0.0)
    min_lr_ratio: Float = Field(default=0.1, ge=0.0, le=1.0)
    weight_decay: Float = Field(default=0.01, ge=0.0)
    betas: tuple[Float, Float] = (0.9, 0.95)
    warmup_steps: Int = Field(default=10, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: Float = Field(default=0.2, gt=0.0, le=1.0)  # WSD: share of steps spent decaying
    max_grad_norm: Optional[Float] = Field(default=1.0, gt=0.0)
    nan_tolerance: Int = Field(default=0, ge=0)  # non-finite steps skipped (no update) before a run stops
    checkpoint_every: Int = Field(default=100, gt=0)
    keep_checkpoints: Int = Field(default=2, gt=0)
    log_every: Int = Field(default=10, gt=0)
    lora: Optional[LoraSpec] = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPUs that support it, else fp32
    device: str = "auto"
    threads: Optional[Int] = Field(default=None, gt=0)
    packing: bool = False  # pack several examples into rows of data.max_length tokens (no attention across them)
    # Held-out loss while training (docs/training.md): every eval_every steps and at the last; default (null): the
    # checkpoint interval when the data has a held-out split; 0: off.
    eval_every: Optional[Int] = Field(default=None, ge=0)
    eval_batches: Int = Field(default=8, gt=0)  # held-out batches of train.batch_size per evaluation, at most
    keep_best: Optional[Literal["eval_loss", "eval_kd", "eval_ce", "eval_agreement"]] = None
    patience: Optional[Int] = Field(default=None, gt=0)  # evals without a better keep_best before stopping early
    # Experiment trackers (accelerate's): null = TensorBoard when installed; [] = none; a tracker listed must import.
    report_to: Optional[list[Literal["tensorboard", "wandb", "mlflow"]]] = None
    # Under torchrun/accelerate launch (docs/scale.md): ddp = a student replica per process; fsdp = FSDP2, the
    # student's and teacher's decoder blocks sharded across the processes; zero2 / zero3 = DeepSpeed ZeRO stage 2 (the
    # student's gradients and optimizer state partitioned) or 3 (its weights too), through accelerate.
    parallel: Literal["ddp", "fsdp", "zero2", "zero3"] = "ddp"

    @model_validator(mode="after")
    def _best_needs_evals(self) -> "TrainSpec":
        if self.keep_best is not None and self.eval_every == 0:
            raise ValueError("train.keep_best: needs held-out evaluations; remove train.eval_every: 0")
        if self.patience is not None and self.keep_best is None:
            raise ValueError("train.patience: counts evaluations without a better train.keep_best metric; "
                             "set train.keep_best")
        if self.lora is not None and self.parallel in ("zero2", "zero3"):
            # DeepSpeed drops AdamW's empty no-decay group (adapters are all matrices), which the schedule expects.
            raise ValueError(f"train.parallel: {self.parallel} with train.lora is not supported yet; use ddp or fsdp")
        return self


class JudgeSpec(Endpoint):
    """Pairwise judging of student vs teacher answers (each pair twice, positions swapped)."""

    model: Optional[str] = None  # default: the recipe's teacher (local weights or teacher.endpoint)
    rubric: Optional[str] = None  # default: distill.eval.judge.DEFAULT_RUBRIC
    max_items: Int = Field(default=32, gt=0)
    max_new_tokens: Int = Field(default=64, gt=0)  # the verdict is asked for on the last line


class EvalSpec(Section):
    """What `distill eval` measures."""

    max_new_tokens: Int = Field(default=64, gt=0)
    batch_size: Int = Field(default=8, gt=0)
    speed_prompt_tokens: Int = Field(default=64, gt=0)
    speed_new_tokens: Int = Field(default=32, gt=0)
    speed_batch_sizes: list[Int] = Field(default_factory=lambda: [1, 8])
    measure_speed: bool = True
    speed_threads: Optional[Int] = Field(default=None, gt=0)  # CPU threads while timing (default: train.threads/all)
    before_training: bool = True  # also measure <run>/student_init, so the report shows what training recovered
    general_text: bool = True  # perplexity on general text outside the training domain (capability collapse)
    calibration: bool = True  # expected calibration error of next-token probabilities on the held-out text
    suites: list[str] = Field(default_factory=list)  # shipped suite names or suite YAML paths (docs/eval.md)
    judge: Optional[JudgeSpec] = None
    contamination_ngram: Int = Field(default=13, gt=1)  # eval items sharing an n-gram with training are flagged
    # lm-evaluation-harness tasks (pip install distill[lm-eval]): lm-eval names (need the hub) or local
    # NAME=PATH.jsonl:KIND (multiple_choice | generate | perplexity), comma-separated; see docs/eval.md.
    lm_eval: Optional[str] = None
    lm_eval_limit: Optional[Int] = Field(default=None, gt=0)
    lm_eval_fewshot: Optional[Int] = Field(default=None, ge=0)


class ExportSpec(Section):
    """What `distill run` ships after training, into <run>/exports/ (where `distill eval` measures each one)."""

    # "FORMAT[:QUANT]": hf, hf:int8, hf:int4 (pip install distill[quantize]), gguf (f16), gguf:q8_0, gguf:q4_k_m, ...
    formats: list[str] = Field(default_factory=list)
    # Importance matrix for GGUF K-quants (docs/export.md): auto = from the run's training data when it has some,
    # none = uniform weights, or the path of an imatrix GGUF file (llama-imatrix's or distill's).
    imatrix: str = "auto"
    imatrix_tokens: Int = Field(default=32768, gt=0)  # calibration tokens for auto


# ---------------------------------------------------------------- the filter section (distill.data.filters)

DEFAULT_FILTER_RUBRIC = (
    "You grade an AI assistant's answer to a user's request. Judge correctness first, then helpfulness, "
    "clarity and completeness. Reply with one line, 'Score: N', where N is an integer from 1 (wrong or useless) "
    "to 10 (excellent)."
)


class FilterSection(Section):
    """One filter's settings; `enabled: false` (or the section set to `false`) switches it off."""

    enabled: bool = True

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value


class TruncatedFilter(FilterSection):
    """Drop answers the teacher did not finish (finish_reason "length": cut at max_new_tokens)."""


class GarbledFilter(FilterSection):
    """Drop empty or garbled answers."""

    min_alnum_ratio: Float = Field(default=0.25, ge=0.0, le=1.0)  # letters+digits among non-space characters
    max_replacement_chars: Int = Field(default=0, ge=0)  # U+FFFD: bytes that did not decode
    code_fences: bool = True  # an odd number of ``` fence lines


class LengthFilter(FilterSection):
    """Bounds on the answer's length in characters and whitespace-separated words (null: no bound)."""

    min_chars: Int = Field(default=1, ge=0)
    max_chars: Optional[Int] = Field(default=None, gt=0)
    min_words: Int = Field(default=1, ge=0)
    max_words: Optional[Int] = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "LengthFilter":
        for unit in ("chars", "words"):
            low, high = getattr(self, f"min_{unit}"), getattr(self, f"max_{unit}")
            if high is not None and high < low:
                raise ValueError(f"max_{unit} ({high}) is below min_{unit} ({low})")
        return self


class RefusalFilter(FilterSection):
    """Drop refusals and AI boilerplate: regular expressions searched case-insensitively anywhere in the answer."""

    default_patterns: bool = True  # the curated REFUSAL_PATTERNS
    extra_patterns: list[str] = Field(default_factory=list)

    @field_validator("extra_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"not a regular expression: {pattern!r} ({err})") from None
        return patterns


class RepetitionFilter(FilterSection):
    """Drop answers that loop: many repeated word n-grams, or the same line many times in a row."""

    ngram: Int = Field(default=3, gt=0)
    max_duplicate_ngram_ratio: Float = Field(default=0.3, ge=0.0, le=1.0)  # repeated n-grams / all n-grams
    max_line_repeats: Int = Field(default=3, gt=0)  # the same line more often in a row is a loop


class VerifyFilter(FilterSection):
    """Rejection sampling: where a record has a reference answer, keep it only if the final numbers match."""


class ContaminationFilter(FilterSection):
    """Drop records whose prompt + answer share a word n-gram with an evaluation item."""

    n: Int = Field(default=CONTAMINATION_NGRAM, gt=0)
    eval_files: list[str] = Field(default_factory=list)  # JSONL/JSON (every string field) or .txt (paragraphs)


class ExactDedupFilter(FilterSection):
    """Keep the first of records whose text is equal after normalisation (NFKC, case, spacing)."""


class NearDedupFilter(FilterSection):
    """Keep the first of records whose word-shingle sets are near-equal (MinHash + LSH)."""

    threshold: Float = Field(default=0.8, gt=0.0, le=1.0)  # estimated Jaccard similarity
    num_perm: Int = Field(default=128, ge=16)
    shingle: Int = Field(default=5, gt=0)  # words per shingle
    seed: Int = 0


class JudgeFilter(FilterSection):
    """An LLM grades each answer 1-10 with a rubric; keep scores >= threshold. Off unless enabled."""

    enabled: bool = False
    threshold: Float = Field(default=7.0, ge=1.0, le=10.0)
    rubric: str = DEFAULT_FILTER_RUBRIC
    batch_size: Int = Field(default=16, gt=0)
    keep_unparsed: bool = False  # a reply with no score: keep (true) or drop (false) the record
    model: Optional[str] = None  # the judge model for the CLI to load; None: the recipe's teacher
    max_new_tokens: Int = Field(default=32, gt=0)  # for the CLI's judge generation
    # Keep only the best-scored answer of each prompt (several samples or teachers: best-of-n by the judge).
    best_per_prompt: bool = False


class FilterSpec(Section):
    """The `filter` section: which filters run (in this order) and their thresholds."""

    dedup_scope: Literal["response", "prompt_response"] = "prompt_response"
    truncated: TruncatedFilter = Field(default_factory=TruncatedFilter)
    garbled: GarbledFilter = Field(default_factory=GarbledFilter)
    length: LengthFilter = Field(default_factory=LengthFilter)
    refusal: RefusalFilter = Field(default_factory=RefusalFilter)
    repetition: RepetitionFilter = Field(default_factory=RepetitionFilter)
    verify: VerifyFilter = Field(default_factory=VerifyFilter)
    contamination: ContaminationFilter = Field(default_factory=ContaminationFilter)
    exact_dedup: ExactDedupFilter = Field(default_factory=ExactDedupFilter)
    near_dedup: NearDedupFilter = Field(default_factory=NearDedupFilter)
    judge: JudgeFilter = Field(default_factory=JudgeFilter)


STAGE_SECTIONS = ("method", "train", "data", "pairs")  # what a training stage may change of the recipe


class StageSpec(Section):
    """One training stage of a `stages:` recipe: a name, and the recipe sections it changes (merged key by key)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # also its directory: <run>/stages/<name>/
    method: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    pairs: dict[str, Any] = Field(default_factory=dict)


class Recipe(Section):
    """A whole distillation run."""

    output_dir: str
    seed: Int = 0
    teacher: TeacherSpec
    student: StudentSpec
    data: DataSpec
    generate: GenerateSpec = Field(default_factory=GenerateSpec)
    filter: Optional[FilterSpec] = None  # when given, training uses only the teacher answers that pass it
    method: MethodSpec = Field(default_factory=MethodSpec)
    pairs: Optional[PairsSpec] = None  # how method.kind: dpo gets its pairs (default: the ready pairs of data.pairs)
    train: TrainSpec = Field(default_factory=TrainSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    # Training stages run in order, each from the one before's student (docs/preference.md); none: one stage.
    stages: Optional[list[StageSpec]] = None

    # Where the recipe file lives; relative paths in it are resolved against this.
    base_dir: Path = Field(default=Path("."), exclude=True)
    _raw: dict = PrivateAttr(default_factory=dict)  # the sections as written: each stage's overrides merge onto them

    @model_validator(mode="wrap")
    @classmethod
    def _keep_raw(cls, data: Any, handler: Any) -> "Recipe":
        recipe = handler(data)
        if isinstance(data, dict):
            recipe._raw = copy.deepcopy(data)
        return recipe

    @field_validator("stages")
    @classmethod
    def _stage_list(cls, stages: Optional[list[StageSpec]]) -> Optional[list[StageSpec]]:
        if stages is None:
            return None
        if not stages:
            raise ValueError("an empty list; give at least one stage, or remove `stages`")
        names = [s.name for s in stages]
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise ValueError(f"the stage name {twice!r} is used twice (each stage has its own directory)")
        return stages

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
        dump = self.model_dump(mode="json", exclude={"stages"} if self.stages is None else None)
        # the run directory's copy sits elsewhere than the recipe file: its relative paths still mean the same files
        dump[RECIPE_DIR] = str(Path(self.base_dir).resolve())
        return yaml.safe_dump(dump, sort_keys=False)

    def training_stages(self, source: str = "<recipe>") -> list["Recipe"]:
        """Each training stage as a whole recipe, in order (a recipe without `stages:` is its own only stage).

        A stage is the recipe's sections with the stage's method/train/data/pairs merged in key by key; every stage
        after the first starts from the one before's student. Errors name the stage: `stages[1].method.kind`.
        """
        if self.stages is None:
            return [self]
        run, built = RunDir(self.run_dir), []
        for index, stage in enumerate(self.stages):
            raw = {k: copy.deepcopy(v) for k, v in self._raw.items() if k != "stages"}
            for section in STAGE_SECTIONS:
                raw[section] = _merged(raw.get(section) or {}, getattr(stage, section))
            if not raw["pairs"]:
                raw.pop("pairs")
            if index > 0:  # the student the stage before trained
                before = run.for_stage(self.stages[index - 1].name, final=False).student
                raw["student"] = {"model": str(before.resolve())}
            raw.update(stage=stage.name, stage_index=index, final_stage=index == len(self.stages) - 1,
                       own_data=bool(stage.data))
            try:
                recipe = StageRecipe.model_validate(raw)
            except ValidationError as err:
                raise DistillError(_format_error(source, err, prefix=f"stages[{index}].")) from None
            recipe.base_dir = self.base_dir
            _check_files(recipe, source, prefix=f"stages[{index}].")
            built.append(recipe)
        return built


class StageRecipe(Recipe):
    """One training stage of a `stages:` recipe, as a whole recipe (Recipe.training_stages makes them)."""

    stage: str = Field(exclude=True)
    stage_index: int = Field(exclude=True)
    final_stage: bool = Field(exclude=True)
    own_data: bool = Field(exclude=True)  # the stage changes the data section (its filtered data is its own)

    def stage_files(self, run: RunDir) -> RunDir:
        """The run directory's paths as this stage sees them."""
        return run.for_stage(self.stage, final=self.final_stage, own_data=self.own_data)


def _merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` merged in key by key (mappings in both are merged, anything else replaced)."""
    out = copy.deepcopy(base) if isinstance(base, dict) else {}
    for key, value in changes.items():
        out[key] = _merged(out.get(key), value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error's reason on one line (its str() spans several, with the position)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return " ".join(str(problem).split())


def _yaml_line(err: yaml.YAMLError, text: str) -> str:
    """":LINE" (1-based) where the YAML error in `text` is, or "" when it has no position."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    if mark is not None:
        return f":{mark.line + 1}"
    position = getattr(err, "position", None)  # a ReaderError (a forbidden character) has only an offset
    if position is None:
        return ""
    line = text.count("\n", 0, position) + 1
    return f":{line}"


def _parse_value(key: str, text: str) -> Any:
    """Parse an override value the way YAML would (`1e-4` -> float, `true` -> bool, `[1,2]` -> list)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise DistillError(f"--set {key}: not valid YAML ({_yaml_problem(err)})") from None
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
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise DistillError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise DistillError(f"--set {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_value(key, text)
    return data


def _format_error(source: str, err: ValidationError, prefix: str = "") -> str:
    first = err.errors()[0]
    where = re.sub(r"^stages\.(\d+)", r"stages[\1]", ".".join(str(p) for p in first["loc"]))  # as stages[1].x
    where = prefix + where if where else prefix.rstrip(".") or "(top level)"
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
    if RECIPE_DIR in data:  # a run directory's recipe.yaml: its paths are relative to the recipe it was made from
        data = dict(data)
        recorded = data.pop(RECIPE_DIR)
        if not isinstance(recorded, str):
            raise DistillError(f"{source}: {RECIPE_DIR}: a directory path, got {recorded!r}")
        base_dir = (base_dir or Path(".")) / Path(recorded).expanduser()
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise DistillError(_format_error(source, err)) from None
    recipe.base_dir = base_dir or Path(".")
    _check_files(recipe, source)
    recipe.training_stages(source)  # every stage validates as a whole recipe, before anything runs
    return recipe


def _check_files(recipe: Recipe, source: str, prefix: str = "") -> None:
    """Report missing local files now, before any model is loaded."""
    d = recipe.data
    named = {"data.prompts": d.prompts, "data.train": d.train, "data.eval": d.eval, "data.pairs": d.pairs}
    for i, f in enumerate(d.text_files):
        named[f"data.text_files.{i}"] = f
    for key, value in named.items():
        if value is None or (key == "data.prompts" and value.startswith(HUB_DATASET)):
            continue  # a hub dataset is checked when it is loaded
        if value.startswith(HUB_DATASET):
            raise DistillError(f"{source}: {prefix}{key}: hf:// datasets are read only for data.prompts; give a file")
        if not recipe.path(value).exists():
            raise DistillError(f"{source}: {prefix}{key}: file not found: {recipe.path(value)}")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a YAML recipe file."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"recipe not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DistillError(f"{path}:{line}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise DistillError(f"{path}{_yaml_line(err, text)}: not valid YAML ({_yaml_problem(err)})") from None
    if data is None:
        data = {}  # an empty file: every missing section is named below
    if not isinstance(data, dict):
        raise DistillError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    return recipe_from_dict(data, source=str(path), base_dir=path.resolve().parent)
