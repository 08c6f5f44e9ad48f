"""distill.eval.judge: verdict parsing, and position-swapped pairwise judging with scripted judges."""
from __future__ import annotations

import pytest

from distill.eval.judge import DEFAULT_RUBRIC, JUDGE_TEMPLATE, judge_prompt, pairwise_judge, parse_verdict

GOOD, BAD = "GOOD answer", "poor answer"


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("Verdict: A", "A"),
        ("A is more precise.\nVerdict: B", "B"),
        ("**Verdict:** [[B]]", "B"),
        ("verdict: tie", "tie"),
        ("Verdict: Answer A", "A"),
        ("The format is Verdict: A or Verdict: B.\nVerdict: A", "A"),  # the last verdict counts
        ("verdict: a tie", "tie"),  # a lowercase "a" is an article, not answer A
        ("[[C]]", "tie"),  # MT-Bench's tie
        ("B", "B"),
        ("**A**.", "A"),
        ("Answer B is better than answer A.", "B"),
        ("It is a tie.", "tie"),
        ("Both are equally good.", "tie"),
        ("Answer A is better. No, answer B is better.", None),  # contradicts itself
        ("I cannot decide.", None),
        ("", None),
    ],
)
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_judge_prompt_fills_the_template():
    messages = judge_prompt("What is 2 + 2?", "four", "five", rubric="Prefer correct answers.")
    assert len(messages) == 1 and messages[0]["role"] == "user"
    text = messages[0]["content"]
    assert text.index("four") < text.index("[Answer B]") < text.index("five")
    assert "Prefer correct answers." in text and "{" not in text
    assert DEFAULT_RUBRIC in judge_prompt("q", "a", "b")[0]["content"]


# ---------------------------------------------------------------- scripted judges


def answer_shown_as(text: str, letter: str) -> str:
    """The answer shown under [Answer A] or [Answer B] in a judge prompt."""
    after = text.split(f"[Answer {letter}]\n", 1)[1]
    return after.split("\n\n", 1)[0]


class FairJudge:
    """Prefers the answer that says GOOD, whatever its position; records every batch it is given."""

    def __init__(self) -> None:
        self.batches: list[list] = []

    def __call__(self, conversations):
        self.batches.append(conversations)
        replies = []
        for messages in conversations:
            text = messages[-1]["content"]
            a, b = ("GOOD" in answer_shown_as(text, letter) for letter in "AB")
            replies.append("Verdict: tie" if a == b else f"A short reason.\nVerdict: {'A' if a else 'B'}")
        return replies


def items(*pairs):
    return [{"prompt": f"question {i}", "answer_a": a, "answer_b": b} for i, (a, b) in enumerate(pairs)]


def test_a_fair_judge_gives_wins_losses_and_ties():
    result = pairwise_judge(FairJudge(), items((GOOD, BAD), (GOOD, BAD), (BAD, GOOD), (GOOD, GOOD), (BAD, BAD)))
    assert (result["wins"], result["losses"], result["ties"], result["unparseable"]) == (2, 1, 2, 0)
    assert result["n"] == result["judged"] == 5
    assert result["win_rate"] == pytest.approx(0.4)
    assert result["loss_rate"] == pytest.approx(0.2)
    assert result["tie_rate"] == pytest.approx(0.4)
    assert [r["outcome"] for r in result["items"]] == ["win", "win", "loss", "tie", "tie"]
    assert result["items"][2]["verdicts"] == ["B", "B"]  # the swapped verdict is mapped back to B


def test_both_orders_are_asked_with_the_answers_swapped():
    judge = FairJudge()
    pairwise_judge(judge, items(("student says x", "teacher says y")), rubric="Be strict.")
    first, second = judge.batches[0]
    assert answer_shown_as(first[0]["content"], "A") == "student says x"
    assert answer_shown_as(second[0]["content"], "A") == "teacher says y"
    assert answer_shown_as(second[0]["content"], "B") == "student says x"
    assert "Be strict." in first[0]["content"]


def test_an_order_biased_judge_only_produces_ties():
    always_a = lambda conversations: ["Verdict: A"] * len(conversations)  # noqa: E731
    result = pairwise_judge(always_a, items((GOOD, BAD), (BAD, GOOD), (GOOD, GOOD)))
    assert (result["wins"], result["losses"], result["ties"]) == (0, 0, 3)
    assert result["tie_rate"] == 1.0
    assert all(r["verdicts"] == ["A", "B"] for r in result["items"])


def test_one_order_saying_tie_makes_a_tie():
    replies = iter(["Verdict: A", "Verdict: tie"])
    result = pairwise_judge(lambda convs: [next(replies) for _ in convs], items((GOOD, BAD)))
    assert result["ties"] == 1 and result["wins"] == 0


def test_unparseable_replies_are_counted_apart():
    replies = iter(["Verdict: A", "Verdict: B", "hmm", "Verdict: A", "Verdict: B", "Verdict: B"])
    result = pairwise_judge(lambda convs: [next(replies) for _ in convs], items((GOOD, BAD), (GOOD, BAD), (BAD, GOOD)))
    assert (result["wins"], result["losses"], result["ties"], result["unparseable"]) == (1, 0, 1, 1)
    assert result["judged"] == 2 and result["n"] == 3
    assert result["win_rate"] == 0.5
    assert result["items"][1]["outcome"] == "unparseable"
    assert result["items"][1]["replies"] == ["hmm", "Verdict: A"]


def test_nothing_judged_gives_null_rates():
    result = pairwise_judge(lambda convs: ["no idea"] * len(convs), items((GOOD, BAD)))
    assert result["unparseable"] == 1 and result["win_rate"] is None and result["tie_rate"] is None
    assert pairwise_judge(FairJudge(), [])["n"] == 0


def test_batches_are_at_most_batch_size_and_the_template_is_reported():
    judge = FairJudge()
    result = pairwise_judge(judge, items(*[(GOOD, BAD)] * 5), batch_size=4)
    assert [len(b) for b in judge.batches] == [4, 4, 2]
    assert result["wins"] == 5
    assert result["template"] == JUDGE_TEMPLATE and result["rubric"] == DEFAULT_RUBRIC


def test_a_judge_that_returns_the_wrong_number_of_replies_is_an_error():
    with pytest.raises(ValueError, match="1 replies for 2 prompts"):
        pairwise_judge(lambda convs: ["Verdict: A"], items((GOOD, BAD)))
