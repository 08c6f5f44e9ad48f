"""Packing several training examples into one row of data.max_length tokens, with no attention across them.

A packed row holds whole examples back to back, and its position_ids restart at 0 at every example. Given
position_ids, no 2-D attention_mask and no KV cache (use_cache=False), transformers' masking
(masking_utils.find_packed_sequence_indices, used by create_causal_mask) reads each restart as a new sequence and
builds a block-diagonal causal mask, so a token sees only its own example. The first token of every example is
labelled -100: no position learns to predict across a boundary, and the trained targets are exactly those of the
examples run one by one.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distill.data.tokenize import IGNORE, EncodedExample
from distill.errors import DistillError
from distill.models.heads import base_model, decoder_hidden_states

# Keeps the packing's tie order apart from the epoch permutations, which use the streams [seed, epoch].
_PACKING_STREAM = 0x7061636B  # "pack"


@dataclass
class PackedRow:
    """Whole examples back to back: token ids, aligned labels (-100 on each example's first token), positions."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    examples: list[int]  # indices of the packed examples, in row order


def pack_rows(lengths: Sequence[int], max_length: int, seed: int) -> list[list[int]]:
    """Example indices of each row: best-fit decreasing, equal lengths in a seeded order; never splits an example.

    A pure function of its arguments, so the stateless batch order over rows resumes exactly.
    """
    longest = max(lengths, default=0)
    if longest > max_length:
        raise ValueError(f"an example of {longest} tokens does not fit a row of {max_length}")
    tie_order = np.random.default_rng([seed % 2**63, _PACKING_STREAM]).permutation(len(lengths))
    order = sorted(tie_order.tolist(), key=lambda i: -lengths[i])  # stable: equal lengths keep the seeded order
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, row), sorted: the best fit is a bisection away
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))  # the row with the least room that still fits
        if at == len(free):
            row, room = len(rows), max_length
            rows.append([])
        else:
            room, row = free.pop(at)
        rows[row].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], row))
    return rows


def pack_examples(encoded: Sequence[EncodedExample], max_length: int, seed: int) -> list[PackedRow]:
    """The encoded examples packed into rows of at most max_length tokens (see pack_rows)."""
    rows = pack_rows([len(e.input_ids) for e in encoded], max_length, seed)
    return [_join([encoded[i] for i in row], row) for row in rows]


def _join(examples: list[EncodedExample], indices: list[int]) -> PackedRow:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for e in examples:
        ids += e.input_ids
        # The first token would be the target of the previous example's last position: across the boundary.
        labels += [IGNORE] + e.labels[1:]
        positions += range(len(e.input_ids))
    return PackedRow(input_ids=ids, labels=labels, position_ids=positions, examples=list(indices))


def collate_packed(rows: list[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows: input_ids, labels (-100 on padding), position_ids, and attention_mask (1 on real tokens).

    Give the model input_ids and position_ids only: a 2-D attention_mask turns transformers' packed-sequence
    detection off. attention_mask here marks real tokens for counting and hidden-state KD. Padding continues the
    positions of the row's last example, so it joins that example's block; it comes after every real token, so
    the causal mask keeps it out of their attention.
    """
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[b, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(r.labels, dtype=torch.long)
        attention_mask[b, :n] = 1
        position_ids[b, :n] = torch.tensor(r.position_ids, dtype=torch.long)
        position_ids[b, n:] = torch.arange(width - n) + r.position_ids[-1] + 1
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": attention_mask}


def fill_ratio(rows: Sequence[PackedRow], max_length: int) -> float:
    """Share of the rows' max_length slots that hold real tokens."""
    return sum(len(r.input_ids) for r in rows) / (len(rows) * max_length) if rows else 0.0


def check_packing_support(model: torch.nn.Module, name: str) -> None:
    """Refuse a model whose attention crosses packed examples: the second of two packed probes must match it alone.

    Models whose attention bypasses transformers' mask functions (some remote code, custom attention backends)
    would otherwise mix examples silently.
    """
    device = next(model.parameters()).device
    vocab = base_model(model).config.get_text_config().vocab_size
    ids = (torch.arange(11, device=device) * 7 + 3) % vocab
    positions = torch.cat([torch.arange(5), torch.arange(6)]).to(device)
    was_training = model.training
    model.eval()  # no dropout, so both runs are comparable
    try:
        with torch.no_grad():
            packed = decoder_hidden_states(model, ids[None], None, positions[None])[0, 5:]
            alone = decoder_hidden_states(model, ids[None, 5:], None)[0]
    except TypeError as err:  # a decoder whose forward takes no position_ids
        raise DistillError(f"train.packing: the {name} cannot take position_ids ({err}); set train.packing: "
                           f"false") from None
    finally:
        model.train(was_training)
    tolerance = 1e-3 if packed.dtype == torch.float32 else 5e-2
    gap = float((packed.float() - alone.float()).abs().max() / alone.float().abs().max().clamp_min(1e-6))
    if gap > tolerance:
        raise DistillError(f"train.packing: the {name}'s attention crosses packed examples (relative gap "
                           f"{gap:.2g}); set train.packing: false")
