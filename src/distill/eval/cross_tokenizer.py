"""Measuring a student against a teacher whose tokenizer differs (docs/cross_tokenizer.md, "Evaluation").

Each model is scored on its own tokens; what makes the numbers comparable is the unit:
- bits per byte: a model's summed next-token NLL (nats) over the UTF-8 bytes its scored tokens stand for, / ln 2
  (`token_byte_lengths` gives each id's bytes; distill.eval.metrics.perplexity sums them);
- top-1 agreement and KL to the teacher on aligned spans: per group of tokens that cover the same characters on
  both sides (distill.models.alignment), each side's GOLD-merged span distribution restricted to the vocabulary
  entries whose bytes both tokenizers hold and renormalised there; agreement when both put their top entry on the
  same string, KL(teacher || student) between the two restricted distributions.
With one tokenizer on both sides every group is one token and every entry is shared, so both equal the ordinary
token-by-token agreement and KL.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.data.tokenize import EncodedExample, collate
from distill.eval.metrics import CHUNK_POSITIONS
from distill.losses.cross_tokenizer import merged_log_probs
from distill.models.alignment import token_bytes
from distill.signals.cross_tokenizer import TeacherView, batch_groups


def token_byte_lengths(tokenizer: PreTrainedTokenizerBase) -> Tensor:
    """[max id + 1]: how many UTF-8 bytes of text each id stands for; special tokens (bos, eos, end of turn) 0."""
    pieces = token_bytes(tokenizer)
    specials = set(tokenizer.all_special_ids)
    specials.update(i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False))
    lengths = torch.zeros(max(pieces, default=-1) + 1, dtype=torch.long)
    for i, piece in pieces.items():
        if i not in specials:
            lengths[i] = len(piece)
    return lengths


@torch.inference_mode()
def aligned_agreement(
    student: PreTrainedModel, teacher: PreTrainedModel, student_examples: Sequence[EncodedExample],
    views: Sequence[TeacherView], shared_student: Tensor, shared_teacher: Tensor, *, student_pad: int,
    teacher_pad: int, batch_size: int = 8,
) -> dict[str, Optional[float] | int]:
    """Top-1 agreement and mean KL(teacher || student) per aligned group of the student's examples, which the
    teacher reads as `views` (signals.cross_tokenizer.teacher_views); `shared_*` pair the entries both hold."""
    student.eval()
    teacher.eval()
    matches, kl_sum, groups = 0, 0.0, 0
    for start in range(0, len(views), batch_size):
        chosen = slice(start, start + batch_size)
        s_flat, s_targets, s_width = _student_rows(student, student_examples[chosen], student_pad)
        t_flat, t_width = _teacher_rows(teacher, views[chosen], teacher_pad, s_flat.device)
        aligned = batch_groups(views[chosen], s_width, t_width).to(s_flat.device)
        s_tokens = torch.where(aligned.student_rows >= 0, s_targets[aligned.student_rows.clamp(min=0)], -1)
        for first in range(0, aligned.count, CHUNK_POSITIONS):
            part = slice(first, first + CHUNK_POSITIONS)
            s = _merged(s_flat, aligned.student_rows[part], s_tokens[part])[:, shared_student.to(s_flat.device)]
            t = _merged(t_flat, aligned.teacher_rows[part], aligned.teacher_tokens[part])
            t = t[:, shared_teacher.to(t_flat.device)].to(s.device)
            s, t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
            matches += int((s.argmax(-1) == t.argmax(-1)).sum())
            kl_sum += float((t.exp() * (t - s)).sum(-1).double().sum())
        groups += aligned.count
    if groups == 0:
        return {"top1_agreement": None, "kl_to_teacher": None, "groups": 0}
    return {"top1_agreement": matches / groups, "kl_to_teacher": kl_sum / groups, "groups": groups}


def _student_rows(model: PreTrainedModel, examples: Sequence[EncodedExample], pad: int) -> tuple[Tensor, Tensor, int]:
    """Flat logits [B * (W - 1), V] (row b * (W - 1) + j - 1 predicts token j of row b), those tokens, W - 1."""
    batch = collate(list(examples), pad)
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    return logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), ids.size(1) - 1


def _teacher_rows(model: PreTrainedModel, views: Sequence[TeacherView], pad: int,
                  device: torch.device) -> tuple[Tensor, int]:
    """The teacher's flat logits on its own ids of the views (laid out like `_student_rows`), and W - 1."""
    width = max(2, max(len(v.ids) for v in views))
    ids = torch.full((len(views), width), pad, dtype=torch.long)
    mask = torch.zeros((len(views), width), dtype=torch.long)
    for row, view in enumerate(views):
        ids[row, :len(view.ids)] = torch.tensor(view.ids, dtype=torch.long)
        mask[row, :len(view.ids)] = 1
    where = next(model.parameters()).device
    logits = model(input_ids=ids.to(where), attention_mask=mask.to(where), use_cache=False).logits
    return logits[:, :-1].reshape(-1, logits.size(-1)), width - 1


def _merged(flat: Tensor, rows: Tensor, tokens: Tensor) -> Tensor:
    """[G, V] float32 GOLD-merged log-probs of the groups, log-softmax taken only on the rows they use."""
    needed = torch.unique(rows[rows >= 0])
    local = torch.where(rows >= 0, torch.searchsorted(needed, rows), rows)
    return merged_log_probs(F.log_softmax(flat[needed].float(), dim=-1), local, tokens)

