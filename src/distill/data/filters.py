"""Filters for teacher-written data (`distill filter`): quality checks, answer verification, contamination,
exact and near-duplicate removal, and an optional LLM judge, applied in a fixed order with a report."""
from __future__ import annotations

import gc
import hashlib
import json
import re
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

from distill.answers import extract_answer
from distill.data.contamination import NgramIndex, load_eval_texts
from distill.data.minhash import MinHasher, near_duplicates
from distill.data.readers import Malformed, json_records
from distill.errors import DistillError
from distill.runtime import atomic_write_json, atomic_write_text

if TYPE_CHECKING:  # the filter section's settings, part of the recipe schema: read here, never built
    from distill.recipe import (
        FilterSpec,
        GarbledFilter,
        JudgeFilter,
        LengthFilter,
        NearDedupFilter,
        RefusalFilter,
        RepetitionFilter,
    )

Messages = list[dict[str, str]]
Judge = Callable[[list[Messages]], list[str]]  # conversations -> the judge model's replies

REFUSAL_PATTERNS = (  # lower case: they search the lower-cased answer
    r"\bas an ai\b",  # "As an AI language model", "As an AI assistant, I ..."
    r"\bas a (?:large )?language model\b",
    r"\bi(?: am|['’]m) (?:sorry|afraid),? but\b",
    r"\bi(?: cannot| can['’]t| can not| won['’]t| will not|(?: am|['’]m) (?:unable|not able) to)"
    r" (?:help(?: you)? with|assist|comply|fulfil|provide|engage in)",
    r"\bi must (?:decline|refuse)\b",
    r"\bi don['’]t have (?:personal )?(?:opinions|feelings|beliefs|emotions)\b",
    r"\b(?:openai|anthropic)['’]s (?:content|use|usage) polic",
)

FILTER_ORDER = ("truncated", "garbled", "length", "refusal", "repetition", "verify", "contamination",
                "exact_dedup", "near_dedup", "judge")
# What applies to preference pairs: the other filters would drop a pair for its rejected side's very faults.
PAIR_FILTER_ORDER = ("length", "contamination", "exact_dedup", "near_dedup")


# ---------------------------------------------------------------- results


@dataclass
class FilterStats:
    """What one filter did: records it looked at, how many it rejected, and a few of them."""

    name: str
    enabled: bool = True
    records_in: int = 0  # records that reached this filter
    checked: int = 0  # of those, the ones it could judge (verify: with a numeric reference; judge: all)
    rejected: int = 0
    seconds: float = 0.0
    examples: list[dict] = field(default_factory=list)  # up to 3: {"id", "reason", "snippet"}
    note: Optional[str] = None

    @property
    def pass_rate(self) -> Optional[float]:
        return (self.checked - self.rejected) / self.checked if self.checked else None

    def to_dict(self) -> dict:
        return {"name": self.name, "enabled": self.enabled, "records_in": self.records_in, "checked": self.checked,
                "rejected": self.rejected, "pass_rate": self.pass_rate, "seconds": round(self.seconds, 4),
                "examples": self.examples, "note": self.note}


@dataclass
class FilterResult:
    """The kept records (input order) and the report: per filter in order of application, and totals."""

    kept: list[dict]
    filters: list[FilterStats]
    total_in: int  # every record read, failed ones included
    failed: int  # status != "ok": counted, never kept
    seconds: float = 0.0

    @property
    def total_out(self) -> int:
        return len(self.kept)

    def report(self) -> dict:
        return {"total_in": self.total_in, "failed": self.failed, "total_out": self.total_out,
                "seconds": round(self.seconds, 3), "filters": [s.to_dict() for s in self.filters]}


@dataclass
class Verdicts:
    """One filter's answer for a list of records: a reason to reject each, or None to keep it."""

    reasons: list[Optional[str]]
    checked: Optional[int] = None  # records actually examined (default: all)
    note: Optional[str] = None


# ---------------------------------------------------------------- record access


def prompt_of(record: dict) -> str:
    """The prompt's user text: `prompt`, else the last user turn of `messages`."""
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in record.get("messages") or [] if m.get("role") == "user"]
    return users[-1] if users else ""


