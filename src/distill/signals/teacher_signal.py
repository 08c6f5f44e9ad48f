"""The teacher signal training reads, built once per run: a live teacher model, or its top-k cache.

The loss asks it, one micro-batch at a time, for what the chunked loss needs. A live teacher runs a forward and
gives its final hidden states and output head (the loss forms logits a chunk at a time) plus the block outputs
that hidden-state KD matches; a cached one gives the SparseTargets rows of the batch's examples and holds no model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol, Sequence, Union

import torch
from torch import Tensor

from distill.errors import DistillError
from distill.losses.kd import DenseTeacher
from distill.losses.objective import IGNORE_INDEX, LossOutput, LossSettings
from distill.losses.sparse import SparseTargets
from distill.models import output_head
from distill.models.heads import decoder_layer_outputs

if TYPE_CHECKING:
    from distill.signals.reader import TeacherCacheReader

# The teacher's logit signal for one micro-batch: dense over every shifted position, or sparse over the trained ones.
LogitSignal = Union[DenseTeacher, SparseTargets, "ServedScores"]

HIDDEN_WITH_CACHE = ("method.hidden: hidden-state KD needs a live teacher's states, which teacher.cache does not "
                     "hold; remove method.hidden or teacher.cache")
PACKING_WITH_CACHE = ("train.packing does not work with teacher.cache yet (its targets are per example); "
                      "set train.packing: false or remove teacher.cache")


class TeacherSignal(Protocol):
    """Where the KD loss's teacher side comes from."""

    def for_batch(
        self, batch: dict[str, Tensor], indices: Optional[Sequence[int]] = None, layers: Sequence[int] = ()
    ) -> tuple[LogitSignal, dict[int, Tensor]]:
        """(logit signal, {teacher block i: [B, T, D] output} for i in `layers`) for the batch of rows `indices`."""
        ...


