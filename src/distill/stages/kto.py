"""KTO's labelled answers (method.kind: kto): read from data.pairs, with the reference model's log-probs computed once.

Each training-split example (a prompt, one answer, a desirable/undesirable label) becomes a record in the same
append-only, fsynced shards as preference pairs (<run>/pairs/), content-addressed by its prompt, answer, label and
KL answer, the reference student's weights and the encoding settings. The KL answer is the answer of the example
before it in the file's order (the first takes the last's): KTO's reference point z0 is the batch's mean
policy-to-reference log-ratio of each prompt paired with another example's answer, as TRL's KTOTrainer estimates
it (its KL dataset: completions shifted by one). So the reference's log-probs of both rows are stored, and training
holds no second model. The reference is the starting student (adapter-free when training with LoRA).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Optional

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.data.examples import read_labelled
from distill.data.layouts import Example, Messages
from distill.data.teacher_records import ShardWriter, latest_records, shard_paths
from distill.data.tokenize import EncodedExample, encode_example, padding_id
from distill.errors import DistillError
from distill.recipe import Recipe
from distill.signals.cache import dataset_hash, example_hash
from distill.stages.data import recipe_examples
from distill.stages.facts import run_files
from distill.stages.pairs import (
    DROPPED,
    OK,
    PairStats,
    built_records,
    check_pairs,
    pairs_spec,
    reference_student,
    weights_fingerprint,
)
from distill.training.preference import LabelledItem, labelled_reference_log_probs

log = logging.getLogger("distill")

SOURCE = "labelled"  # the records' `source`, and what `distill pairs` reports


@dataclass
class PlannedAnswer:
    """A labelled answer the recipe trains on: its content address, prompt, answer, label and KL answer."""

    id: str
    messages: Messages
    answer: str
    desirable: bool
    kl_answer: str  # another example's answer to this prompt: the row KTO's reference point is estimated on


def _address(content: dict, reference: str, recipe: Recipe) -> str:
    key = {"kind": "kto", "content": content, "reference": reference, "max_length": recipe.data.max_length,
           "system_prompt": recipe.data.system_prompt}
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:20]


def planned_answers(recipe: Recipe, reference: str) -> list[PlannedAnswer]:
    """The labelled answers the recipe trains on, in the file's order: its training split, each with its KL answer."""
    check_pairs(recipe)
    train_examples, _ = recipe_examples(recipe)
    wanted = {e.id for e in train_examples}
    chosen = [x for x in read_labelled(recipe.path(recipe.data.pairs)) if x.id in wanted]
    planned = []
    for index, example in enumerate(chosen):
        kl_answer = chosen[index - 1].answer  # index -1: the last example's answer
        content = {"messages": example.messages, "answer": example.answer, "desirable": example.desirable,
                   "kl_answer": kl_answer}
        planned.append(PlannedAnswer(_address(content, reference, recipe), example.messages, example.answer,
                                     example.desirable, kl_answer))
    return planned


def encode_labelled(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, messages: Messages, answer: str,
                    kl_answer: str) -> Optional[tuple[EncodedExample, EncodedExample]]:
    """The answer row and the KL row tokenized as training reads them; None when one has no answer token left."""
    rows = [encode_example(Example(id="", messages=messages + [{"role": "assistant", "content": text}]), tokenizer,
                           recipe.data.max_length, recipe.data.system_prompt) for text in (answer, kl_answer)]
    return None if rows[0] is None or rows[1] is None else (rows[0], rows[1])