def _scoped_text(record: dict, scope: str) -> str:
    return record["response"] if scope == "response" else f"{prompt_of(record)}\n{record['response']}"


def _is_answered(record: Any, where: str) -> bool:
    """Whether a record is an answered one (status ok); raises DistillError on one that cannot be filtered."""
    if not isinstance(record, dict):
        raise DistillError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if record.get("status", "ok") != "ok":
        return False
    if not isinstance(record.get("response"), str):
        got = "missing" if "response" not in record else f"a {type(record['response']).__name__}"
        raise DistillError(f"{where}: 'response' must be a string ({got})")
    reference = record.get("reference")
    if reference is not None and not isinstance(reference, (str, int, float)):
        raise DistillError(f"{where}: 'reference' must be a string, number or null")
    return True


# ---------------------------------------------------------------- the cheap per-record checks

_NON_ALNUM = re.compile(r"[\W_]+")
_ASCII_SPACE = bytes(c for c in range(128) if chr(c).isspace())
_ASCII_NOT_ALNUM = bytes(c for c in range(128) if not chr(c).isalnum())
_FENCE = re.compile(r"^[ \t]*(?:```|~~~)", re.MULTILINE)
_HAS_ALNUM = re.compile(r"[^\W_]")


def check_truncated(records: list[dict]) -> Verdicts:
    return Verdicts(["cut off at max_new_tokens (finish_reason length)" if r.get("finish_reason") == "length"
                     else None for r in records])


def _visible_and_alnum(text: str) -> tuple[int, int]:
    """(non-space characters, letters and digits) of a text; bytes.translate counts ASCII text ~5x faster."""
    if text.isascii():
        data = text.encode("ascii")
        return len(data.translate(None, _ASCII_SPACE)), len(data.translate(None, _ASCII_NOT_ALNUM))
    return len("".join(text.split())), len(_NON_ALNUM.sub("", text))


def garbled_reason(text: str, spec: GarbledFilter) -> Optional[str]:
    """Why a text is empty or garbled, or None."""
    visible, alnum = _visible_and_alnum(text)
    if not visible:
        return "empty"
    bad = text.count("\ufffd")
    if bad > spec.max_replacement_chars:
        return f"{bad} replacement character(s) U+FFFD"
    ratio = alnum / visible
    if ratio < spec.min_alnum_ratio:
        return f"letters and digits are {ratio:.0%} of the text (< {spec.min_alnum_ratio:.0%})"
    if spec.code_fences and ("```" in text or "~~~" in text):
        fences = len(_FENCE.findall(text))
        if fences % 2:
            return f"unbalanced code fences ({fences} fence lines)"
    return None


def length_reason(text: str, spec: LengthFilter) -> Optional[str]:
    chars = len(text.strip())
    if chars < spec.min_chars or (spec.max_chars is not None and chars > spec.max_chars):
        return f"{chars} characters (bounds {spec.min_chars}..{spec.max_chars or 'none'})"
    count = len(text.split())
    if count < spec.min_words or (spec.max_words is not None and count > spec.max_words):
        return f"{count} words (bounds {spec.min_words}..{spec.max_words or 'none'})"
    return None


def _alternation(patterns: Iterable[str], flags: int = 0) -> Optional[re.Pattern]:
    patterns = list(patterns)
    return re.compile("|".join(f"(?:{p})" for p in patterns), flags) if patterns else None


def refusal_check(spec: RefusalFilter) -> Callable[[str], Optional[str]]:
    """A text's refusal/boilerplate reason, or None: the (lower-case) defaults search the lower-cased text, which
    is about twice as fast as a case-insensitive search; extra patterns search case-insensitively."""
    default = _alternation(REFUSAL_PATTERNS if spec.default_patterns else ())
    extra = _alternation(spec.extra_patterns, re.IGNORECASE)

    def reason(text: str) -> Optional[str]:
        found = (default and default.search(text.lower())) or (extra and extra.search(text))
        return f"refusal/boilerplate: {found.group(0)!r}" if found else None

    return reason


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The text's lower-cased, whitespace-split word n-grams, in order."""
    tokens = text.lower().split()
    return list(zip(*(tokens[i:] for i in range(n))))


