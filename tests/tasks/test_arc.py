"""ARC-Challenge: the multiple-choice prompt, letter extraction, checking rows. Hand-made rows, no network."""

from __future__ import annotations

import json

import pytest

from irpo_pl.tasks import get_task
from irpo_pl.tasks.arc import ArcChallengeTask

LETTERED = {
    "id": "Mercury_1",
    "question": "Which gas do plants take in from the air to make food?",
    "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
    "answerKey": "B",
}
# Some ARC rows number their options; they are shown and answered as letters all the same.
NUMBERED = {
    "id": "NYSEDREGENTS_2",
    "question": "Which is a renewable resource?",
    "choices": {"text": ["coal", "oil", "wind"], "label": ["1", "2", "3"]},
    "answerKey": "3",
}


@pytest.fixture(scope="module")
def task() -> ArcChallengeTask:
    return ArcChallengeTask()


def test_registered():
    assert isinstance(get_task("arc_challenge"), ArcChallengeTask)


def test_prompt_lists_the_options_by_letter(task):
    prompt = task.prompt(NUMBERED)
    assert NUMBERED["question"] in prompt
    assert "(A) coal\n(B) oil\n(C) wind" in prompt
    assert '"Final answer: <letter>"' in prompt and prompt.endswith("Solution:")


def test_gold_answer_is_a_letter_and_there_is_no_gold_solution(task):
    assert task.gold_answer(LETTERED) == "B"
    assert task.gold_answer(NUMBERED) == "C"
    assert task.gold_solution(LETTERED) is None


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("Plants use carbon dioxide in photosynthesis.\nFinal answer: B", "B"),
        ("Final answer: (B) carbon dioxide", "B"),
        ("**Final answer:** B.", "B"),
        ("The answer is (B).", "B"),
        ("Not (A), not (C).\nFinal answer: B\n\nQuestion: Is it (A) or (D)?", "B"),
        ("Options (A) and (C) are wrong, so (B) remains.", "B"),
        ("Final answer: carbon dioxide", None),
        ("I am not sure.", None),
    ],
)
def test_extract_answer(task, completion, answer):
    assert task.extract_answer(completion) == answer


def test_reward(task):
    assert task.reward("Wind never runs out.\nFinal answer: C", NUMBERED) == 1.0
    assert task.reward("Final answer: 3", NUMBERED) == 0.0
    assert task.reward("Final answer: A", LETTERED) == 0.0


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({k: v for k, v in LETTERED.items() if k != "answerKey"}, "missing field 'answerKey'"),
        ({**LETTERED, "answerKey": "E"}, "field 'answerKey' 'E' is not one of"),
        ({**LETTERED, "choices": {"text": ["a", "b"], "label": ["A"]}}, "field 'choices' must hold lists"),
        ({**LETTERED, "choices": ["a", "b"]}, "field 'choices' must hold lists"),
        ({**LETTERED, "choices": {"text": ["a"], "label": ["A"]}}, "field 'choices' has 1 options"),
    ],
)
def test_a_bad_row_is_an_error_naming_file_line_and_field(tmp_path, row, message):
    (tmp_path / "test.jsonl").write_text(json.dumps(LETTERED) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="test.jsonl, line 2: ") as error:
        ArcChallengeTask(data_dir=str(tmp_path)).load_split("test")
    assert message in str(error.value)


def test_local_rows_load(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(LETTERED) + "\n" + json.dumps(NUMBERED) + "\n")
    assert ArcChallengeTask(data_dir=str(tmp_path)).load_split("train") == [LETTERED, NUMBERED]


def test_without_data_dir_the_hub_dataset_is_used(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list([LETTERED])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert ArcChallengeTask().load_split("validation") == [LETTERED]
    assert calls == [(("allenai/ai2_arc", "ARC-Challenge"), {"split": "validation"})]