def build_labelled(recipe: Recipe, *, progress: bool = True, stop_after: Optional[int] = None) -> PairStats:
    """Store the reference log-probs of every planned labelled answer not stored yet, batch by batch.

    `stop_after` ends the call after that many batches, as a kill would (a later call resumes).
    """
    spec = pairs_spec(recipe)
    check_pairs(recipe)
    recipe_examples(recipe)  # a malformed labelled file fails before any model loads
    tokenizer, student = reference_student(recipe)
    reference = weights_fingerprint(student)
    planned = planned_answers(recipe, reference)
    directory = run_files(recipe).pairs
    done = latest_records(directory) if shard_paths(directory) else {}
    todo = [p for p in planned if p.id not in done]
    stats = PairStats(source=SOURCE, planned=len(planned), existing=len(planned) - len(todo))
    writer = ShardWriter(directory, recipe.generate.shard_records)
    batches = range(0, len(todo), spec.batch_size)
    for number, first in enumerate(tqdm(batches, desc="kto", disable=not progress or not todo, dynamic_ncols=True)):
        if stop_after is not None and number == stop_after:
            break
        writer.append(_build_batch(recipe, tokenizer, student, todo[first:first + spec.batch_size], reference, stats))
    log.info("labelled answers (kto): %d planned, %d already built, %d built now, dropped %s -> %s", stats.planned,
             stats.existing, stats.built, stats.dropped or "none", directory)
    return stats


def _build_batch(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, student: PreTrainedModel,
                 batch: list[PlannedAnswer], reference: str, stats: PairStats) -> list[dict]:
    """The records of one batch of planned answers, with the reference's log-probs of the answer and KL rows."""
    records, items, kept = [], [], []
    for planned in batch:
        record = {"id": planned.id, "source": SOURCE, "reference": reference, "messages": planned.messages,
                  "answer": planned.answer, "desirable": planned.desirable, "kl_answer": planned.kl_answer}
        encoded = encode_labelled(recipe, tokenizer, planned.messages, planned.answer, planned.kl_answer)
        if encoded is None:
            reason = "no answer token within data.max_length"
            stats.dropped[reason] = stats.dropped.get(reason, 0) + 1
            records.append({**record, "status": DROPPED, "reason": reason})
            continue
        items.append(LabelledItem(encoded[0], encoded[1], planned.desirable, 0.0, 0.0))
        kept.append(record)
        records.append(record)
    if items:
        references = labelled_reference_log_probs(student, items, padding_id(tokenizer), recipe.method.chunk_size,
                                                  pairs_spec(recipe).batch_size)
        for record, item, (ref_logp, ref_kl) in zip(kept, items, references):
            record.update(status=OK, ref_logp=ref_logp, ref_kl=ref_kl, tokens=len(item.answer.input_ids),
                          kl_tokens=len(item.kl.input_ids))
        stats.built += len(items)
    return records


def labelled_training_items(recipe: Recipe, student: PreTrainedModel,
                            tokenizer: PreTrainedTokenizerBase) -> list[LabelledItem]:
    """The stored labelled answers the recipe trains on, encoded, with their reference log-probs (refused if missing).

    `student` is the starting student (before any LoRA adapter): the reference the records were built with.
    """
    planned = planned_answers(recipe, weights_fingerprint(student))
    directory = run_files(recipe).pairs
    built = built_records(recipe, [p.id for p in planned], "labelled answers")
    items = []
    for planned_answer in planned:
        record = built[planned_answer.id]
        if record.get("status") != OK:
            continue
        encoded = encode_labelled(recipe, tokenizer, record["messages"], record["answer"], record["kl_answer"])
        if encoded is None or len(encoded[0].input_ids) != record["tokens"] \
                or len(encoded[1].input_ids) != record["kl_tokens"]:
            raise DistillError(f"{directory}: labelled answer {planned_answer.id} encodes differently from when it "
                               f"was built; delete {directory} to rebuild")
        items.append(LabelledItem(encoded[0], encoded[1], record["desirable"], record["ref_logp"], record["ref_kl"]))
    if not items:
        raise DistillError(f"{directory}: no usable labelled answers (every planned one was dropped)")
    return items


def labelled_hash(items: list[LabelledItem]) -> str:
    """One hash of every labelled answer's tokens, label and reference log-probs (kept in checkpoints)."""
    return dataset_hash([example_hash(i.answer.input_ids + i.kl.input_ids, i.answer.labels + i.kl.labels)
                         + f":{i.desirable}:{i.ref_logp!r}:{i.ref_kl!r}" for i in items])