def duplicate_ngram_ratio(text: str, n: int) -> float:
    """The share of the text's word n-grams that repeat an earlier one (0 for a text shorter than n words)."""
    grams = word_ngrams(text, n)
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def repetition_reason(text: str, spec: RepetitionFilter) -> Optional[str]:
    """Why a text loops (repeated n-grams, or one line repeated in a row), or None."""
    n, ratio = spec.ngram, duplicate_ngram_ratio(text, spec.ngram)
    if ratio > spec.max_duplicate_ngram_ratio:
        return f"{ratio:.0%} of word {n}-grams are repeats (> {spec.max_duplicate_ngram_ratio:.0%})"
    run, longest, previous = 0, 0, None
    for line in text.splitlines():
        line = line.strip()
        if not _HAS_ALNUM.search(line):
            continue  # blank lines and rules (---, }}) neither count nor break a run
        run = run + 1 if line == previous else 1
        longest, previous = max(longest, run), line
    if longest > spec.max_line_repeats:
        return f"one line repeated {longest} times in a row (> {spec.max_line_repeats})"
    return None


def _per_response(reason: Callable[[str], Optional[str]]) -> Callable[[list[dict]], Verdicts]:
    return lambda records: Verdicts([reason(r["response"]) for r in records])


# ---------------------------------------------------------------- answer verification


def check_answers(records: list[dict]) -> Verdicts:
    """Reject answers whose final number (distill.answers.extract_answer) differs from the reference's."""
    reasons: list[Optional[str]] = []
    checked = unverifiable = 0
    for record in records:
        reference = record.get("reference")
        expected = extract_answer(str(reference)) if reference is not None else None
        if expected is None:
            unverifiable += reference is not None
            reasons.append(None)  # no known answer: passes untouched
            continue
        checked += 1
        got = extract_answer(record["response"])
        if got is None:
            reasons.append(f"no final number (reference {expected})")
        else:
            reasons.append(None if got == expected else f"answer {got} != reference {expected}")
    note = f"{unverifiable} reference(s) without a number were not checked" if unverifiable else None
    return Verdicts(reasons, checked, note)


# ---------------------------------------------------------------- contamination


class _Contamination:
    """Records sharing a word n-gram with any item of the named eval sets."""

    def __init__(self, eval_texts: dict[str, list[str]], n: int):
        self.names = [(name, i) for name, texts in eval_texts.items() for i in range(len(texts))]
        self.index = NgramIndex.from_texts([t for texts in eval_texts.values() for t in texts], n)

    def __call__(self, records: list[dict]) -> Verdicts:
        overlaps = self.index.overlaps_many([_scoped_text(r, "prompt_response") for r in records])
        return Verdicts([self._reason(items) if items else None for items in overlaps])

    def _reason(self, items: list[int]) -> str:
        name, i = self.names[items[0]]
        more = f" and {len(items) - 1} more item(s)" if len(items) > 1 else ""
        return f"shares a {self.index.n}-gram with {name}[{i}]{more}"


# ---------------------------------------------------------------- duplicates


def normalised_text(text: str) -> str:
    """Text as exact deduplication compares it: NFKC, lower case, runs of whitespace as one space."""
    text = text if text.isascii() else unicodedata.normalize("NFKC", text)  # ASCII is already NFKC
    return " ".join(text.lower().split())


def check_exact_duplicates(records: list[dict], scope: str) -> Verdicts:
    first_at: dict[bytes, int] = {}
    reasons: list[Optional[str]] = []
    for index, record in enumerate(records):
        key = hashlib.blake2b(normalised_text(_scoped_text(record, scope)).encode("utf-8"), digest_size=16).digest()
        at = first_at.setdefault(key, index)
        reasons.append(None if at == index else f"same text as {_id(records[at])}")
    return Verdicts(reasons)


