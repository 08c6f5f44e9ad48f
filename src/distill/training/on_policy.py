"""On-policy batches: the student (or, for seq_kd, the teacher) answers a micro-batch's prompts; the loss then
pulls the student toward the teacher on the states it actually visits (GKD, Agarwal et al. 2024).

Which micro-batches are sampled, and the samples themselves, follow from (seed, step, micro-batch) alone, so a
resumed run draws exactly what an uninterrupted one would: there is no sampling state to checkpoint.

Across tokenizers (method.cross_tokenizer uld or align) each sample is decoded to text and rebuilt into an example
that both tokenizers read, as the data's examples are (signals.cross_tokenizer.CrossTokenizerSamples); the batch
then brings its own teacher signal.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.data.tokenize import IGNORE, EncodedExample, collate
from distill.errors import DistillError
from distill.eval.metrics import repetition
from distill.signals.cross_tokenizer import CrossTokenizerSamples
from distill.signals.teacher_signal import TeacherSignal

log = logging.getLogger("distill")


@dataclass(frozen=True)
class SamplingSettings:
    """method.lmbda, seq_kd and sampling, with the data's max_length and the run's seed."""

    lmbda: float  # the share of micro-batches the student answers
    seq_kd: bool  # the other micro-batches: the teacher answers (True) or the data's responses stay (False)
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    max_length: int
    seed: int


@dataclass
class SampleWindow:
    """The student's samples since the metrics were last logged."""

    rows: int = 0
    tokens: int = 0
    ended: int = 0  # rows that stopped on an end-of-turn token or stop string (not at the length limit)
    looped: float = 0.0  # rows whose text loops (eval.metrics.repetition's rule)
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        """Per-row means for metrics.jsonl: sample length, EOS share, loop share, sampled tokens/s."""
        if self.rows == 0:
            return {}
        return {"sample_length": self.tokens / self.rows, "eos_share": self.ended / self.rows,
                "loop_share": self.looped / self.rows, "sample_tokens_per_s": self.tokens / max(self.seconds, 1e-9)}


class StudentEngine(Protocol):
    """An engine other than Hugging Face generate that samples the student's responses (training.vllm_sampler)."""

    def sync(self, model: torch.nn.Module, step: int) -> None: ...

    def generate(self, prompts: list[list[int]], budget: int, seed: int, *, temperature: float, top_p: float,
                 stop_ids: list[int], stop: tuple[str, ...]) -> list[list[int]]: ...


@dataclass
class SampledBatch:
    """A micro-batch to train on: its tensors, whether the student sampled its responses, and the teacher signal of
    its rows when they bring their own (rebuilt samples across tokenizers: indices 0..n-1; None: the run's signal
    on the drawn examples)."""

    batch: dict[str, torch.Tensor]
    by_student: bool = False
    signal: Optional[TeacherSignal] = None


