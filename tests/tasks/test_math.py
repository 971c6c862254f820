"""MATH: boxed answers, equivalence by math-verify, the 4-shot prompt, loading rows. No network."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from irpo_pl.tasks import get_task
from irpo_pl.tasks.math import FEW_SHOT, SUBJECTS, MathTask, boxed_answers

needs_math_verify = pytest.mark.skipif(
    importlib.util.find_spec("math_verify") is None,
    reason="math-verify is not installed (pip install 'irpo_pl[math]')",
)

HALF = {"problem": "What is $1 - \\frac{1}{2}$?", "solution": "We get $1 - \\frac{1}{2} = \\boxed{\\frac{1}{2}}$."}
INTERVAL = {"problem": "Solve $x^2 < 4$.", "solution": "So $-2 < x < 2$, that is $x \\in \\boxed{(-2, 2)}$."}


@pytest.fixture(scope="module")
def task() -> MathTask:
    return MathTask()


def test_registered():
    assert isinstance(get_task("math"), MathTask)


@pytest.mark.parametrize(
    ("text", "answers"),
    [
        ("$\\boxed{\\frac{1}{\\sqrt{2}}}$", ["\\frac{1}{\\sqrt{2}}"]),
        ("$\\boxed{\\left\\{ 1, 2 \\right\\}}$ then \\boxed{3}", ["\\left\\{ 1, 2 \\right\\}", "3"]),
        ("\\fbox{a{b}c}", ["a{b}c"]),
        ("The answer is $\\boxed 5$.", ["5"]),
        ("\\boxed{\\frac{1}{2}", []),
        ("no box", []),
    ],
)
def test_boxed_answers_balance_nested_braces(text, answers):
    assert boxed_answers(text) == answers


def test_gold_answer_is_the_last_box(task):
    row = {"problem": "p", "solution": "First $\\boxed{1}$, in the end $\\boxed{\\dfrac{3}{4}}$."}
    assert task.gold_answer(row) == "\\dfrac{3}{4}"


def test_prompt_is_four_shot_and_ends_with_the_problem(task):
    prompt = task.prompt(HALF)
    assert prompt.count("Problem:\n") == 5 and prompt.count("\\boxed{") == len(FEW_SHOT) == 4
    assert prompt.endswith(f"Problem:\n{HALF['problem']}\n\nSolution:")


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("So it is $\\boxed{0.5}$.\nFinal Answer: The final answer is $0.5$. I hope it is correct.", "0.5"),
        ("\\boxed{1}, no wait: \\boxed{\\tfrac{1}{2}}", "\\tfrac{1}{2}"),
        ("\\boxed{2}\n\nProblem:\nWhat is $3+4$?\n\nSolution:\n$\\boxed{7}$", "2"),
        ("Final Answer: The final answer is $\\frac12$. I hope it is correct.", "\\frac12"),
        ("I do not know.", None),
    ],
)
def test_extract_answer(task, completion, answer):
    assert task.extract_answer(completion) == answer


@needs_math_verify
@pytest.mark.parametrize("answer", ["\\frac{1}{2}", "0.5", "\\dfrac12", "1/2", "\\frac{2}{4}"])
def test_equivalent_answers_are_rewarded(task, answer):
    assert task.reward(f"Thus the answer is $\\boxed{{{answer}}}$.", HALF) == 1.0


@needs_math_verify
@pytest.mark.parametrize("answer", ["\\frac{1}{3}", "2", "-\\frac{1}{2}", ""])
def test_different_answers_are_not(task, answer):
    assert task.reward(f"Thus the answer is $\\boxed{{{answer}}}$.", HALF) == 0.0


@needs_math_verify
def test_intervals_compare_as_intervals(task):
    assert task.reward("$\\boxed{(-2,2)}$", INTERVAL) == 1.0
    assert task.reward("$\\boxed{[-2,2]}$", INTERVAL) == 0.0


@needs_math_verify
def test_gold_solution_earns_its_reward(task):
    for row in (HALF, INTERVAL):
        assert task.gold_solution(row).endswith("I hope it is correct.")
        assert task.reward(task.gold_solution(row), row) == 1.0
    assert task.reward("I do not know.", HALF) == 0.0


def test_missing_math_verify_says_how_to_install_it(task, monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` fail
    with pytest.raises(ImportError, match=r"pip install 'irpo_pl\[math\]'"):
        task.reward("$\\boxed{\\frac{7}{13}}$", {"problem": "p", "solution": "$\\boxed{\\frac{7}{11}}$"})


def test_local_rows_load_and_bad_rows_name_file_line_and_field(tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps(HALF) + "\n" + json.dumps({"problem": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl, line 2: missing field 'solution'"):
        MathTask(data_dir=str(tmp_path)).load_split("test")
    (tmp_path / "test.jsonl").write_text(json.dumps(HALF) + "\n" + json.dumps({"problem": "p", "solution": "7"}) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl, line 2: field 'solution' has no \\boxed"):
        MathTask(data_dir=str(tmp_path)).load_split("test")
    (tmp_path / "test.jsonl").write_text(json.dumps(HALF) + "\n" + json.dumps(INTERVAL) + "\n")
    assert MathTask(data_dir=str(tmp_path)).load_split("test") == [HALF, INTERVAL]


def test_without_data_dir_every_subject_comes_from_the_hub(monkeypatch):
    datasets = pytest.importorskip("datasets")
    configs = []

    def load_dataset(hub_id, config, split):
        assert (hub_id, split) == ("EleutherAI/hendrycks_math", "train")
        configs.append(config)
        return datasets.Dataset.from_list([HALF])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert MathTask().load_split("train") == [HALF] * len(SUBJECTS)
    assert configs == list(SUBJECTS)
