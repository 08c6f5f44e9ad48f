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
from distill.losses.sparse import SparseTargets
from distill.models import output_head
from distill.models.heads import decoder_layer_outputs

if TYPE_CHECKING:
    from distill.signals.reader import TeacherCacheReader

# The teacher's logit signal for one micro-batch: dense over every shifted position, or sparse over the trained ones.
LogitSignal = Union[DenseTeacher, SparseTargets]

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