def check_near_duplicates(records: list[dict], spec: NearDedupFilter, scope: str) -> Verdicts:
    hasher = MinHasher(spec.num_perm, spec.shingle, spec.seed)
    signatures = hasher.signatures([_scoped_text(r, scope) for r in records])
    dropped = near_duplicates(signatures, spec.threshold)
    reasons: list[Optional[str]] = [None] * len(records)
    for j, (i, similarity) in dropped.items():
        reasons[j] = f"near-duplicate of {_id(records[i])} (Jaccard ~{similarity:.2f})"
    return Verdicts(reasons)


# ---------------------------------------------------------------- LLM judge

_SCORE = re.compile(r"score\W{0,3}(?:is|of|=|:)?\W{0,3}(\d+(?:\.\d+)?)", re.IGNORECASE)
_OUT_OF_TEN = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b", re.IGNORECASE)
_LEADING = re.compile(r"^\W*(\d+(?:\.\d+)?)\b")


def parse_score(reply: str) -> Optional[float]:
    """The 1-10 score in a judge's reply ('Score: 8', '**Score**: 7.5', '8/10', '9 out of 10', or a leading
    number); the last such mention wins; None when there is none in range."""
    for pattern in (_SCORE, _OUT_OF_TEN, _LEADING):
        found = pattern.findall(reply)
        if found:
            score = float(found[-1])
            return score if 1.0 <= score <= 10.0 else None
    return None


def judge_conversation(record: dict, rubric: str) -> Messages:
    """What the judge is asked about one record."""
    question = f"[Request]\n{prompt_of(record)}\n\n[Answer]\n{record['response']}\n\nScore the answer from 1 to 10."
    return [{"role": "system", "content": rubric}, {"role": "user", "content": question}]


def check_with_judge(records: list[dict], spec: JudgeFilter, judge: Judge) -> Verdicts:
    reasons: list[Optional[str]] = []
    scores: list[Optional[float]] = []
    for start in range(0, len(records), spec.batch_size):
        batch = records[start:start + spec.batch_size]
        replies = judge([judge_conversation(r, spec.rubric) for r in batch])
        if len(replies) != len(batch):
            raise DistillError(f"filter.judge: the judge returned {len(replies)} replies for {len(batch)} records")
        for reply in replies:
            score = parse_score(reply)
            scores.append(score)
            if score is None:
                reasons.append(None if spec.keep_unparsed else f"no score in the judge's reply: {_snippet(reply)!r}")
            else:
                reasons.append(None if score >= spec.threshold else f"judge score {score:g} < {spec.threshold:g}")
    if spec.best_per_prompt:
        reasons = _only_best_per_prompt(records, scores, reasons)
    return Verdicts(reasons)


def _only_best_per_prompt(records: list[dict], scores: list, reasons: list) -> list:
    """Among each prompt's surviving answers keep the highest-scored (the first of equals); reject the rest."""
    best: dict[str, int] = {}
    for i, record in enumerate(records):
        if reasons[i] is None:
            key, score = str(record.get("prompt_id", record.get("prompt"))), scores[i] or 0.0
            if key not in best or score > (scores[best[key]] or 0.0):
                best[key] = i
    winners = set(best.values())
    return [r if r is not None or i in winners else "judge: another answer to this prompt scored higher"
            for i, r in enumerate(reasons)]


# ---------------------------------------------------------------- the pipeline


def _id(record: dict) -> str:
    return str(record.get("id", "?"))


