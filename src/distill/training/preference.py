"""Preference training on one micro-batch of pairs: chosen and rejected rows in one forward pass, their response
log-probs summed chunk by chunk, and the pair loss against the reference log-probs stored with the pairs.
KTO the same on labelled single answers, each with the mismatched answer its KL reference point is estimated on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
from transformers import PreTrainedModel

from distill.data.tokenize import EncodedExample, collate
from distill.losses.preference import (
    KtoSettings,
    LabelledLoss,
    PairLoss,
    PreferenceSettings,
    kto_batch_loss,
    pair_loss,
    sequence_log_probs,
)
from distill.models import output_head
from distill.models.heads import decoder_hidden_states

PAIR_TERMS = ("loss", "margin", "accuracy", "chosen_logp", "rejected_logp", "sft")  # what metrics.jsonl logs
KTO_TERMS = ("loss", "kl", "desirable_reward", "undesirable_reward")


@dataclass
class PairItem:
    """One encoded pair and its reference log-probs (summed over the response tokens; 0 for reference-free losses)."""

    chosen: EncodedExample
    rejected: EncodedExample
    ref_chosen: float
    ref_rejected: float


def collate_pairs(items: Sequence[PairItem], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded as one batch, with the reference log-probs of each pair."""
    batch = collate([i.chosen for i in items] + [i.rejected for i in items], pad_id)
    batch["ref_chosen"] = torch.tensor([i.ref_chosen for i in items], dtype=torch.float32)
    batch["ref_rejected"] = torch.tensor([i.ref_rejected for i in items], dtype=torch.float32)
    return batch


def response_log_probs(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], chunk_size: int, compute_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's labelled tokens [B], their count [B]) without [B, T, V] logits."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.autocast(ids.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        hidden = decoder_hidden_states(model, ids, mask, None)
    return sequence_log_probs(hidden[:, :-1], output_head(model), batch["labels"][:, 1:], chunk_size)


@torch.inference_mode()
def reference_log_probs(
    model: PreTrainedModel, items: Sequence[PairItem], pad_id: int, chunk_size: int, batch_size: int
) -> list[tuple[float, float]]:
    """The reference model's (chosen, rejected) summed response log-probs of every pair, in float32."""
    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[float, float]] = []
    for first in range(0, len(items), batch_size):
        chunk = items[first:first + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        sums, _ = response_log_probs(model, batch, chunk_size)
        out += list(zip(sums[:len(chunk)].tolist(), sums[len(chunk):].tolist()))
    return out


@dataclass(frozen=True)
class PairObjective:
    """method.kind: dpo's loss on a micro-batch of pairs (what the loop calls instead of loss_on_batch)."""

    settings: PreferenceSettings
    terms: ClassVar[tuple[str, ...]] = PAIR_TERMS  # what the loop logs of each step

    def __call__(self, student: PreTrainedModel, batch: dict[str, torch.Tensor],
                 compute_dtype: torch.dtype = torch.float32) -> PairLoss:
        """The pair loss of a collate_pairs batch, from the student's response log-probs and the stored reference."""
        sums, counts = response_log_probs(student, batch, self.settings.chunk_size, compute_dtype)
        n = sums.size(0) // 2
        return pair_loss(sums[:n], sums[n:], batch["ref_chosen"], batch["ref_rejected"], counts[:n], counts[n:],
                         self.settings)


@dataclass
class LabelledItem:
    """One encoded KTO example: its answer, its prompt with another example's answer (the KL row), its label, and
    the reference's summed response log-probs of both."""

    answer: EncodedExample
    kl: EncodedExample
    desirable: bool
    ref_logp: float
    ref_kl: float


def collate_labelled(items: Sequence[LabelledItem], pad_id: int) -> dict[str, torch.Tensor]:
    """The answers as one batch, the KL rows as another (kl_ keys), labels and reference log-probs."""
    batch = collate([i.answer for i in items], pad_id)
    batch.update({f"kl_{k}": v for k, v in collate([i.kl for i in items], pad_id).items()})
    batch["desirable"] = torch.tensor([i.desirable for i in items], dtype=torch.bool)
    batch["ref_logp"] = torch.tensor([i.ref_logp for i in items], dtype=torch.float32)
    batch["ref_kl"] = torch.tensor([i.ref_kl for i in items], dtype=torch.float32)
    return batch


def kl_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The KL rows of a collate_labelled batch, as a batch of their own."""
    return {k: batch[f"kl_{k}"] for k in ("input_ids", "attention_mask", "labels")}


@torch.inference_mode()
def labelled_reference_log_probs(
    model: PreTrainedModel, items: Sequence[LabelledItem], pad_id: int, chunk_size: int, batch_size: int
) -> list[tuple[float, float]]:
    """The reference model's (answer, KL row) summed response log-probs of every labelled example, in float32."""
    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[float, float]] = []
    for first in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate_labelled(items[first:first + batch_size], pad_id).items()}
        answers, _ = response_log_probs(model, batch, chunk_size)
        kls, _ = response_log_probs(model, kl_rows(batch), chunk_size)
        out += list(zip(answers.tolist(), kls.tolist()))
    return out


@dataclass(frozen=True)
class KtoObjective:
    """method.kind: kto's loss on a micro-batch of labelled answers (what the loop calls instead of loss_on_batch);
    `mean_over_ranks` averages the reference point over every process's rows (torch.mean on one process)."""

    settings: KtoSettings
    mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] = torch.mean
    terms: ClassVar[tuple[str, ...]] = KTO_TERMS

    def __call__(self, student: PreTrainedModel, batch: dict[str, torch.Tensor],
                 compute_dtype: torch.dtype = torch.float32) -> LabelledLoss:
        """KTO on a collate_labelled batch; the KL rows only set the reference point, so they take no gradient."""
        logp, _ = response_log_probs(student, batch, self.settings.chunk_size, compute_dtype)
        with torch.no_grad():
            kl_logp, _ = response_log_probs(student, kl_rows(batch), self.settings.chunk_size, compute_dtype)
        return kto_batch_loss(logp, batch["ref_logp"], batch["desirable"], kl_logp, batch["ref_kl"], self.settings,
                              mean=self.mean_over_ranks)
