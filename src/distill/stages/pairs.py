"""The pairs stage: preference pairs for method.kind: dpo, with the reference model's log-probs computed once.

Pairs come from a ready file (data.pairs) or are made teacher_vs_student: chosen = the teacher's answer to a prompt
(its teacher data), rejected = the starting student's greedy answer to the same prompt. Either way only the
training split's pairs are built (the held-out split's chosen answers are eval text). Each pair is a record in
append-only, fsynced shards under <run>/pairs/, content-addressed by its prompt and answers (or the teacher answer
it starts from), the reference student's weights and the encoding settings, so a killed run resumes with nothing
lost or duplicated and a changed student or recipe never mixes its pairs with old ones. The reference is the
starting student (adapter-free when training with LoRA); training reads its log-probs from the records.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.data.examples import read_pairs
from distill.data.layouts import Example, Messages
from distill.data.teacher_records import ShardWriter, latest_records, shard_paths
from distill.data.tokenize import EncodedExample, encode_example, padding_id
from distill.errors import DistillError
from distill.losses.preference import REFERENCE_FREE
from distill.models import load_tokenizer
from distill.recipe import PairsSpec, Recipe
from distill.stages.data import chosen_example, recipe_examples
from distill.stages.facts import load_teacher, model_source, run_files, teacher_tokenizer
from distill.stages.student import initial_student
from distill.teachers.backend import SamplingParams
from distill.teachers.local import generate_texts
from distill.training.preference import PairItem, reference_log_probs

log = logging.getLogger("distill")

OK, DROPPED = "ok", "dropped"  # a dropped record keeps a pair that cannot train (same answers, nothing to encode)


@dataclass
class PlannedPair:
    """A pair the recipe asks for: its content address, prompt and answers (rejected None: the student writes it)."""

    id: str
    messages: Messages
    chosen: str
    rejected: Optional[str]


@dataclass
class PairStats:
    """What one run of the pairs stage did."""

    source: str
    planned: int = 0
    existing: int = 0  # already built by an earlier run
    built: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count


def pairs_spec(recipe: Recipe) -> PairsSpec:
    """The recipe's pairs section (its defaults when absent)."""
    return recipe.pairs or PairsSpec()


def check_pairs(recipe: Recipe) -> None:
    """What method.kind: dpo (or kto) needs, refused before any model loads."""
    spec = pairs_spec(recipe)
    if recipe.method.kind == "kto" and (recipe.data.pairs is None or spec.source != "file"):
        raise DistillError("method.kind: kto needs labelled answers: set data.pairs (records with a prompt, one "
                           "answer and a boolean label or kto_tag) and leave pairs.source at file")
    if recipe.method.kind == "kto" and recipe.train.packing:
        raise DistillError("train.packing: labelled answers are not packed; remove it for method.kind: kto")
    if recipe.method.kind != "dpo":
        return
    if spec.source == "file" and recipe.data.pairs is None:
        raise DistillError("method.kind: dpo needs preference pairs: set data.pairs (a pairs file) or "
                           "pairs.source: teacher_vs_student")
    if spec.source == "teacher_vs_student" and recipe.data.prompts is None:
        raise DistillError("pairs.source: teacher_vs_student needs data.prompts (the teacher's answers are chosen)")
    if recipe.train.packing:
        raise DistillError("train.packing: preference pairs are not packed; remove it for method.kind: dpo")


def reference_student(recipe: Recipe) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """(tokenizer, the starting student in fp32): the policy's start and the reference of every pair."""
    tokenizer = teacher_tokenizer(recipe)
    teacher = load_teacher(recipe) if recipe.student.built_from_teacher else None
    student = initial_student(recipe, teacher, tokenizer)
    if recipe.student.model is not None:
        tokenizer = load_tokenizer(*model_source(recipe, recipe.student))
    return tokenizer, student


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every tensor of the model (names, shapes and bytes): which reference the log-probs came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def _address(content: dict, reference: str, recipe: Recipe) -> str:
    key = {"content": content, "reference": reference, "max_length": recipe.data.max_length,
           "system_prompt": recipe.data.system_prompt}
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:20]


def planned_pairs(recipe: Recipe, reference: str) -> list[PlannedPair]:
    """The pairs the recipe trains on, in order: the training split of its source."""
    check_pairs(recipe)
    train_examples, _ = recipe_examples(recipe)
    wanted = {e.id for e in train_examples}
    if pairs_spec(recipe).source == "file":
        pairs = [p for p in read_pairs(recipe.path(recipe.data.pairs)) if chosen_example(p).id in wanted]
        return [PlannedPair(_address({"messages": p.messages, "chosen": p.chosen, "rejected": p.rejected}, reference,
                                     recipe), p.messages, p.chosen, p.rejected) for p in pairs]
    tokens = _student_tokens(recipe)
    planned = []
    for example in train_examples:
        messages = example.messages or []
        if not messages or messages[-1]["role"] != "assistant":
            continue  # plain text (data.train) has no prompt to answer
        content = {"teacher_answer": example.id, "messages": messages, "max_new_tokens": tokens}
        planned.append(PlannedPair(_address(content, reference, recipe), messages[:-1], messages[-1]["content"], None))
    return planned


def _student_tokens(recipe: Recipe) -> int:
    return pairs_spec(recipe).max_new_tokens or recipe.generate.max_new_tokens