def _snippet(text: str, width: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."


def _build_filters(
    spec: FilterSpec, judge: Optional[Judge], eval_texts: Optional[dict[str, list[str]]]
) -> dict[str, Callable[[list[dict]], Verdicts]]:
    """The check of each enabled filter, by name."""
    scope = spec.dedup_scope
    checks: dict[str, Callable[[list[dict]], Verdicts]] = {
        "truncated": check_truncated,
        "garbled": _per_response(lambda t: garbled_reason(t, spec.garbled)),
        "length": _per_response(lambda t: length_reason(t, spec.length)),
        "refusal": _per_response(refusal_check(spec.refusal)),
        "repetition": _per_response(lambda t: repetition_reason(t, spec.repetition)),
        "verify": check_answers,
        "exact_dedup": lambda rs: check_exact_duplicates(rs, scope),
        "near_dedup": lambda rs: check_near_duplicates(rs, spec.near_dedup, scope),
    }
    checks["contamination"] = _contamination_check(spec, eval_texts)
    if spec.judge.enabled:
        if judge is None:
            raise DistillError("filter.judge is enabled but no judge model was given")
        checks["judge"] = lambda rs: check_with_judge(rs, spec.judge, judge)
    return checks


def _contamination_check(
    spec: FilterSpec, eval_texts: Optional[dict[str, list[str]]]
) -> Callable[[list[dict]], Verdicts]:
    if spec.contamination.enabled and eval_texts and any(eval_texts.values()):
        return _Contamination(eval_texts, spec.contamination.n)
    return lambda rs: Verdicts([None] * len(rs), 0, "no eval files given")


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cycle collector: reading and filtering allocate millions of objects, and each full
    collection re-scans every live record (about half the reading time at 100k records). Nothing here makes
    reference cycles; the judge, which runs a model, keeps the collector."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _run_filters(
    records: list[dict], total_in: int, spec: FilterSpec,
    checks: dict[str, Callable[[list[dict]], Verdicts]], started: float, order: tuple[str, ...] = FILTER_ORDER,
) -> FilterResult:
    failed = total_in - len(records)
    stats = []
    for name in order:
        if not getattr(spec, name).enabled:
            stats.append(FilterStats(name, enabled=False))
            continue
        start = time.perf_counter()
        if name == "judge":
            verdicts = checks[name](records)
        else:
            with _collector_paused():
                verdicts = checks[name](records)
        stat = FilterStats(name, records_in=len(records), note=verdicts.note,
                           checked=len(records) if verdicts.checked is None else verdicts.checked)
        survivors = []
        for record, reason in zip(records, verdicts.reasons, strict=True):
            if reason is None:
                survivors.append(record)
                continue
            stat.rejected += 1
            if len(stat.examples) < 3:
                stat.examples.append({"id": _id(record), "reason": reason, "snippet": _snippet(record["response"])})
        stat.seconds = time.perf_counter() - start
        stats.append(stat)
        records = survivors
    return FilterResult(records, stats, total_in, failed, time.perf_counter() - started)


def filter_records(
    records: Iterable[dict], spec: FilterSpec, *, judge: Optional[Judge] = None,
    eval_texts: Optional[dict[str, list[str]]] = None,
) -> FilterResult:
    """Apply the enabled filters in order (FILTER_ORDER) to the answered records; failed ones are only counted."""
    started = time.perf_counter()
    with _collector_paused():
        answered, total = _answered((f"record {i + 1}", r) for i, r in enumerate(records))
    return _run_filters(answered, total, spec, _build_filters(spec, judge, eval_texts), started)


def _answered(located: Iterable[tuple[str, Any]]) -> tuple[list[dict], int]:
    """The answered records among (where, record) pairs, and how many records there were in all."""
    answered, total = [], 0
    for where, record in located:
        total += 1
        if _is_answered(record, where):
            answered.append(record)
    return answered, total


