"""The pairs stage: preference pairs for method.kind: dpo, with the reference model's log-probs computed once.

Pairs come from a ready file (data.pairs), are made teacher_vs_student: chosen = the teacher's answer to a prompt
(its teacher data), rejected = the starting student's greedy answer to the same prompt, or are judged: several
sampled answers to each prompt (teacher, student or both), best vs worst by the pairwise judge or the final-number
check (ties and unreadable verdicts kept as dropped records). Either way only the training split's pairs are
built (the held-out split's chosen answers are eval text). Each pair is a record in append-only, fsynced shards
under <run>/pairs/, content-addressed by its prompt and answers (or the teacher answer it starts from, or the
sampling and scoring settings), the reference student's weights and the encoding settings, so a killed run
resumes with nothing lost or duplicated and a changed student or recipe never mixes its pairs with old ones. The
reference is the starting student (adapter-free when training with LoRA); training reads its log-probs from the
records. With a `filter` section the built pairs pass the filters that fit pairs (length, contamination, dedup)
before training.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.data.examples import read_pairs
from distill.data.filters import FilterResult, filter_pairs, format_filter_report, prompt_of, spec_eval_texts
from distill.data.layouts import Example, Messages
from distill.data.teacher_records import ShardWriter, latest_records, shard_paths
from distill.data.tokenize import EncodedExample, encode_example, padding_id
from distill.errors import DistillError
from distill.eval.best_worst import KEPT, TIE, UNPARSEABLE, Choice, judge_best_worst, verify_best_worst
from distill.eval.judge import DEFAULT_RUBRIC, Judge
from distill.losses.preference import REFERENCE_FREE
from distill.models import load_tokenizer
from distill.recipe import PairsSpec, Recipe
from distill.runtime import atomic_write_json
from distill.stages.data import chosen_example, recipe_examples
from distill.stages.facts import (
    judge_backend,
    load_teacher,
    model_source,
    run_files,
    teacher_backend,
    teacher_tokenizer,
)
from distill.stages.student import initial_student
from distill.teachers.backend import Completion, SamplingParams, TeacherBackend, as_judge
from distill.teachers.local import LocalBackend, generate_texts
from distill.training.preference import PairItem, reference_log_probs

log = logging.getLogger("distill")

OK, DROPPED = "ok", "dropped"  # a dropped record keeps a pair that cannot train (same answers, nothing to encode)
TOO_FEW = "fewer than 2 distinct answers"  # judged: the samples of a prompt were empty or all the same


@dataclass
class PlannedPair:
    """A pair the recipe asks for: its content address, prompt and answers (rejected None: the student writes it;
    both None: judged, from sampled answers)."""

    id: str
    messages: Messages
    chosen: Optional[str]
    rejected: Optional[str]
    answer: Optional[str] = None  # judged with the verifier: the prompt's reference answer


@dataclass
class PairStats:
    """What one run of the pairs stage did."""

    source: str
    planned: int = 0
    existing: int = 0  # already built by an earlier run
    built: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    failed: int = 0  # judged: prompts a served teacher did not answer (no record: the next run retries them)
    totals: dict[str, int] = field(default_factory=dict)  # every planned record on disk: "ok" or reason -> count
    filtered: dict[str, int] = field(default_factory=dict)  # built pairs the filter section drops: filter -> count


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
                           "pairs.source: teacher_vs_student or judged")
    if spec.source == "teacher_vs_student" and recipe.data.prompts is None:
        raise DistillError("pairs.source: teacher_vs_student needs data.prompts (the teacher's answers are chosen)")
    if spec.source == "judged" and recipe.data.prompts is None:
        raise DistillError("pairs.source: judged needs data.prompts (the prompts its sampled answers answer)")
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
    judged = pairs_spec(recipe).source == "judged"
    answers = _reference_answers(recipe) if judged and pairs_spec(recipe).scorer == "verifier" else {}
    planned = []
    for example in train_examples:
        messages = example.messages or []
        if not messages or messages[-1]["role"] != "assistant":
            continue  # plain text (data.train) has no prompt to answer
        if judged:
            answer = answers.get(example.id)
            content = {"judged": messages[:-1], "answer": answer, **_judged_identity(recipe)}
            planned.append(PlannedPair(_address(content, reference, recipe), messages[:-1], None, None, answer))
            continue
        content = {"teacher_answer": example.id, "messages": messages, "max_new_tokens": tokens}
        planned.append(PlannedPair(_address(content, reference, recipe), messages[:-1], messages[-1]["content"], None))
    return planned


def _reference_answers(recipe: Recipe) -> dict[str, Optional[str]]:
    """Each teacher record's known answer (`reference`: GSM8K's `#### N`), by record id: what the verifier checks."""
    records = latest_records(run_files(recipe).teacher_data)
    return {i: None if r.get("reference") is None else str(r["reference"]) for i, r in records.items()}


def _judged_identity(recipe: Recipe) -> dict:
    """What decides a judged pair besides its prompt: who samples how many answers how, and who scores them."""
    spec = pairs_spec(recipe)
    teacher = recipe.teacher.model if spec.sample_from != "student" else None
    sampler = {"from": spec.sample_from, "teacher": teacher, "temperature": spec.temperature,
               "max_new_tokens": _student_tokens(recipe), "seed": recipe.seed}
    scorer: dict = {"kind": spec.scorer}
    if spec.scorer == "judge":
        judge = spec.judge
        own = judge is not None and (judge.model is not None or judge.endpoint is not None)
        scorer.update(model=judge.model if own and judge.model else recipe.teacher.model,
                      endpoint=judge.endpoint if own else recipe.teacher.endpoint,
                      rubric=(judge.rubric if judge else None) or DEFAULT_RUBRIC,
                      max_new_tokens=judge.max_new_tokens if judge else 64)
    return {"sampler": sampler, "samples": spec.samples, "scorer": scorer}


def _student_tokens(recipe: Recipe) -> int:
    return pairs_spec(recipe).max_new_tokens or recipe.generate.max_new_tokens


def encode_pair(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, messages: Messages, chosen: str,
                rejected: str) -> Optional[tuple[EncodedExample, EncodedExample]]:
    """Both sides tokenized the way training reads them (loss on the answer only); None when one has no answer token."""
    sides = [encode_example(Example(id="", messages=messages + [{"role": "assistant", "content": answer}]), tokenizer,
                            recipe.data.max_length, recipe.data.system_prompt) for answer in (chosen, rejected)]
    return None if sides[0] is None or sides[1] is None else (sides[0], sides[1])


def build_pairs(recipe: Recipe, *, progress: bool = True, stop_after: Optional[int] = None,
                judge: Optional[Judge] = None) -> PairStats:
    """Build every planned pair not built yet (student answers and reference log-probs), batch by batch.

    `stop_after` ends the call after that many batches, as a kill would (a later call resumes). `judge` answers
    judge conversations for judged pairs instead of the recipe's judge (pairs.judge, else the teacher).
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
    helpers = _Helpers(recipe, judge)
    batches = range(0, len(todo), spec.batch_size)
    for number, first in enumerate(tqdm(batches, desc="pairs", disable=not progress or not todo, dynamic_ncols=True)):
        if stop_after is not None and number == stop_after:
            break
        records = _build_batch(recipe, tokenizer, student, todo[first:first + spec.batch_size], reference, stats,
                               helpers)
        writer.append(records)
    log.info("pairs (%s): %d planned, %d already built, %d built now, dropped %s -> %s", spec.source, stats.planned,
             stats.existing, stats.built, stats.dropped or "none", directory)
    _count_and_filter(recipe, planned, stats)
    return stats