def encode_pair(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, messages: Messages, chosen: str,
                rejected: str) -> Optional[tuple[EncodedExample, EncodedExample]]:
    """Both sides tokenized the way training reads them (loss on the answer only); None when one has no answer token."""
    sides = [encode_example(Example(id="", messages=messages + [{"role": "assistant", "content": answer}]), tokenizer,
                            recipe.data.max_length, recipe.data.system_prompt) for answer in (chosen, rejected)]
    return None if sides[0] is None or sides[1] is None else (sides[0], sides[1])


def build_pairs(recipe: Recipe, *, progress: bool = True, stop_after: Optional[int] = None) -> PairStats:
    """Build every planned pair not built yet (student answers and reference log-probs), batch by batch.

    `stop_after` ends the call after that many batches, as a kill would (a later call resumes).
    """
    spec = pairs_spec(recipe)
    check_pairs(recipe)
    recipe_examples(recipe)  # a malformed pairs or data file fails before any model loads
    tokenizer, student = reference_student(recipe)
    reference = weights_fingerprint(student)
    planned = planned_pairs(recipe, reference)
    directory = run_files(recipe).pairs
    done = latest_records(directory) if shard_paths(directory) else {}
    todo = [p for p in planned if p.id not in done]
    stats = PairStats(source=spec.source, planned=len(planned), existing=len(planned) - len(todo))
    writer = ShardWriter(directory, recipe.generate.shard_records)
    batches = range(0, len(todo), spec.batch_size)
    for number, first in enumerate(tqdm(batches, desc="pairs", disable=not progress or not todo, dynamic_ncols=True)):
        if stop_after is not None and number == stop_after:
            break
        records = _build_batch(recipe, tokenizer, student, todo[first:first + spec.batch_size], reference, stats)
        writer.append(records)
    log.info("pairs (%s): %d planned, %d already built, %d built now, dropped %s -> %s", spec.source, stats.planned,
             stats.existing, stats.built, stats.dropped or "none", directory)
    return stats


def _build_batch(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, student: PreTrainedModel,
                 batch: list[PlannedPair], reference: str, stats: PairStats) -> list[dict]:
    """The records of one batch of planned pairs: the student's answers where needed, then reference log-probs."""
    if any(p.rejected is None for p in batch):
        params = SamplingParams(max_new_tokens=_student_tokens(recipe), temperature=0.0, seed=recipe.seed)
        answers = generate_texts(student, tokenizer, [p.messages for p in batch], params=params)
        batch = [p if p.rejected is not None else PlannedPair(p.id, p.messages, p.chosen, a.text)
                 for p, a in zip(batch, answers)]
    records, items, kept = [], [], []
    for pair in batch:
        record = {"id": pair.id, "source": pairs_spec(recipe).source, "reference": reference,
                  "messages": pair.messages, "chosen": pair.chosen, "rejected": pair.rejected}
        reason = None
        if not (pair.rejected or "").strip():
            reason = "empty student answer"
        elif pair.chosen.strip() == pair.rejected.strip():
            reason = "student answer equals the chosen one"
        encoded = None if reason else encode_pair(recipe, tokenizer, pair.messages, pair.chosen, pair.rejected)
        if reason is None and encoded is None:
            reason = "no answer token within data.max_length"
        if reason is not None:
            stats.dropped[reason] = stats.dropped.get(reason, 0) + 1
            records.append({**record, "status": DROPPED, "reason": reason})
            continue
        items.append(PairItem(encoded[0], encoded[1], 0.0, 0.0))
        kept.append(record)
        records.append(record)
    if items:
        references = reference_log_probs(student, items, padding_id(tokenizer), recipe.method.chunk_size,
                                         pairs_spec(recipe).batch_size)
        for record, item, (ref_chosen, ref_rejected) in zip(kept, items, references):
            record.update(status=OK, ref_chosen=ref_chosen, ref_rejected=ref_rejected,
                          chosen_tokens=len(item.chosen.input_ids), rejected_tokens=len(item.rejected.input_ids))
        stats.built += len(items)
    return records


def pair_training_items(recipe: Recipe, student: PreTrainedModel,
                        tokenizer: PreTrainedTokenizerBase) -> list[PairItem]:
    """The built pairs the recipe trains on, encoded, with their stored reference log-probs (refused if missing).

    `student` is the starting student (before any LoRA adapter): the reference the pairs were built with.
    """
    planned = planned_pairs(recipe, weights_fingerprint(student))
    directory = run_files(recipe).pairs
    built = latest_records(directory) if shard_paths(directory) else {}
    missing = sum(p.id not in built for p in planned)
    if missing:
        raise DistillError(f"{directory}: {missing} of {len(planned)} planned pairs are not built for this student; "
                           "run `distill pairs RECIPE` (or `distill run`) first")
    reference_free = recipe.method.loss in REFERENCE_FREE
    items = []
    for pair in planned:
        record = built[pair.id]
        if record.get("status") != OK:
            continue
        encoded = encode_pair(recipe, tokenizer, record["messages"], record["chosen"], record["rejected"])
        if encoded is None or len(encoded[0].input_ids) != record["chosen_tokens"] \
                or len(encoded[1].input_ids) != record["rejected_tokens"]:
            raise DistillError(f"{directory}: pair {pair.id} encodes differently from when it was built; delete "
                               f"{directory} to rebuild the pairs")
        refs = (0.0, 0.0) if reference_free else (record["ref_chosen"], record["ref_rejected"])
        items.append(PairItem(encoded[0], encoded[1], *refs))
    if not items:
        raise DistillError(f"{directory}: no usable preference pairs (every planned pair was dropped)")
    return items