def report_path(out_path: str | Path) -> Path:
    """Where filter_file writes its report: `<out>.report.json`."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".report.json")


def filter_file(
    in_path: str | Path, out_path: str | Path, spec: FilterSpec, *, judge: Optional[Judge] = None,
    eval_texts: Optional[dict[str, list[str]]] = None, base_dir: str | Path | None = None,
) -> FilterResult:
    """Filter a teacher-records JSONL file into out_path (atomically) and write `<out>.report.json` beside it.

    Without `eval_texts`, the spec's contamination.eval_files are read (relative paths against base_dir).
    """
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise DistillError(f"{in_path}: file not found")
    if in_path.resolve() == out_path.resolve():
        raise DistillError(f"{out_path}: the output would overwrite the input; choose another --out")
    with _collector_paused():
        located = list(json_records(in_path))
    for where, record in located:
        if isinstance(record, Malformed):
            raise DistillError(f"{where}: {record}")
    return filter_to_file(located, out_path, spec, source=str(in_path), judge=judge, eval_texts=eval_texts,
                          base_dir=base_dir)


def filter_to_file(
    located: list[tuple[str, Any]], out_path: str | Path, spec: FilterSpec, *, source: str, judge: Optional[Judge] = None,
    eval_texts: Optional[dict[str, list[str]]] = None, base_dir: str | Path | None = None,
) -> FilterResult:
    """Filter (where, record) pairs into out_path (atomically) and write `<out>.report.json` beside it."""
    out_path = Path(out_path)
    if eval_texts is None:
        eval_texts = spec_eval_texts(spec, base_dir)
    started = time.perf_counter()
    with _collector_paused():
        answered, total = _answered(located)
    result = _run_filters(answered, total, spec, _build_filters(spec, judge, eval_texts), started)
    atomic_write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.kept))
    report = {"input": source, "output": str(out_path), **result.report(), "spec": spec.model_dump(mode="json")}
    atomic_write_json(report_path(out_path), report)
    return result


def spec_eval_texts(spec: FilterSpec, base_dir: str | Path | None = None) -> Optional[dict[str, list[str]]]:
    """The eval sets of filter.contamination.eval_files (relative paths against base_dir); None when not checked."""
    if not (spec.contamination.enabled and spec.contamination.eval_files):
        return None
    base = Path(base_dir or ".")
    return load_eval_texts(p if Path(p).is_absolute() else base / p for p in spec.contamination.eval_files)


def _pair_length(spec: LengthFilter) -> Callable[[list[dict]], Verdicts]:
    """The length bounds on each side of a pair: either side outside them drops the pair."""
    def side_reason(record: dict) -> Optional[str]:
        for side in ("chosen", "rejected"):
            reason = length_reason(record[side], spec)
            if reason is not None:
                return f"{side}: {reason}"
        return None

    return lambda records: Verdicts([side_reason(r) for r in records])


def filter_pairs(
    pairs: Iterable[dict], spec: FilterSpec, *, eval_texts: Optional[dict[str, list[str]]] = None,
) -> FilterResult:
    """Apply the filters that fit preference pairs (PAIR_FILTER_ORDER) to {id, prompt, chosen, rejected} records.

    Length bounds each answer; contamination checks the prompt and both answers; the dedup filters compare
    `prompt + chosen + rejected` (dedup_scope prompt_response) or the two answers (response), keeping the first.
    """
    started = time.perf_counter()
    records = [{**p, "response": f"{p['chosen']}\n{p['rejected']}"} for p in pairs]
    scope = spec.dedup_scope
    checks = {"length": _pair_length(spec.length), "contamination": _contamination_check(spec, eval_texts),
              "exact_dedup": lambda rs: check_exact_duplicates(rs, scope),
              "near_dedup": lambda rs: check_near_duplicates(rs, spec.near_dedup, scope)}
    with _collector_paused():
        result = _run_filters(records, len(records), spec, checks, started, PAIR_FILTER_ORDER)
    result.kept = [{k: v for k, v in r.items() if k != "response"} for r in result.kept]
    return result


def format_filter_report(result: FilterResult) -> str:
    """The report as a terminal table, then a few rejected examples per filter."""
    lines = [f"{'filter':<14}{'checked':>9}{'rejected':>10}{'pass':>9}{'seconds':>9}"]
    for s in result.filters:
        if not s.enabled:
            lines.append(f"{s.name:<14}{'off':>9}")
            continue
        rate = "-" if s.pass_rate is None else f"{s.pass_rate:.1%}"
        note = f"  ({s.note})" if s.note else ""
        lines.append(f"{s.name:<14}{s.checked:>9}{s.rejected:>10}{rate:>9}{s.seconds:>9.2f}{note}")
    answered = result.total_in - result.failed
    share = f" ({result.total_out / answered:.1%} of answered)" if answered else ""
    lines.append(f"{result.total_in} records read, {result.failed} failed (not kept), "
                 f"{result.total_out} kept{share} in {result.seconds:.1f}s")
    for s in result.filters:
        for example in s.examples:
            lines.append(f"  {s.name} {example['id']}: {example['reason']} | {example['snippet']}")
    return "\n".join(lines)
