"""Preference losses on sequence log-probs (DPO sigmoid, IPO, hinge, reference-free SimPO, KTO), and the chunked
per-sequence log-probs they take: the response tokens' log-probs summed per row, never `[batch, seq, vocab]` logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from distill.errors import DistillError
from distill.losses.objective import IGNORE_INDEX

PAIR_LOSSES = ("sigmoid", "ipo", "hinge", "simpo")
# IPO and SimPO compare log-probs averaged over the response's tokens (as in their papers and in TRL); the others sums.
LENGTH_NORMALISED = ("ipo", "simpo")
REFERENCE_FREE = ("simpo",)


@dataclass(frozen=True)
class PreferenceSettings:
    """method.loss, beta, label_smoothing, simpo_gamma and sft_weight as plain values."""

    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5  # SimPO's target margin (TRL's simpo_gamma)
    sft_weight: float = 0.0  # RPO: weight of the mean NLL of the chosen responses' tokens
    chunk_size: int = 192


@dataclass
class PairLoss:
    """A batch of pairs' loss and its detached terms (means over the pairs)."""

    loss: Tensor
    margin: Tensor  # mean of chosen reward - rejected reward
    accuracy: Tensor  # share of pairs whose chosen reward beats the rejected one
    chosen_logp: Tensor  # mean summed log-prob of the chosen responses under the student
    rejected_logp: Tensor
    sft: Tensor  # the chosen responses' mean token NLL (whether or not sft_weight uses it)


def sequence_log_probs(hidden: Tensor, head: Tensor, labels: Tensor, chunk_size: int = 192) -> tuple[Tensor, Tensor]:
    """(sum of log p(label) over each row's labelled positions [B], their count [B]), `chunk_size` positions at a time.

    `hidden` [B, T, D] are the final hidden states, `labels` [B, T] already shifted (position i predicts labels[i],
    -100: no loss). Each chunk's logits are recomputed in the backward pass (activation checkpointing), so memory
    holds one [chunk, V] block at a time, never [B, T, V].
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2] or head.dim() != 2 or head.size(1) != hidden.size(2):
        raise DistillError(f"sequence_log_probs: expected hidden [B, T, D], head [V, D], labels [B, T]; got "
                           f"{tuple(hidden.shape)}, {tuple(head.shape)}, {tuple(labels.shape)}")
    valid = labels != IGNORE_INDEX
    rows = torch.arange(labels.size(0), device=labels.device).unsqueeze(1).expand_as(labels)[valid]
    states, targets = hidden[valid], labels[valid]
    sums = torch.zeros(labels.size(0), dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.numel(), chunk_size):
        piece = slice(start, start + chunk_size)
        token_logp = checkpoint(_token_log_probs, states[piece], head, targets[piece], use_reentrant=False)
        sums = sums.index_add(0, rows[piece], token_logp)
    return sums, valid.sum(dim=1)


def _token_log_probs(states: Tensor, head: Tensor, targets: Tensor) -> Tensor:
    """log p(target) of each position from its hidden state, in float32."""
    logits = (states @ head.t()).float()
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - logits.logsumexp(dim=-1)


def pair_loss(
    chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
    chosen_tokens: Tensor, rejected_tokens: Tensor, settings: PreferenceSettings,
) -> PairLoss:
    """The preference loss of a batch of pairs from their summed response log-probs (policy and reference) and
    response lengths in tokens.

    sigmoid (DPO): -(1-ls)*log s(b*h) - ls*log s(-b*h); ipo: (h - 1/(2b))^2; hinge: max(0, 1 - b*h), where
    h = (chosen - ref_chosen) - (rejected - ref_rejected); ipo on per-token means. simpo (no reference):
    the sigmoid form on h = avg_chosen - avg_rejected - gamma/b. Rewards are b * the policy's log-ratio to the
    reference (simpo: b * its mean token log-prob). sft_weight adds the chosen tokens' mean NLL (RPO).
    """
    if settings.loss not in PAIR_LOSSES:
        raise DistillError(f"method.loss: unknown preference loss {settings.loss!r} "
                           f"(expected {', '.join(PAIR_LOSSES)})")
    beta, ls = settings.beta, settings.label_smoothing
    n_chosen, n_rejected = chosen_tokens.clamp(min=1).to(chosen.dtype), rejected_tokens.clamp(min=1).to(chosen.dtype)
    if settings.loss in LENGTH_NORMALISED:
        chosen_score, rejected_score = chosen / n_chosen, rejected / n_rejected
        ref_c, ref_r = ref_chosen / n_chosen, ref_rejected / n_rejected
    else:
        chosen_score, rejected_score, ref_c, ref_r = chosen, rejected, ref_chosen, ref_rejected
    if settings.loss in REFERENCE_FREE:
        ref_c, ref_r = torch.zeros_like(ref_c), torch.zeros_like(ref_r)
    chosen_reward, rejected_reward = beta * (chosen_score - ref_c), beta * (rejected_score - ref_r)
    h = (chosen_score - ref_c) - (rejected_score - ref_r)
    if settings.loss == "simpo":
        h = h - settings.simpo_gamma / beta
    if settings.loss in ("sigmoid", "simpo"):
        losses = -(1 - ls) * F.logsigmoid(beta * h) - ls * F.logsigmoid(-beta * h)
    elif settings.loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    sft = -chosen.sum() / n_chosen.sum()
    loss = losses.mean() + (settings.sft_weight * sft if settings.sft_weight else 0.0)
    margins = (chosen_reward - rejected_reward).detach()
    return PairLoss(loss=loss, margin=margins.mean(), accuracy=(margins > 0).to(chosen.dtype).mean(),
                    chosen_logp=chosen.detach().mean(), rejected_logp=rejected.detach().mean(), sft=sft.detach())


def kto_loss(
    logp: Tensor, ref_logp: Tensor, desirable: Tensor, kl: Tensor, *, beta: float = 0.1,
    desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO on single labelled answers: desirable ones 1 - s(b*(r - z)), undesirable ones 1 - s(b*(z - r)),
    with r = logp - ref_logp and z the (detached, clamped at 0) reference-point KL estimate; weighted mean."""
    ratio, z = logp - ref_logp, kl.detach().clamp(min=0)
    good = desirable.bool()
    losses = torch.where(good, 1 - torch.sigmoid(beta * (ratio - z)), 1 - torch.sigmoid(beta * (z - ratio)))
    weights = torch.where(good, torch.full_like(ratio, desirable_weight), torch.full_like(ratio, undesirable_weight))
    return (weights * losses).sum() / weights.sum()


