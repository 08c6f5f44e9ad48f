"""Final answers, GSM8K style: one reader for the verify filter (rejection sampling) and exact-match scoring.

Only the standard library: distill.data.filters and distill.eval.scorers both import it.

The rules, chosen so that a grader does not accept a wrong answer (see docs/eval.md, "Exact match"):
- `gsm8k`: the first number after the last `####`; without `####`, the first number in the last `\\boxed{}`;
  otherwise the last number in the text. A marker with no number after it is no answer (no fallback).
- A number is `-5`, `−5` (U+2212), `72`, `1,234.50` (commas only between groups of three digits), `.5`, `1e3`;
  `$` is ignored. A `-` right after a letter, digit or `)` is a hyphen or an operator, not a sign.
- An ambiguous number is no answer (None), not a guess: bad comma groups (`1,23`, `1,2345`), more than one
  point (`1.2.3`), or a number written against another by `- – / : ^ * × ÷ +` (`10-12`, `3/4`, `10:30`).
"""
from __future__ import annotations

import re
from collections import deque
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal

ANSWER_PATTERNS = ("gsm8k", "last_number", "first_line")

# A candidate: a sign, a leading point, digits, commas and points ending in a digit, an exponent (1e3; not the
# "e5" of "4e5f"). No lookbehinds: they made scanning twice as slow; _number_at checks what precedes.
_CANDIDATE = re.compile(r"-?\.?\d(?:[\d,.]*\d)?(?:[eE][-+]?\d+(?!\w))?")
_HYPHEN_BEFORE = re.compile(r"[\w)]")  # a '-' after one of these is a hyphen or minus, not a sign
_POINT_BEFORE = re.compile(r"[\w.]")  # a '.' after one of these is not a leading point (x.5, 1..5)
# A number as people write it: commas only between groups of three digits, at most one point.
_WELL_FORMED = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")
_JOINERS = "-–/:^*×÷+"  # a number written against another by one of these is a range, ratio or expression
_JOINED_BEFORE = re.compile(rf"\d[{re.escape(_JOINERS)}]$")
_JOINED_AFTER = re.compile(rf"[{re.escape(_JOINERS)}]\d")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")  # \frac{3}{4} -> 3/4: a fraction, not 4
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_MARKER = "####"
_PLAIN_DIGITS = 60  # beyond 10^60 (or below 10^-60) a number is written 1E+99, not with 99 zeros


def _canonical(text: str) -> str:
    """Text as a number is compared: '$' dropped, U+2212 read as '-'."""
    return text.replace("$", "").replace("\u2212", "-")


def normalize_number(text: str) -> str | None:
    """A number in one canonical form (`$1,234.50` -> `1234.5`, `0.50` -> `0.5`, `1e3` -> `1000`); None when
    text is not exactly one well-formed number."""
    cleaned = _canonical(text).strip()
    cleaned = cleaned[:-1] if cleaned.endswith(".") else cleaned  # "5." ends a sentence
    if not any(c.isdigit() for c in cleaned) or not _WELL_FORMED.fullmatch(cleaned):
        return None
    try:
        value = Decimal(cleaned.replace(",", ""))
        if value == 0:
            return "0"  # not "-0" or "0.00"
        # Exact: normalize() would round to the default context's 28 digits.
        value = value.normalize(Context(prec=len(value.as_tuple().digits), Emax=MAX_EMAX, Emin=MIN_EMIN))
    except ArithmeticError:  # an exponent beyond what decimal holds
        return None
    if abs(value.adjusted()) > _PLAIN_DIGITS:
        return str(value)  # still one string per value; "f" would write every zero of 1e999999999
    return format(value, "f")  # "f": 100, not normalize()'s 1E+2


def _number_at(text: str, match: re.Match) -> str | None:
    """The normalised number of a candidate, or None when it is ambiguous (malformed or joined to another)."""
    (start, end), token = match.span(), match.group()
    if token[0] == "-" and start and _HYPHEN_BEFORE.match(text, start - 1):
        start, token = start + 1, token[1:]
    if token[0] == "." and start and _POINT_BEFORE.match(text, start - 1):
        start, token = start + 1, token[1:]
    if _JOINED_BEFORE.search(text[max(0, start - 2):start]) or _JOINED_AFTER.match(text, end):
        return None
    return normalize_number(token)


def _first_number(text: str) -> str | None:
    match = _CANDIDATE.search(text)
    return _number_at(text, match) if match else None


def _last_number(text: str) -> str | None:
    last = deque(_CANDIDATE.finditer(text), maxlen=1)
    return _number_at(text, last[0]) if last else None


def extract_answer(text: str, pattern: str = "gsm8k") -> str | None:
    """The normalised final answer in a text: `gsm8k` (`####`, else the last `\\boxed{}`, else the last number),
    `last_number`, or `first_line` (the first non-empty line, stripped); None when there is none."""
    if pattern == "first_line":
        return next((line.strip() for line in text.splitlines() if line.strip()), None)
    if pattern not in ANSWER_PATTERNS:
        raise ValueError(f"unknown answer pattern {pattern!r} (expected one of {', '.join(ANSWER_PATTERNS)})")
    text = _canonical(text)
    text = _FRAC.sub(r"\1/\2", text) if "frac{" in text else text
    if pattern == "gsm8k" and _MARKER in text:
        return _first_number(text.rsplit(_MARKER, 1)[1])
    boxed = _BOXED.findall(text) if pattern == "gsm8k" else []
    if boxed:
        return _first_number(boxed[-1])
    return _last_number(text)