def pair_counts(recipe: Recipe) -> dict:
    """What the pairs stage left on disk: pairs built ("built"), dropped by reason, and the filter section's
    kept count when it ran ("after_filter"); {} before any pair is built."""
    files = run_files(recipe)
    if not shard_paths(files.pairs):
        return {}
    tally = _tally(latest_records(files.pairs).values())
    counts: dict = {"built": tally.pop(OK, 0), "dropped": tally}
    if recipe.filter is not None and files.pairs_filter_report.is_file():
        counts["after_filter"] = json.loads(files.pairs_filter_report.read_text()).get("total_out")
    return counts


def _tally(records) -> dict[str, int]:
    """How many records are built ("ok") and how many were dropped for each reason."""
    counts: dict[str, int] = {}
    for record in records:
        key = OK if record.get("status") == OK else record.get("reason", DROPPED)
        counts[key] = counts.get(key, 0) + 1
    return counts


def _count_and_filter(recipe: Recipe, planned: list[PlannedPair], stats: PairStats) -> None:
    """Count every planned record on disk (judged: kept, ties, unparseable) and run the filter section over them."""
    directory = run_files(recipe).pairs
    built = latest_records(directory) if shard_paths(directory) else {}
    records = [built[p.id] for p in planned if p.id in built]
    stats.totals.update(_tally(records))
    if stats.source == "judged":
        log.info("pairs (judged, all runs): %d kept, %d ties, %d unparseable, %d other dropped of %d planned%s",
                 stats.totals.get(OK, 0), stats.totals.get(TIE, 0), stats.totals.get(UNPARSEABLE, 0),
                 len(records) - sum(stats.totals.get(k, 0) for k in (OK, TIE, UNPARSEABLE)), stats.planned,
                 f"; {stats.failed} prompt(s) not answered by the teacher (re-run to retry)" if stats.failed else "")
    if recipe.filter is not None:
        result = _filter_built(recipe, [r for r in records if r.get("status") == OK])
        stats.filtered = {s.name: s.rejected for s in result.filters if s.rejected}
        atomic_write_json(run_files(recipe).pairs_filter_report, result.report())
        log.info("pairs filter: kept %d of %d built pairs\n%s", result.total_out, result.total_in,
                 format_filter_report(result))


