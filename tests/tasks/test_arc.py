"""ARC-Challenge: the multiple-choice prompt, letter extraction, checking rows. Hand-made rows, no network."""

from __future__ import annotations

import json

import pytest

from irpo_pl.pairing import build_pairs
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


# Appendix B.1 of Pang et al. 2024 (arXiv 2404.19733 v3), with its placeholders; see
# irpo_pl/tasks/arc.py for how its layout is read.
PAPER_PROMPT = (
    "Your task is to answer the question below. Give step by step reasoning before you answer, and when "
    'you\'re ready to answer, conclude using the format "Final answer: (insert letter here)"\n\n'
    "Question: [question here]\n\n"
    "(A) [option A here]\n"
    "(B) [option B here]\n"
    "(C) [option C here]\n"
    "(D) [option D here]\n"
    "Solution:"
)


def test_prompt_is_the_papers(task):
    row = {
        "question": "[question here]",
        "choices": {"text": [f"[option {letter} here]" for letter in "ABCD"], "label": ["1", "2", "3", "4"]},
        "answerKey": "2",
    }
    assert task.prompt(row) == PAPER_PROMPT


def test_prompt_lists_the_options_by_letter(task):
    prompt = task.prompt(NUMBERED)
    assert f"Question: {NUMBERED['question']}\n\n(A) coal\n(B) oil\n(C) wind\nSolution:" in prompt


def test_gold_answer_is_a_letter_and_there_is_no_gold_solution(task):
    assert task.gold_answer(LETTERED) == "B"
    assert task.gold_answer(NUMBERED) == "C"
    assert task.gold_solution(LETTERED) is None


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("Plants use carbon dioxide in photosynthesis.\nFinal answer: B", "B"),
        ("Plants use carbon dioxide in photosynthesis.\nFinal answer: (B)", "B"),
        ("Final answer: (B) carbon dioxide", "B"),
        ("Final answer: B) carbon dioxide", "B"),
        ("Final answer: (insert letter here)", None),
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


def test_the_train_split_can_join_several_hub_configs(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(hub_id, config, split):
        calls.append((config, split))
        return datasets.Dataset.from_list([LETTERED if config == "ARC-Easy" else NUMBERED])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    task = ArcChallengeTask(train_hub_configs=["ARC-Easy", "ARC-Challenge"])
    assert task.load_split("train") == [LETTERED, NUMBERED]
    # Evaluation stays on the challenge set.
    assert task.load_split("test") == [NUMBERED]
    assert calls == [("ARC-Easy", "train"), ("ARC-Challenge", "train"), ("ARC-Challenge", "test")]


def test_votes_count_letters(task):
    completions = ["Final answer: (C)", "Final answer: C", "Final answer: A", "no idea", "Final answer: A", "The answer is (C) wind."]
    assert task.majority_answer([task.extract_answer(c) for c in completions]) == "C"
    assert task.vote_is_correct(completions, NUMBERED)
    assert not task.vote_is_correct(completions, LETTERED)


def test_a_question_without_a_correct_sample_gives_no_pair(task):
    # No gold chain of thought (gold_solution is None), so nothing can stand in as a winner.
    rows = [LETTERED, NUMBERED]
    samples = [["Final answer: A", "Final answer: C"], ["Final answer: C", "Final answer: B"]]
    rewards = [[task.reward(c, row) for c in completions] for completions, row in zip(samples, rows)]
    assert rewards == [[0.0, 0.0], [1.0, 0.0]]
    prompts = [task.prompt(row) for row in rows]
    pairs, stats = build_pairs(prompts, samples, rewards, k=20, gold_solutions=[task.gold_solution(row) for row in rows])
    assert stats.dropped_all_wrong == 1
    assert [(p["question_index"], p["chosen"], p["rejected"]) for p in pairs] == [(1, "Final answer: C", "Final answer: B")]
