"""Best vs worst of several answers to one prompt: by the pairwise judge (both orders) or by the final-number check.

What judged preference pairs are made of: chosen = the best answer, rejected = the worst. A prompt whose answers
cannot be told apart (a tie) or whose verdicts cannot be read (unparseable) gives no pair; the caller counts them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Optional

from distill.answers import extract_answer
from distill.eval.judge import Judge, pairwise_judge

KEPT, TIE, UNPARSEABLE = "kept", "tie", "unparseable"


@dataclass
class Choice:
    """The outcome for one prompt: indices of the best and worst answers (None unless kept) and each one's score."""

    outcome: str  # KEPT, TIE or UNPARSEABLE
    chosen: Optional[int] = None
    rejected: Optional[int] = None
    scores: list[Optional[float]] = field(default_factory=list)


def _best_and_worst(scores: list[float]) -> tuple[int, int]:
    """The first answer with the top score and the first with the bottom one."""
    return scores.index(max(scores)), scores.index(min(scores))


def judge_best_worst(judge: Judge, prompts: list[str], answers: list[list[str]], rubric: Optional[str] = None, *,
                     batch_size: int = 16) -> list[Choice]:
    """Every two answers of a prompt compared by `judge` in both orders; best vs worst by wins minus losses.

    An answer's score counts only readable comparisons. The pair is kept only when its chosen answer beats its
    rejected one in both orders; the two tied (or disagreeing by order, or a cycle) make a TIE, and an unreadable
    verdict between them (or no readable verdict at all) makes it UNPARSEABLE.
    """
    items, owners = [], []
    for p, (prompt, texts) in enumerate(zip(prompts, answers, strict=True)):
        for i, j in combinations(range(len(texts)), 2):
            items.append({"prompt": prompt, "answer_a": texts[i], "answer_b": texts[j]})
            owners.append((p, i, j))
    results = pairwise_judge(judge, items, rubric, batch_size=batch_size)["items"] if items else []
    outcomes: list[dict[tuple[int, int], str]] = [{} for _ in prompts]
    for (p, i, j), result in zip(owners, results):
        outcomes[p][(i, j)] = result["outcome"]  # win / loss / tie for answer i, or unparseable
    return [_judged_choice(len(texts), found) for texts, found in zip(answers, outcomes)]


def _judged_choice(count: int, outcomes: dict[tuple[int, int], str]) -> Choice:
    """Best vs worst of `count` answers from their pairwise outcomes (win/loss/tie/unparseable for the first)."""
    if count < 2 or all(o == UNPARSEABLE for o in outcomes.values()):
        return Choice(UNPARSEABLE if outcomes else TIE, scores=[None] * count)
    scores = [0.0] * count
    for (i, j), outcome in outcomes.items():
        step = {"win": 1.0, "loss": -1.0}.get(outcome, 0.0)
        scores[i] += step
        scores[j] -= step
    best, worst = _best_and_worst(scores)
    if scores[best] == scores[worst]:
        return Choice(TIE, scores=scores)
    direct = outcomes[(min(best, worst), max(best, worst))]
    best_won = direct == ("win" if best < worst else "loss")
    if direct == UNPARSEABLE:
        return Choice(UNPARSEABLE, scores=scores)
    return Choice(KEPT, best, worst, scores) if best_won else Choice(TIE, scores=scores)


def verify_best_worst(answers: list[list[str]], references: list[Optional[str]]) -> list[Choice]:
    """Score 1 for an answer whose final number (distill.answers.extract_answer) is the reference's, else 0.

    The first right answer is chosen and the first wrong one rejected; all right or all wrong is a TIE, and a
    prompt whose reference has no final number is UNPARSEABLE (nothing to check against).
    """
    choices = []
    for texts, reference in zip(answers, references, strict=True):
        expected = None if reference is None else extract_answer(str(reference))
        if expected is None:
            choices.append(Choice(UNPARSEABLE, scores=[None] * len(texts)))
            continue
        scores = [1.0 if extract_answer(text) == expected else 0.0 for text in texts]
        best, worst = _best_and_worst(scores) if scores else (0, 0)
        kept = bool(scores) and scores[best] > scores[worst]
        choices.append(Choice(KEPT, best, worst, scores) if kept else Choice(TIE, scores=scores))
    return choices