class _Helpers:
    """The judged pairs' teacher backend and judge, each made on first use (a finished build loads neither)."""

    def __init__(self, recipe: Recipe, judge: Optional[Judge]):
        self.recipe, self._teacher, self._judge = recipe, None, judge

    @property
    def teacher(self) -> TeacherBackend:
        """The recipe's teacher as a text generator (local, vLLM or served)."""
        if self._teacher is None:
            self._teacher = teacher_backend(self.recipe)
        return self._teacher

    @property
    def judge(self) -> Judge:
        """pairs.judge's model or server; else the teacher (the one already loaded for sampling, if any)."""
        if self._judge is None:
            spec = pairs_spec(self.recipe).judge
            loaded = self._teacher.model if isinstance(self._teacher, LocalBackend) else None
            backend = judge_backend(self.recipe, model=spec and spec.model, endpoint=spec and spec.endpoint,
                                    api_key_env=spec and spec.api_key_env, batch_size=spec.batch_size if spec else 8,
                                    loaded_teacher=loaded)
            self._judge = as_judge(backend, SamplingParams(max_new_tokens=spec.max_new_tokens if spec else 64))
        return self._judge


def _filter_built(recipe: Recipe, records: list[dict]) -> FilterResult:
    """The filter section's pair filters over built pairs, in planned order (the dedup filters keep the first)."""
    views = [{"id": r["id"], "prompt": prompt_of(r), "chosen": r["chosen"], "rejected": r["rejected"]}
             for r in records]
    return filter_pairs(views, recipe.filter, eval_texts=spec_eval_texts(recipe.filter, recipe.base_dir))


def _build_batch(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, student: PreTrainedModel,
                 batch: list[PlannedPair], reference: str, stats: PairStats, helpers: _Helpers) -> list[dict]:
    """The records of one batch of planned pairs: the student's answers where needed, then reference log-probs."""
    extras: list[dict] = [{} for _ in batch]
    if pairs_spec(recipe).source == "judged":
        batch, extras = _judged_batch(recipe, tokenizer, student, batch, helpers, stats)
    elif any(p.rejected is None for p in batch):
        params = SamplingParams(max_new_tokens=_student_tokens(recipe), temperature=0.0, seed=recipe.seed)
        answers = generate_texts(student, tokenizer, [p.messages for p in batch], params=params)
        batch = [p if p.rejected is not None else PlannedPair(p.id, p.messages, p.chosen, a.text)
                 for p, a in zip(batch, answers)]
    records, items, kept = [], [], []
    for pair, extra in zip(batch, extras):
        record = {"id": pair.id, "source": pairs_spec(recipe).source, "reference": reference,
                  "messages": pair.messages, "chosen": pair.chosen, "rejected": pair.rejected, **extra}
        reason = record.pop("drop", None) or _unusable(pair)
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


def _unusable(pair: PlannedPair) -> Optional[str]:
    """Why a pair with both answers cannot train (an empty or repeated answer), or None."""
    if not (pair.rejected or "").strip():
        return "empty student answer"
    if pair.chosen.strip() == pair.rejected.strip():
        return "student answer equals the chosen one"
    return None


