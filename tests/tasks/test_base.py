"""The Task base class: one answer equivalence that the reward and the majority vote share."""

from __future__ import annotations

from irpo_pl.tasks.arc import ArcChallengeTask
from irpo_pl.tasks.gsm8k import GSM8KTask


class CountingGSM8K(GSM8KTask):
    """GSM8K that counts how often two answers are compared."""

    def __init__(self) -> None:
        super().__init__()
        self.comparisons = 0

    def answers_match(self, answer: str, reference: str) -> bool:
        self.comparisons += 1
        return super().answers_match(answer, reference)


class CaseBlindArc(ArcChallengeTask):
    """A user's task whose answers match without regard to case."""

    def extract_answer(self, completion: str) -> str | None:
        return completion.rpartition("Final answer:")[2].strip() or None

    def answers_match(self, answer: str, reference: str) -> bool:
        return answer.lower() == reference.lower()


ROW = {"question": "Which is a renewable resource?", "choices": {"text": ["coal", "wind"], "label": ["A", "B"]}, "answerKey": "B"}


def test_an_answer_is_compared_with_group_representatives_only():
    task = CountingGSM8K()
    # 32 votes, 4 distinct answers: each distinct answer is compared once with each earlier group.
    answers = ["1", "2", "3", "4"] * 8
    assert task.majority_answer(answers) == "1"
    assert task.comparisons == 0 + 1 + 2 + 3


def test_none_does_not_vote_and_no_answer_gives_none():
    task = GSM8KTask()
    assert task.majority_answer([None, "7", None, None]) == "7"
    assert task.majority_answer([None, None]) is None
    assert task.majority_answer([]) is None
    assert not task.vote_is_correct(["no number here"] * 3, {"question": "q", "answer": "#### 7"})


def test_reward_and_vote_use_the_tasks_own_equivalence():
    task = CaseBlindArc()
    assert task.reward("Final answer: b", ROW) == 1.0
    assert task.majority_answer(["a", "b", "B"]) == "b"
    assert task.vote_is_correct(["Final answer: a", "Final answer: b", "Final answer: B"], ROW)
    assert not ArcChallengeTask().answers_match("b", "B")  # the default compares strings