@dataclass
class ResponseSampler:
    """Replaces a micro-batch's responses with sampled ones, as method.lmbda and method.seq_kd say."""

    settings: SamplingSettings
    tokenizer: PreTrainedTokenizerBase
    stop_ids: list[int]
    pad_id: int
    teacher: Optional[PreTrainedModel] = None  # seq_kd's sampler
    compute_dtype: torch.dtype = torch.float32
    # train.parallel: fsdp: the models' blocks are sharded, so every rank's generate runs forwards until all ranks'
    # rows are done (transformers' synced_gpus syncs a done-flag each token), however long each rank's answers are
    synced: bool = False
    window: SampleWindow = field(default_factory=SampleWindow)
    collapse_logged: bool = False  # the no-EOS warning is given once per run, not every window
    across: Optional[CrossTokenizerSamples] = None  # tokenizers differ: samples are rebuilt as text for both sides
    engine: Optional[StudentEngine] = None  # method.sampling.engine: vllm: the student's samples come from it

    def batch_for(
        self, student: PreTrainedModel, batch: dict[str, torch.Tensor], step: int, micro: int,
        indices: Sequence[int] = (),
    ) -> SampledBatch:
        """What this step's micro-batch (of the training examples `indices`) trains on."""
        coin = random.Random(f"on-policy:{self.settings.seed}:{step}:{micro}")
        on_policy = coin.random() < self.settings.lmbda
        if not on_policy and not self.settings.seq_kd:
            return SampledBatch(batch)
        model = student if on_policy else self.teacher
        engine = self.engine if on_policy else None
        began = time.perf_counter()
        if engine is not None:
            engine.sync(student, step)
        sampled, samples = self.sample(model, batch, coin.getrandbits(63), engine)
        if on_policy:
            self._count(samples, time.perf_counter() - began)
        if self.across is not None and samples:
            return self._rebuilt(batch, indices, samples, on_policy)
        return SampledBatch(sampled, on_policy)

    def _rebuilt(
        self, batch: dict[str, torch.Tensor], indices: Sequence[int], samples: list["Sample"], by_student: bool
    ) -> SampledBatch:
        """The samples as examples both tokenizers read, and the teacher on them."""
        if len(indices) != len(samples):
            raise DistillError("on-policy across tokenizers: needs the micro-batch's example indices")
        texts = [self.tokenizer.decode(s.tokens, skip_special_tokens=True) for s in samples]
        rows, signal = self.across.rebuild(indices, texts, [s.ended for s in samples])
        device = batch["input_ids"].device
        return SampledBatch({k: v.to(device) for k, v in collate(rows, self.pad_id).items()}, by_student, signal)

    def take_metrics(self) -> dict[str, float]:
        """The student's sampling metrics since the last call (empty when it sampled nothing), then a new window."""
        metrics, self.window = self.window.metrics(), SampleWindow()
        if metrics and metrics["eos_share"] == 0.0 and not self.collapse_logged:
            self.collapse_logged = True
            log.warning("on-policy: no sample ended with an end-of-turn token in this window (length collapse?); "
                        "watch eos_share in metrics.jsonl; raise method.sampling.max_new_tokens or lower train.lr")
        return metrics

    def sample(
        self, model: PreTrainedModel, batch: dict[str, torch.Tensor], seed: int,
        engine: Optional[StudentEngine] = None,
    ) -> tuple[dict[str, torch.Tensor], list["Sample"]]:
        """The batch with each row's response replaced by `model`'s sample to its prompt (drawn by `engine` when
        given, which holds model's weights); and the samples."""
        prompts = prompt_parts(batch)
        s = self.settings
        budget = min(s.max_new_tokens, s.max_length - max(len(p) for p in prompts))
        if budget < 1:
            if self.synced:  # no room for this rank's answers, but the other ranks' forwards need its part
                self._generate(model, prompts, 1, seed)
            return batch, []
        if engine is not None:
            rows = engine.generate(prompts, budget, seed, temperature=s.temperature, top_p=s.top_p,
                                   stop_ids=self.stop_ids, stop=s.stop)
        else:
            rows = self._generate(model, prompts, budget, seed)
        samples = [self._cut(row) for row in rows]
        rows = [EncodedExample(p + s.tokens, [IGNORE] * len(p) + s.tokens) for p, s in zip(prompts, samples)]
        device = batch["input_ids"].device
        return {k: v.to(device) for k, v in collate(rows, self.pad_id).items()}, samples

    def _generate(self, model: PreTrainedModel, prompts: list[list[int]], budget: int, seed: int) -> list[list[int]]:
        """New tokens for each prompt (left-padded, KV cache), in eval mode; the model's mode is restored."""
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        s = self.settings
        options: dict = {"do_sample": False}
        if s.temperature > 0:
            options = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p}
        if s.stop:
            options.update(stop_strings=list(s.stop), tokenizer=self.tokenizer)
        was_training = model.training
        model.eval()
        forked = [device] if device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=forked), torch.autocast(
                device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32
            ):
                torch.manual_seed(seed)  # inside fork_rng: the run's own random state is left as it was
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=budget, top_k=None,
                                     pad_token_id=self.pad_id, eos_token_id=self.stop_ids, synced_gpus=self.synced,
                                     **options)
        finally:
            model.train(was_training)
        return out[:, width:].tolist()

    def _cut(self, generated: list[int]) -> "Sample":
        """A row's new tokens up to and including its first end-of-turn token, or up to its first stop string."""
        stops = set(self.stop_ids)
        end = next((i for i, t in enumerate(generated) if t in stops), None)
        if end is not None:
            return Sample(generated[:end + 1], ended=True)
        if self.settings.stop:  # the shortest prefix whose text holds a stop string
            for k in range(1, len(generated) + 1):
                if any(stop in self.tokenizer.decode(generated[:k]) for stop in self.settings.stop):
                    return Sample(generated[:k], ended=True)
        return Sample(generated, ended=False)

    def _count(self, samples: list["Sample"], seconds: float) -> None:
        texts = [self.tokenizer.decode(s.tokens, skip_special_tokens=True) for s in samples]
        w = self.window
        w.rows += len(samples)
        w.tokens += sum(len(s.tokens) for s in samples)
        w.ended += sum(s.ended for s in samples)
        w.seconds += seconds
        if texts:
            w.looped += repetition(texts)["loop_share"] * len(texts)


@dataclass
class Sample:
    """One row's sampled tokens, and whether it ended on its own (not at the length limit)."""

    tokens: list[int]
    ended: bool


def prompt_parts(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's tokens before its first trained label (its prompt); a row with no label keeps its real tokens."""
    prompts = []
    for ids, labels, real in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                 batch["attention_mask"].tolist()):
        first = next((i for i, label in enumerate(labels) if label != IGNORE), None)
        prompts.append(ids[:first] if first is not None else [t for t, r in zip(ids, real) if r])
    return prompts