def _judged_batch(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase, student: PreTrainedModel, batch: list[PlannedPair],
    helpers: _Helpers, stats: PairStats,
) -> tuple[list[PlannedPair], list[dict]]:
    """Sample the batch's answers, score them, and fill each pair's chosen/rejected (or a "drop" reason).

    A prompt that a served teacher failed to answer gets no record (the next run retries it); the rest carry
    their distinct answers, who wrote each and its score.
    """
    spec = pairs_spec(recipe)
    sampled = _sample_answers(recipe, tokenizer, student, [p.messages for p in batch], helpers)
    answered = [(p, s) for p, s in zip(batch, sampled) if s is not None]
    stats.failed += len(batch) - len(answered)
    candidates = [_distinct(s) for _, s in answered]
    texts = [[text for _, text in c] for c in candidates]
    if spec.scorer == "verifier":
        choices = verify_best_worst(texts, [p.answer for p, _ in answered])
    else:
        to_judge = [i for i, t in enumerate(texts) if len(t) >= 2]
        judged = judge_best_worst(helpers.judge, [answered[i][0].messages[-1]["content"] for i in to_judge],
                                  [texts[i] for i in to_judge], spec.judge and spec.judge.rubric,
                                  batch_size=spec.judge.batch_size if spec.judge else 8)
        choices = [Choice(TIE, scores=[None] * len(t)) for t in texts]
        for i, choice in zip(to_judge, judged):
            choices[i] = choice
    pairs, extras = [], []
    for (pair, _), found, choice in zip(answered, candidates, choices):
        extra = {"samples": [{"from": who, "text": text} for who, text in found], "scores": choice.scores}
        if len(found) < 2:
            extra["drop"] = TOO_FEW
        elif choice.outcome != KEPT:
            extra["drop"] = choice.outcome
        else:
            pair = replace(pair, chosen=found[choice.chosen][1], rejected=found[choice.rejected][1])
        pairs.append(pair)
        extras.append(extra)
    return pairs, extras


def _sample_answers(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, student: PreTrainedModel,
                    conversations: list[Messages], helpers: _Helpers) -> list[Optional[list[tuple[str, str]]]]:
    """pairs.samples answers to each conversation from each sampler, as (who, text); None where a request failed."""
    spec = pairs_spec(recipe)
    base = SamplingParams(max_new_tokens=_student_tokens(recipe), temperature=spec.temperature, seed=recipe.seed)
    out: list[Optional[list[tuple[str, str]]]] = [[] for _ in conversations]
    samplers = ("teacher", "student") if spec.sample_from == "both" else (spec.sample_from,)
    whos = [who for who in samplers for _ in range(spec.samples)]
    for number, who in enumerate(whos):
        params = replace(base, seed=base.seed + number)  # each sample of a prompt draws with its own seed
        if who == "student":
            results = generate_texts(student, tokenizer, conversations, params=params)
        else:
            results = helpers.teacher.generate(conversations, params)
        for row, result in enumerate(results):
            if out[row] is not None:
                out[row] = out[row] + [(who, result.text)] if isinstance(result, Completion) else None
    return out


def _distinct(samples: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The non-empty answers, each text once (the first sampler that wrote it), in sample order."""
    seen, kept = set(), []
    for who, text in samples:
        if text.strip() and text.strip() not in seen:
            seen.add(text.strip())
            kept.append((who, text))
    return kept


def built_records(recipe: Recipe, planned_ids: list[str], noun: str) -> dict[str, dict]:
    """The records in <run>/pairs/ by id; refused with one line while any planned id is not built yet."""
    directory = run_files(recipe).pairs
    built = latest_records(directory) if shard_paths(directory) else {}
    missing = sum(i not in built for i in planned_ids)
    if missing:
        raise DistillError(f"{directory}: {missing} of {len(planned_ids)} planned {noun} are not built for this "
                           "student; run `distill pairs RECIPE` (or `distill run`) first")
    return built


def pair_training_items(recipe: Recipe, student: PreTrainedModel,
                        tokenizer: PreTrainedTokenizerBase) -> list[PairItem]:
    """The built pairs the recipe trains on, encoded, with their stored reference log-probs (refused if missing).

    `student` is the starting student (before any LoRA adapter): the reference the pairs were built with.
    """
    planned = planned_pairs(recipe, weights_fingerprint(student))
    directory = run_files(recipe).pairs
    built = built_records(recipe, [p.id for p in planned], "pairs")
    reference_free = recipe.method.loss in REFERENCE_FREE
    records = [built[p.id] for p in planned if built[p.id].get("status") == OK]
    if recipe.filter is not None:  # the same filtering build_pairs reported
        kept = {r["id"] for r in _filter_built(recipe, records).kept}
        records = [r for r in records if r["id"] in kept]
    items = []
    for record in records:
        encoded = encode_pair(recipe, tokenizer, record["messages"], record["chosen"], record["rejected"])
        if encoded is None or len(encoded[0].input_ids) != record["chosen_tokens"] \
                or len(encoded[1].input_ids) != record["rejected_tokens"]:
            raise DistillError(f"{directory}: pair {record['id']} encodes differently from when it was built; delete "
                               f"{directory} to rebuild the pairs")
        refs = (0.0, 0.0) if reference_free else (record["ref_chosen"], record["ref_rejected"])
        items.append(PairItem(encoded[0], encoded[1], *refs))
    if not items:
        raise DistillError(f"{directory}: no usable preference pairs (every planned pair was dropped or filtered)")
    return items