def attention_inputs(batch: dict[str, Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(attention_mask, position_ids) for a model's forward on the batch, student or teacher.

    A packed batch (distill.data.packing) gives position_ids alone: transformers builds the block-diagonal mask
    from their restarts only when no 2-D attention_mask is passed. Its attention_mask just marks real tokens.
    """
    if "position_ids" in batch:
        return None, batch["position_ids"]
    return batch["attention_mask"], None


@dataclass
class LiveTeacher:
    """A frozen teacher model run on every micro-batch (dense logits, chunk by chunk)."""

    model: torch.nn.Module

    def for_batch(
        self, batch: dict[str, Tensor], indices: Optional[Sequence[int]] = None, layers: Sequence[int] = ()
    ) -> tuple[DenseTeacher, dict[int, Tensor]]:
        """The teacher's forward on the batch: final hidden states of every shifted position, head, block outputs."""
        mask, positions = attention_inputs(batch)
        with torch.no_grad():
            final, states = decoder_layer_outputs(self.model, batch["input_ids"], mask, layers, positions)
            final = final[:, :-1]  # position i predicts token i + 1
            return DenseTeacher(final.reshape(-1, final.shape[-1]), output_head(self.model)), states


@dataclass
class CachedTeacher:
    """The teacher's top-k log-probs read from a verified cache (distill capture); no model is run or held."""

    reader: "TeacherCacheReader"

    def for_batch(
        self, batch: dict[str, Tensor], indices: Optional[Sequence[int]] = None, layers: Sequence[int] = ()
    ) -> tuple[SparseTargets, dict[int, Tensor]]:
        """The cached rows of the batch's examples `indices`, in the order of the batch's trained labels."""
        if layers:
            raise DistillError(HIDDEN_WITH_CACHE)
        if "position_ids" in batch:
            raise DistillError(PACKING_WITH_CACHE)
        if indices is None:
            raise DistillError("teacher.cache: the cached teacher needs the batch's example indices")
        return self.reader.targets(indices, batch["input_ids"].device), {}


class TextScorer(Protocol):
    """Anything that scores token sequences: a served teacher (OpenAIBackend) or an in-process one (LocalBackend)."""

    def score(self, rows: list[list[int]], k: int) -> list: ...


@dataclass
class ServedScores:
    """A served teacher's scores of one micro-batch: its top-k at the trained positions, and each label's log-prob."""

    sparse: Optional[SparseTargets]  # None when no top-k was asked for (k = 0: the sampled-token estimator)
    label_log_probs: Tensor  # [N] over every shifted position; 0 where the label is -100

    def chunked_loss(self, hidden: Tensor, head: Tensor, labels: Tensor, settings: LossSettings) -> LossOutput:
        """The objective against the served top-k (plus the tail bucket), through the sparse loss."""
        if self.sparse is None:
            raise DistillError("teacher.cache_k: a served teacher scored without top-k alternatives supports only "
                               "method.estimator: sampled_token")
        return self.sparse.chunked_loss(hidden, head, labels, settings)

    def token_log_probs(self, labels: Tensor, chunk_size: int) -> Tensor:
        """The teacher's log-prob of each label (what the sampled-token estimator needs)."""
        return self.label_log_probs


@dataclass
class ServedTeacher:
    """A teacher behind a server that scores text (on-policy distillation): each micro-batch's rows are sent as
    token ids and come back with per-token log-probs and the top `k` alternatives."""

    scorer: TextScorer
    k: int
    vocab_size: int

    def for_batch(
        self, batch: dict[str, Tensor], indices: Optional[Sequence[int]] = None, layers: Sequence[int] = ()
    ) -> tuple[ServedScores, dict[int, Tensor]]:
        """The served scores of the batch's real tokens, in the order of its trained labels."""
        if layers:
            raise DistillError("method.hidden: a served teacher gives no hidden states; remove method.hidden")
        if "position_ids" in batch:
            raise DistillError("train.packing: a served teacher scores one example per row; set train.packing: false")
        ids, labels = batch["input_ids"].tolist(), batch["labels"][:, 1:]
        rows = [row[:length] for row, length in zip(ids, batch["attention_mask"].sum(1).tolist())]
        scores = self.scorer.score(rows, self.k)
        label_log_probs = torch.zeros(labels.shape, dtype=torch.float32)
        tops = []
        for (r, t) in (labels != IGNORE_INDEX).nonzero().tolist():  # row-major: the order of the trained labels
            label_log_probs[r, t] = scores[r].token_log_probs[t + 1]  # entry t + 1 scores token t + 1
            tops.append(scores[r].top_logprobs[t + 1])
        device = batch["input_ids"].device
        sparse = _sparse_targets(tops, self.vocab_size, device) if self.k else None
        return ServedScores(sparse, label_log_probs.reshape(-1).to(device)), {}


def _sparse_targets(tops: list[list[tuple[int, float]]], vocab_size: int, device: torch.device) -> SparseTargets:
    """Top-k rows as SparseTargets; k is the fewest alternatives any row came back with, the tail the rest's mass."""
    tops = [sorted(top, key=lambda pair: -pair[1]) for top in tops]  # a server may send them in any order
    k = min((len(top) for top in tops), default=0)
    if tops and k == 0:
        raise DistillError("teacher.endpoint: the server returned no top logprobs; on-policy distillation with "
                           "method.estimator full needs them (or use method.estimator: sampled_token)")
    ids = torch.tensor([[i for i, _ in top[:k]] for top in tops], dtype=torch.long).reshape(len(tops), k)
    log_probs = torch.tensor([[lp for _, lp in top[:k]] for top in tops], dtype=torch.float32).reshape(len(tops), k)
    kept = log_probs.exp().sum(-1).clamp(max=1.0 - 1e-6)
    return SparseTargets(ids.to(device), log_probs.to(device), torch.log1p(-kept).to(device), vocab_size)
