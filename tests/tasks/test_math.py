"""MATH: the paper's 4-shot prompt, boxed and "Final answer:" answers, equivalence by math-verify. No network."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from irpo_pl.tasks import get_task
from irpo_pl.tasks.math import SUBJECTS, MathTask, boxed_answers

needs_math_verify = pytest.mark.skipif(
    importlib.util.find_spec("math_verify") is None,
    reason="math-verify is not installed (pip install 'irpo_pl[math]')",
)

HALF = {"problem": "What is $1 - \\frac{1}{2}$?", "level": "Level 1", "type": "Prealgebra",
        "solution": "We get $1 - \\frac{1}{2} = \\boxed{\\frac{1}{2}}$."}
INTERVAL = {"problem": "Solve $x^2 < 4$.", "level": "Level 2", "type": "Algebra",
            "solution": "So $-2 < x < 2$, that is $x \\in \\boxed{(-2, 2)}$."}

# The prompt's four worked examples as the MATH release's training files hold them, copied here
# from the files so that the prompt is checked against the data, not against itself.
FEW_SHOT_ROWS = {
    "train/algebra/2761.json": json.loads(
        r'{"problem": "What is the ordered pair of integers $(x,y)$ for which $12x + 21y = 15$ and $21x + 12y = 51$?", "level": "Level 3", "type": "Algebra", "solution": "Simplify both equations by dividing by 3: \\begin{align*}\n4x + 7y &= 5 \\\\\n7x + 4y &= 17.\n\\end{align*} We solve this system using the elimination method.  Multiply the first equation by 7 and the second equation by $-4$ to obtain \\begin{align*}\n28x + 49y &= 35 \\\\\n-28x -16y &= -68.\n\\end{align*} Adding the equations gives $33y=-33$, so $y=-1$.  Substituting $y=-1$ into either equation and solving, we get $x=3$.  Therefore, $(x,y)=\\boxed{(3,-1)}$."}'
    ),
    "train/counting_and_probability/421.json": json.loads(
        r'{"problem": "Ben rolls 5 fair 12-sided dice.  The 12 faces of each die are numbered from 1 to 12. What is the probability that exactly two of the dice show an even number?", "level": "Level 3", "type": "Counting & Probability", "solution": "There is a $\\frac{1}{2}$ probability that a 12-sided die will show an even number and a $\\frac{1}{2}$ probability that it will show an odd number. We can choose which dice will show the even numbers in $\\binom{5}{2}=10$ ways. For each way, there is a $\\left( \\frac{1}{2} \\right) ^5=\\frac{1}{32}$ probability that the chosen dice actually roll even numbers and the other dice roll odd numbers. Therefore, the probability that exactly two of the dice show an even number is $10\\cdot \\frac{1}{32}=\\boxed{\\frac{5}{16}}$."}'
    ),
    "train/geometry/737.json": json.loads(
        r'{"problem": "The surface area of a particular sphere is $324\\pi\\text{ cm}^2$. What is the volume, in cubic centimeters, of the sphere? Express your answer in terms of $\\pi$.", "level": "Level 3", "type": "Geometry", "solution": "Let the sphere have radius $r$.  A sphere with radius $r$ has surface area $4\\pi r^2$, so we have \\[324\\pi = 4\\pi r^2.\\]  Solving for $r$ and keeping the positive value yields $r^2=81$, so $r = 9$.  Hence the volume of the sphere is \\[\\frac{4}{3}\\pi(9^3)=81\\cdot 3\\cdot 4 \\pi = \\boxed{972\\pi}.\\]"}'
    ),
    "train/intermediate_algebra/548.json": json.loads(
        r'{"problem": "Find the quadratic polynomial $p(x)$ such that $p(-7) = 0,$ $p(4) = 0,$ and $p(5) = -36.$", "level": "Level 3", "type": "Intermediate Algebra", "solution": "Since $p(-7) = p(4) = 0,$ the quadratic polynomial $p(x)$ is of the form\n\\[p(x) = c(x + 7)(x - 4),\\]for some constant $c.$  To find $c,$ we set $x = 5,$ and use the fact that $p(5) = -36$:\n\\[-36 = c(12)(1),\\]so $c = -3.$  Hence, $p(x) = -3(x + 7)(x - 4) = \\boxed{-3x^2 - 9x + 84}.$"}'
    ),
}

# Appendix B.1 of Pang et al. 2024 (arXiv 2404.19733 v3), with its placeholders; see
# irpo_pl/tasks/math.py for how its layout is read.
PAPER_INSTRUCTION = (
    "Your task is to answer the last question below. Give step by step reasoning before you answer, and when "
    'you\'re ready to answer, please wrap your answer in \\boxed, and conclude using the format "Final answer: ..."'
)
PAPER_EXAMPLE = "Question: {question}\nSolution: {solution}\nFinal answer: {answer}\n"
PAPER_QUESTION = "Question: [the question to be solved]\nSolution:"


@pytest.fixture(scope="module")
def task() -> MathTask:
    return MathTask()


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path.parent)


def test_registered():
    assert isinstance(get_task("math"), MathTask)


def test_prompt_is_the_papers_with_four_training_examples(task):
    examples = "".join(
        PAPER_EXAMPLE.format(question=row["problem"], solution=row["solution"], answer=boxed_answers(row["solution"])[-1])
        for row in FEW_SHOT_ROWS.values()
    )
    expected = f"{PAPER_INSTRUCTION}\n\n{examples}{PAPER_QUESTION}"
    assert task.prompt({"problem": "[the question to be solved]", "solution": "\\boxed{0}"}) == expected


def test_the_examples_are_four_subjects_and_four_kinds_of_answer():
    assert [row["type"] for row in FEW_SHOT_ROWS.values()] == ["Algebra", "Counting & Probability", "Geometry", "Intermediate Algebra"]
    answers = [boxed_answers(row["solution"])[-1] for row in FEW_SHOT_ROWS.values()]
    assert answers == ["(3,-1)", "\\frac{5}{16}", "972\\pi", "-3x^2 - 9x + 84"]


def test_the_examples_are_not_among_the_questions(tmp_path):
    rows = [HALF, *FEW_SHOT_ROWS.values(), INTERVAL]
    data_dir = write_jsonl(tmp_path / "train.jsonl", rows)
    assert MathTask(data_dir=data_dir).load_split("train") == [HALF, INTERVAL]
    # Matched by problem text, so a copy with other whitespace around it is dropped too.
    padded = {**FEW_SHOT_ROWS["train/geometry/737.json"], "level": "?"}
    padded["problem"] = f" {padded['problem']}\n"
    write_jsonl(tmp_path / "train.jsonl", [padded, HALF])
    assert MathTask(data_dir=data_dir).load_split("train") == [HALF]


def test_without_data_dir_every_subject_comes_from_the_hub_less_the_examples(monkeypatch):
    datasets = pytest.importorskip("datasets")
    configs = []

    def load_dataset(hub_id, config, split):
        assert (hub_id, split) == ("EleutherAI/hendrycks_math", "train")
        configs.append(config)
        return datasets.Dataset.from_list([HALF, *FEW_SHOT_ROWS.values()])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert MathTask().load_split("train") == [HALF] * len(SUBJECTS)
    assert configs == list(SUBJECTS)


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


def test_gold_solution_is_the_solution_then_its_final_answer_line(task):
    assert task.gold_solution(HALF) == "We get $1 - \\frac{1}{2} = \\boxed{\\frac{1}{2}}$.\nFinal answer: \\frac{1}{2}"
    with pytest.raises(ValueError, match="no \\\\boxed"):
        task.gold_solution({"problem": "p", "solution": "It is 7."})


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("So $1 - \\frac{1}{2} = \\boxed{\\frac{1}{2}}$.\nFinal answer: \\frac{1}{2}", "\\frac{1}{2}"),
        ("So it is one half.\nFinal answer: $0.5$.", "0.5"),
        ("Final answer: the volume is $972\\pi$ cubic cm.", "972\\pi"),
        ("Final answer: \\boxed{2}", "2"),
        ("Final answer:\n\n$12$", "12"),
        ("Final Answer: 7.", "7"),
        # The box wins over the line's text: it delimits the answer exactly.
        ("\\boxed{1}, no: \\boxed{\\tfrac{1}{2}}\nFinal answer: one half", "\\tfrac{1}{2}"),
        # Nothing after the "Final answer:" line, or after a next "Question:", counts.
        ("\\boxed{2}\nFinal answer: 2\nQuestion: What is $3+4$?\nSolution: $\\boxed{7}$\nFinal answer: 7", "2"),
        ("Final answer: 7\n\nCheck: $\\boxed{8}$", "7"),
        ("It is $\\boxed{2}$.\n\nQuestion: What is $3+4$?\nSolution: $\\boxed{7}$", "2"),
        ("Without the line, the box: $\\boxed{-3x^2 - 9x + 84}$.", "-3x^2 - 9x + 84"),
        ("Final answer:", None),
        ("I do not know.", None),
    ],
)
def test_extract_answer(task, completion, answer):
    assert task.extract_answer(completion) == answer


@needs_math_verify
@pytest.mark.parametrize("answer", ["\\frac{1}{2}", "0.5", "\\dfrac12", "1/2", "\\frac{2}{4}"])
def test_equivalent_answers_are_rewarded(task, answer):
    assert task.reward(f"Thus the answer is $\\boxed{{{answer}}}$.\nFinal answer: {answer}", HALF) == 1.0


@needs_math_verify
@pytest.mark.parametrize("answer", ["\\frac{1}{3}", "2", "-\\frac{1}{2}", ""])
def test_different_answers_are_not(task, answer):
    assert task.reward(f"Thus the answer is $\\boxed{{{answer}}}$.", HALF) == 0.0


@needs_math_verify
def test_intervals_compare_as_intervals(task):
    assert task.reward("$\\boxed{(-2,2)}$", INTERVAL) == 1.0
    assert task.reward("$\\boxed{[-2,2]}$", INTERVAL) == 0.0


@needs_math_verify
def test_a_completion_in_the_prompts_format_earns_its_reward(task):
    # As the examples teach: the worked solution with its answer boxed, then "Final answer: ...".
    completion = "One half of the whole is left: $1 - \\frac{1}{2} = \\boxed{\\frac12}$.\nFinal answer: \\frac12\n"
    assert task.reward(completion, HALF) == 1.0
    for row in (HALF, INTERVAL, *FEW_SHOT_ROWS.values()):
        assert task.reward(task.gold_solution(row), row) == 1.0
    assert task.reward(task.gold_solution(HALF), INTERVAL) == 0.0
    assert task.reward("I do not know.", HALF) == 0.0


@needs_math_verify
def test_votes_are_grouped_by_equivalence(task):
    # By string, "3" would win 2 votes to 1 each; as numbers, one half wins 3 to 2.
    answers = ["3", "\\frac12", "\\frac{1}{2}", None, "3", "0.5"]
    assert task.majority_answer(answers) == "\\frac12"
    assert task.majority_answer(["\\frac{1}{2}", "\\frac12"]) == "\\frac{1}{2}"
    assert task.majority_answer([None, None]) is None


@needs_math_verify
def test_maj_at_k_counts_frac12_and_frac_1_2_as_one_answer(task):
    completions = [
        "So $\\boxed{3}$.\nFinal answer: 3",
        "So $\\boxed{3}$.\nFinal answer: 3",
        "So $\\boxed{\\frac12}$.\nFinal answer: \\frac12",
        "So $\\boxed{\\frac{1}{2}}$.\nFinal answer: \\frac{1}{2}",
        "I am not sure.",
        "Final answer: $0.5$",
    ]
    # By string, "3" would win with 2 votes; one half has 3.
    assert task.vote_is_correct(completions, HALF)
    # 2 votes each: the tie goes to the answer seen first.
    assert not task.vote_is_correct(completions[:-1], HALF)


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