@dataclass(frozen=True)
class KtoSettings:
    """method.kind: kto's beta, desirable_weight and undesirable_weight as plain values."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    chunk_size: int = 192


@dataclass
class LabelledLoss:
    """A batch of labelled answers' KTO loss and its detached terms."""

    loss: Tensor
    kl: Tensor  # the reference point z0: the batch's mean policy-to-reference log-ratio on mismatched answers, >= 0
    desirable_reward: Tensor  # mean b * log-ratio of the desirable answers (nan when the batch has none)
    undesirable_reward: Tensor  # the same of the undesirable answers


def kto_batch_loss(
    logp: Tensor, ref_logp: Tensor, desirable: Tensor, kl_logp: Tensor, kl_ref_logp: Tensor, settings: KtoSettings,
    mean: Callable[[Tensor], Tensor] = torch.mean,
) -> LabelledLoss:
    """KTO on a batch: z0 = mean(kl_logp - kl_ref_logp) over the batch (each prompt with another example's answer,
    as TRL's KTOTrainer estimates KL(policy || reference)), detached and clamped at 0; then kto_loss. `mean` is
    over the whole batch: on several processes, every rank's rows (as TRL gathers them)."""
    kl = mean((kl_logp - kl_ref_logp).detach()).clamp(min=0)
    loss = kto_loss(logp, ref_logp, desirable, kl, beta=settings.beta, desirable_weight=settings.desirable_weight,
                    undesirable_weight=settings.undesirable_weight)
    rewards, good = settings.beta * (logp - ref_logp).detach(), desirable.bool()
    nan = torch.full((), float("nan"), dtype=rewards.dtype, device=rewards.device)
    return LabelledLoss(loss=loss, kl=kl, desirable_reward=rewards[good].mean() if good.any() else nan,
                        undesirable_reward=rewards[~good].mean() if (~good).any() else nan)
