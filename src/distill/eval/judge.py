"""Pairwise LLM-as-judge: answer A (student) vs answer B (teacher), asked in both orders to cancel position bias."""
from __future__ import annotations

import re
from typing import Callable

Messages = list[dict[str, str]]
Judge = Callable[[list[Messages]], list[str]]  # a batch of conversations -> one reply text each

DEFAULT_RUBRIC = "Decide which answer is more helpful, correct and clear for the question."
JUDGE_TEMPLATE = """You are an impartial judge. Compare two answers to the same question.

[Question]
{prompt}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

{rubric} Do not let the order of the answers or their length sway you.
Give a one-sentence reason, then end with a last line that is exactly one of:
Verdict: A
Verdict: B
Verdict: tie"""

VERDICTS = ("A", "B", "tie")
_FLIP = {"A": "B", "B": "A", "tie": "tie"}
_WORD = {"a": "A", "b": "B", "tie": "tie", "c": "tie", "draw": "tie", "equal": "tie"}
# "Verdict: A", "**Verdict**: [B]", "verdict: Answer B"; A and B in capitals, so "verdict: a tie" is a tie
_MARKED = re.compile(r"(?i:verdict)\W{0,5}(?:(?i:answer|response)\s+)?(A|B|(?i:tie))\b")
_BRACKETED = re.compile(r"\[\[\s*(a|b|c|tie)\s*\]\]", re.IGNORECASE)  # MT-Bench style "[[A]]", "[[C]]" = tie
_BETTER = re.compile(r"\b(?:answer|response|assistant|output)\s+(A|B)\s+is\s+(?:better|superior)", re.IGNORECASE)
_TIE = re.compile(r"\b(?:tie|draw|equally good|equally bad)\b", re.IGNORECASE)


def judge_prompt(prompt: str, answer_a: str, answer_b: str, rubric: str | None = None) -> Messages:
    """The conversation that asks the judge to compare answer_a (shown as A) with answer_b (shown as B)."""
    text = JUDGE_TEMPLATE.format(prompt=prompt, answer_a=answer_a, answer_b=answer_b, rubric=rubric or DEFAULT_RUBRIC)
    return [{"role": "user", "content": text}]


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "tie" from a judge's reply; None when it names no verdict (or contradicts itself)."""
    for pattern in (_MARKED, _BRACKETED):
        found = pattern.findall(text)
        if found:
            return _WORD[found[-1].lower()]  # the last one: judges restate the format before answering
    bare = text.strip().strip("*_`'\"[]().:! \n").lower()
    if bare in _WORD:
        return _WORD[bare]
    better = {letter.upper() for letter in _BETTER.findall(text)}
    if len(better) == 1:
        return better.pop()
    if not better and _TIE.search(text):
        return "tie"
    return None


def _outcome(first: str | None, second: str | None) -> str:
    """The item's result for A from its verdicts in both orders (second already mapped back to A/B)."""
    if first is None or second is None:
        return "unparseable"
    if first == second == "A":
        return "win"
    if first == second == "B":
        return "loss"
    return "tie"  # both tie, or the orders disagree: position, not quality, decided


def _ask(judge: Judge, conversations: list[Messages], batch_size: int) -> list[str]:
    replies: list[str] = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        answers = list(judge(chunk))
        if len(answers) != len(chunk):
            raise ValueError(f"pairwise_judge: the judge returned {len(answers)} replies for {len(chunk)} prompts")
        replies += answers
    return replies


def _rate(count: int, total: int) -> float | None:
    return count / total if total else None


def pairwise_judge(
    judge: Judge, items: list[dict], rubric: str | None = None, *, batch_size: int = 16
) -> dict:
    """Judge answer_a against answer_b for each {prompt, answer_a, answer_b}, once in each order.

    A counts as winning (or losing) an item only when both orders agree; disagreement or two ties make a
    tie. Items with an unparseable reply in either order are counted apart and left out of the rates.
    """
    conversations = []
    for item in items:
        conversations.append(judge_prompt(item["prompt"], item["answer_a"], item["answer_b"], rubric))
        conversations.append(judge_prompt(item["prompt"], item["answer_b"], item["answer_a"], rubric))
    replies = _ask(judge, conversations, batch_size)
    results = []
    for i, item in enumerate(items):
        first = parse_verdict(replies[2 * i])
        swapped = parse_verdict(replies[2 * i + 1])
        second = None if swapped is None else _FLIP[swapped]  # B in the swapped order is answer_a
        results.append({**item, "verdicts": [first, second], "replies": replies[2 * i: 2 * i + 2],
                        "outcome": _outcome(first, second)})
    counts = {key: sum(r["outcome"] == key for r in results) for key in ("win", "loss", "tie", "unparseable")}
    judged = len(items) - counts["unparseable"]
    return {
        "wins": counts["win"],
        "losses": counts["loss"],
        "ties": counts["tie"],
        "unparseable": counts["unparseable"],
        "n": len(items),
        "judged": judged,
        "win_rate": _rate(counts["win"], judged),
        "loss_rate": _rate(counts["loss"], judged),
        "tie_rate": _rate(counts["tie"], judged),
        "template": JUDGE_TEMPLATE,
        "rubric": rubric or DEFAULT_RUBRIC,
        "items": results,
    }
