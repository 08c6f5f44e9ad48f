"""distill.answers: the one final-answer reader of the verify filter and exact-match scoring, on a table of
hand-written inputs, real GSM8K answers, and agreement between its two users."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED, require_shared

from distill.answers import ANSWER_PATTERNS, extract_answer, normalize_number
from distill.data.filters import FILTER_ORDER, filter_records
from distill.recipe import FilterSpec
from distill.eval.scorers import exact_match

GSM8K = SHARED / "data" / "gsm8k" / "train.jsonl"

# (text, extract_answer(text) with the default gsm8k pattern); the comments give the reason for each value.
TABLE = [
    ("#### 72", "72"),
    ("#### 1,234", "1234"),  # thousands commas dropped
    ("The answer is 72.", "72"),  # a trailing period ends the sentence, not the number
    ("\\boxed{72}", "72"),
    ("\\boxed{72} after 3 steps", "72"),  # the boxed answer beats a later number
    ("\\boxed{72} then #### 5", "5"),  # the marker beats a box
    ("$1,234.50", "1234.5"),
    ("10-12", None),  # a range (or a subtraction) is ambiguous: no answer, not 12 or -12
    ("#### 10-12", None),  # the same after the marker
    ("-5", "-5"),
    ("x = -3.", "-3"),
    ("COVID-19", "19"),  # a '-' after a letter is a hyphen, not a sign
    ("3/4", None),  # a fraction is not its denominator
    ("\\boxed{\\frac{3}{4}}", None),
    ("10:30", None),  # a time or ratio
    ("1,23", None),  # commas not in groups of three: a list or a decimal comma, ambiguous
    ("1,2345", None),
    ("#### 1,23", None),
    ("1.2.3", None),
    ("values 1, 2, 3", "3"),  # commas then spaces separate a list
    ("72 apples", "72"),
    ("72%", "72"),
    ("Answer: 72", "72"),
    ("She had 5, bought 12 more and gave away 3; 14 are left", "14"),  # several numbers: the last
    ("#### 7\nThen 9 more.", "7"),  # the first number after the marker
    ("", None),
    ("#### ", None),
    ("48 + 24 = 72\n#### none", None),  # a marker without a number is no answer: no fallback to 72
    ("#### 7 ####", None),  # the last marker counts
    ("\u22125", "-5"),  # U+2212 MINUS SIGN
    ("It is 72.", "72"),
    ("0.50", "0.5"),
    ("0.5", "0.5"),
    (".5", "0.5"),
    ("1e3", "1000"),
    ("#### $ 5", "5"),
    ("#### -0.0", "0"),
]


@pytest.mark.parametrize(("text", "expected"), TABLE)
def test_extract_answer_table(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "pattern", "expected"),
    [("#### 12\nanswer 13", "last_number", "13"), ("\\boxed{7} and 8", "last_number", "8"),
     ("\\boxed{7} and 8", "gsm8k", "7"), ("\n 1,23 \nx", "first_line", "1,23")],
)
def test_patterns(text, pattern, expected):
    assert extract_answer(text, pattern) == expected


def test_unknown_pattern_is_an_error():
    with pytest.raises(ValueError, match="unknown answer pattern 'regex'"):
        extract_answer("1", "regex")
    assert ANSWER_PATTERNS == ("gsm8k", "last_number", "first_line")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("72", "72"), (" $1,234.50 ", "1234.5"), ("0.50", "0.5"), ("0.5", "0.5"), ("72.", "72"), ("-0", "0"),
     ("\u22125", "-5"), ("+5", "5"), ("1e3", "1000"), ("1E-2", "0.01"), ("1,23", None), ("1,000,00", None),
     ("10-12", None), ("3/4", None), ("72 apples", None), ("", None), ("nan", None), ("inf", None),
     ("1e61", "1E+61"), ("1e99999999999999999999", None)],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_normalize_number_is_exact_beyond_28_digits():
    # decimal's default context rounds to 28 digits, which made these two equal
    a, b = "1234567890123456789012345678901", "1234567890123456789012345678902"
    assert normalize_number(a) == a and normalize_number(b) == b
    assert normalize_number("1" + "0" * 60) == "1" + "0" * 60  # written out up to 10^60


def test_real_gsm8k_answers_give_their_gold_number():
    rows = [json.loads(line) for line in require_shared(GSM8K).read_text().splitlines()]
    for row in rows:
        gold = row["answer"].rsplit("####", 1)[1].strip()
        assert extract_answer(row["answer"]) == str(int(gold.replace(",", ""))), row["answer"][-80:]
    assert len(rows) > 7000


@pytest.mark.parametrize(
    ("response", "reference"),
    [("So 72.", "#### 72"), ("So 72.0 clips", "72"), ("#### 1,234", "1234"), ("10-12", "#### 12"),
     ("\u22125 degrees", "#### -5"), ("5 degrees", "#### -5"), ("It is 3/4", "#### 4"), ("\\boxed{8}", "8"),
     ("the answer is 1,23", "123"), ("1e3", "#### 1,000")],
)
def test_verify_filter_and_exact_match_agree(response, reference):
    """The filter keeps an answer exactly when exact match scores it right: one metric, one reader."""
    records = [{"id": "r", "response": response, "reference": reference, "status": "ok"}]
    spec = FilterSpec.model_validate({name: name == "verify" for name in FILTER_ORDER})
    kept = bool(filter_records(records, spec).kept)
    assert kept == exact_match(extract_answer(response), extract_answer(reference))


def test_imports_only_the_standard_library():
    """data.filters and eval.scorers both read it: it must not pull in torch (or anything outside the stdlib)."""
    path = Path(__file__).parents[1] / "src" / "distill" / "answers.py"
    code = ("import importlib.util, json, sys; before = set(sys.modules); "
            f"spec = importlib.util.spec_from_file_location('answers', {str(path)!r}); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    imported = set(json.loads(out))
    assert "decimal" in imported  # it did import something, so the check below means something
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
