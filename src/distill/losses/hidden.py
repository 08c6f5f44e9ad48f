"""Hidden-state KD: student block outputs matched to teacher block outputs through learned projections.

Every mapped (student layer, teacher layer) pair gets its own `Linear(student_width, teacher_width)`, even when
the widths are equal: one code path, and a student cut from the teacher starts at the exact channel map.
The projections are training-only; they live in checkpoints, never in the saved student.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from distill.errors import DistillError

HiddenLoss = Literal["mse", "cosine"]
LayerMap = list[tuple[int, int]]


def default_layer_map(
    student_layers: int, teacher_layers: int, teacher_layer_ids: Optional[Sequence[int]] = None
) -> LayerMap:
    """Student block i -> the teacher block it was copied from, else the uniform map ending on the last blocks."""
    if teacher_layer_ids is not None:
        if len(teacher_layer_ids) != student_layers:
            raise DistillError(
                f"config.distill_pruned_from.teacher_layers: {len(teacher_layer_ids)} entries for a student of "
                f"{student_layers} layers"
            )
        return check_layer_map([(i, int(t)) for i, t in enumerate(teacher_layer_ids)], student_layers,
                               teacher_layers, key="config.distill_pruned_from.teacher_layers")
    # round((i+1) * Lt / Ls) - 1 with halves rounded up, in integers so no float edge case decides a layer.
    return [(i, max(0, (2 * (i + 1) * teacher_layers + student_layers) // (2 * student_layers) - 1))
            for i in range(student_layers)]


def check_layer_map(
    layer_map: Sequence[Sequence[int]], student_layers: int, teacher_layers: int,
    key: str = "method.hidden.layer_map",
) -> LayerMap:
    """The map as (student, teacher) int pairs; a DistillError naming `key` when a pair is out of range."""
    if not layer_map:
        raise DistillError(f"{key}: empty; give at least one [student_layer, teacher_layer] pair")
    pairs = []
    for pair in layer_map:
        s, t = (int(x) for x in pair)
        if not (0 <= s < student_layers and 0 <= t < teacher_layers):
            raise DistillError(
                f"{key}: [{s}, {t}] is out of range: student layers are 0..{student_layers - 1}, "
                f"teacher layers 0..{teacher_layers - 1}"
            )
        pairs.append((s, t))
    return pairs


class HiddenStateMatcher(nn.Module):
    """Learned projections P_k and the loss between P_k(student layer s_k) and teacher layer t_k.

    Init: with `hidden_channels` (the teacher channels a width-pruned student kept, one per student channel)
    each P_k is the scatter matrix putting student channel j at teacher channel hidden_channels[j]; with equal
    widths and no channels it is the identity; otherwise a random orthogonal map (norm-preserving).
    """

    def __init__(
        self,
        layer_map: Sequence[Sequence[int]],
        student_width: int,
        teacher_width: int,
        loss: HiddenLoss = "mse",
        hidden_channels: Optional[Sequence[int]] = None,
        seed: int = 0,
    ):
        super().__init__()
        if loss not in ("mse", "cosine"):
            raise DistillError(f"method.hidden.loss: expected mse or cosine, got {loss!r}")
        self.layer_map: LayerMap = [(int(s), int(t)) for s, t in layer_map]
        self.loss = loss
        self.projections = nn.ModuleList(
            nn.Linear(student_width, teacher_width, bias=False) for _ in self.layer_map
        )
        init = _initial_projection(student_width, teacher_width, hidden_channels, seed)
        with torch.no_grad():
            for projection in self.projections:
                projection.weight.copy_(init)

    @property
    def student_layers(self) -> list[int]:
        return sorted({s for s, _ in self.layer_map})

    @property
    def teacher_layers(self) -> list[int]:
        return sorted({t for _, t in self.layer_map})

    def forward(self, student_states: Mapping[int, Tensor], teacher_states: Mapping[int, Tensor],
                mask: Tensor) -> Tensor:
        """Mean over mapped layers of the per-layer loss on the positions where `mask` ([B, T]) is true."""
        valid = mask.bool()
        losses = [
            self._layer_loss(projection, student_states[s][valid], teacher_states[t][valid].detach())
            for projection, (s, t) in zip(self.projections, self.layer_map)
        ]
        return torch.stack(losses).mean()

    def _layer_loss(self, projection: nn.Linear, student: Tensor, teacher: Tensor) -> Tensor:
        """The loss of one pair on [N, Ds] student and [N, Dt] teacher rows (N may be 0: loss 0, graph kept)."""
        dtype = projection.weight.dtype  # the projections' (fp32 master) dtype, even under bf16 compute
        projected = projection(student.to(dtype))
        teacher = teacher.to(dtype)
        if teacher.size(0) == 0:
            return projected.sum() * 0.0
        if self.loss == "mse":
            # Normalised by the teacher's energy, so the term is scale-free across models and layers.
            energy = teacher.square().sum().clamp_min(torch.finfo(dtype).tiny)
            return (projected - teacher).square().sum() / energy
        return (1.0 - nn.functional.cosine_similarity(projected, teacher, dim=-1)).mean()


def _initial_projection(
    student_width: int, teacher_width: int, hidden_channels: Optional[Sequence[int]], seed: int
) -> Tensor:
    """[teacher_width, student_width] starting weight: scatter, identity or random orthogonal."""
    if hidden_channels is not None:
        channels = [int(c) for c in hidden_channels]
        key = "config.distill_pruned_from.hidden_channels"
        if len(channels) != student_width:
            raise DistillError(f"{key}: {len(channels)} channels for a student of width {student_width}")
        if len(set(channels)) != len(channels) or not all(0 <= c < teacher_width for c in channels):
            raise DistillError(f"{key}: channels must be distinct and in 0..{teacher_width - 1}")
        weight = torch.zeros(teacher_width, student_width)
        weight[channels, range(student_width)] = 1.0
        return weight
    if student_width == teacher_width:
        return torch.eye(teacher_width)
    weight = torch.empty(teacher_width, student_width)
    # A dedicated generator: building the matcher leaves the global RNG (and so the run's batches) untouched.
    return nn.init.orthogonal_(weight, generator=torch.Generator().manual_seed(seed))
