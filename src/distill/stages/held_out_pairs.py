"""Reward accuracy on held-out preference pairs (`distill eval` of a dpo run): does the trained student prefer the
chosen answer of pairs it never trained on, by its implicit reward b * (log p_policy - log p_reference)?

The held-out pairs are the pairs' held-out split (data.eval_fraction, the split that keeps their chosen answers as
eval text): for a ready file its held-out records; for teacher_vs_student the held-out teacher answers against the
reference's greedy answers to the same prompts, made here as the pairs stage makes them. The reference is the dpo
stage's starting student (adapter-free with LoRA), the policy the student that stage trained. Rewards, margin and
accuracy are the training loss's own (distill.losses.preference.pair_loss; simpo: reference-free).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.data.examples import read_pairs
from distill.data.tokenize import padding_id
from distill.losses.objective import IGNORE_INDEX
from distill.losses.preference import PreferenceSettings, pair_loss
from distill.models import load_model
from distill.recipe import Recipe
from distill.stages.data import recipe_examples
from distill.stages.facts import device, run_files, teacher_tokenizer
from distill.stages.pairs import encode_pair, pair_counts, pairs_spec, reference_student
from distill.teachers.backend import SamplingParams
from distill.teachers.local import generate_texts
from distill.training.preference import PairItem, reference_log_probs

log = logging.getLogger("distill")


def dpo_stage(recipe: Recipe) -> Optional[Recipe]:
    """The recipe's last dpo training stage (the recipe itself without `stages:`), or None."""
    stages = [s for s in recipe.training_stages() if s.method.kind == "dpo"]
    return stages[-1] if stages else None


def held_out_pairs(recipe: Recipe, reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
                   ) -> list[tuple[list, str, str]]:
    """(prompt messages, chosen, rejected) of the pairs' held-out split; teacher_vs_student's rejected answers are
    the reference's greedy answers (pairs.max_new_tokens), pairs whose answer is empty or the chosen one left out."""
    _, held_out = recipe_examples(recipe)
    if pairs_spec(recipe).source == "file":
        wanted = {e.id for e in held_out}
        pairs = read_pairs(recipe.path(recipe.data.pairs))
        return [(p.messages, p.chosen, p.rejected) for p in pairs if p.id in wanted]
    prompts = [(e.messages[:-1], e.messages[-1]["content"]) for e in held_out
               if e.messages and e.messages[-1]["role"] == "assistant"]
    if not prompts:
        return []
    tokens = pairs_spec(recipe).max_new_tokens or recipe.generate.max_new_tokens
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0, seed=recipe.seed)
    said = generate_texts(reference, tokenizer, [m for m, _ in prompts], params=params)
    return [(m, chosen, a.text) for (m, chosen), a in zip(prompts, said)
            if a.text.strip() and a.text.strip() != chosen.strip()]


def pair_rewards(recipe: Recipe, policy: PreTrainedModel, reference: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[list, str, str]]) -> Optional[dict]:
    """Reward accuracy, mean margin and loss of `policy` against `reference` on the pairs (None when none encodes)."""
    items = [PairItem(*encoded, 0.0, 0.0) for encoded in
             (encode_pair(recipe, tokenizer, m, c, r) for m, c, r in pairs) if encoded is not None]
    if not items:
        return None
    m, pad_id, size = recipe.method, padding_id(tokenizer), pairs_spec(recipe).batch_size
    policy_sums = torch.tensor(reference_log_probs(policy, items, pad_id, m.chunk_size, size), dtype=torch.float64)
    ref_sums = torch.tensor(reference_log_probs(reference, items, pad_id, m.chunk_size, size), dtype=torch.float64)
    settings = PreferenceSettings(loss=m.loss, beta=m.beta, label_smoothing=m.label_smoothing,
                                  simpo_gamma=m.simpo_gamma)
    # the answer tokens each sum is over (the shifted labels), as training counts them for the length-normalised losses
    counts = torch.tensor([[_answer_tokens(i.chosen.labels), _answer_tokens(i.rejected.labels)] for i in items])
    out = pair_loss(policy_sums[:, 0], policy_sums[:, 1], ref_sums[:, 0], ref_sums[:, 1], counts[:, 0], counts[:, 1],
                    settings)
    return {"pairs": len(items), "reward_accuracy": float(out.accuracy), "reward_margin": float(out.margin),
            "loss": float(out.loss)}


def _answer_tokens(labels: list[int]) -> int:
    return sum(t != IGNORE_INDEX for t in labels[1:])


def _reference(stage: Recipe) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """(tokenizer, the stage's starting student): a built student_init is read back without loading the teacher."""
    built = run_files(stage).student_init
    if stage.student.model is None and (built / "config.json").is_file():
        return teacher_tokenizer(stage), load_model(str(built), None, dtype=torch.float32, device=device(stage))
    return reference_student(stage)


def reward_accuracy_section(recipe: Recipe) -> dict:
    """report.json's `preference` section for a run with a trained dpo stage: the pairs' source and the training
    pairs on disk (built, dropped by reason, after the filter), and on the held-out pairs their count, reward
    accuracy, mean reward margin and loss (absent when the held-out split has no pair); {} for other runs."""
    stage = dpo_stage(recipe)
    student_dir = run_files(stage).student if stage is not None else None
    if stage is None or not (student_dir / "config.json").is_file():
        return {}
    tokenizer, reference = _reference(stage)
    pairs = held_out_pairs(stage, reference, tokenizer)
    policy = load_model(str(student_dir), None, dtype=torch.float32, device=device(recipe))  # as the reference
    measured = pair_rewards(stage, policy, reference, tokenizer, pairs) if pairs else None
    section = {"stage": getattr(stage, "stage", None), "source": pairs_spec(stage).source,
               "loss_type": stage.method.loss, "beta": stage.method.beta, "training_pairs": pair_counts(stage)}
    if measured is None:
        log.warning("eval: no held-out preference pair to measure reward accuracy on (data.eval_fraction)")
        return section
    log.info("eval: reward accuracy %.3f, mean margin %.3f on %d held-out pairs", measured["reward_accuracy"],
             measured["reward_margin"], measured["pairs"])
    return {**section, **measured}
