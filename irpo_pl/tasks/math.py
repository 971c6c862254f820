"""Hendrycks MATH competition problems, with the IRPO paper's own 4-shot prompt.

Answers are LaTeX (fractions, intervals, expressions), so two answers match when
math-verify finds them mathematically equal, not when their strings do.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache

from irpo_pl.tasks.base import Task, load_rows, require_fields

SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)

# Pang et al. 2024 (arXiv 2404.19733 v3), appendix B.1, word for word ("you’re" typeset from a
# typed "'"). The appendix shows this instruction, a blank line, then the four examples and the
# question as one paragraph ("Question: ... Solution: ... Final answer: ... Question: ..."), so each
# "Question:", "Solution:" and "Final answer:" starts a line, with no blank lines between them.
INSTRUCTION = (
    "Your task is to answer the last question below. Give step by step reasoning before you answer, "
    "and when you're ready to answer, please wrap your answer in \\boxed, and conclude using the "
    'format "Final answer: ..."'
)

# The paper's four "fixed in-context examples chosen from the training set of MATH" are not
# printed, so these are ours: (problem, solution) verbatim from the MATH release's training files
# (hendrycks/math; the hub's EleutherAI/hendrycks_math holds the same text). Four subjects, and four
# kinds of LaTeX answer, since the paper says the examples are there to teach answer formatting.
# `load_split` keeps them out of the questions.
FEW_SHOT = (
    # train/algebra/2761.json, Level 3: an ordered pair.
    (
        r"What is the ordered pair of integers $(x,y)$ for which $12x + 21y = 15$ and $21x + 12y = 51$?",
        "Simplify both equations by dividing by 3: \\begin{align*}\n4x + 7y &= 5 \\\\\n7x + 4y &= 17.\n"
        "\\end{align*} We solve this system using the elimination method.  Multiply the first equation by 7 "
        "and the second equation by $-4$ to obtain \\begin{align*}\n28x + 49y &= 35 \\\\\n-28x -16y &= -68.\n"
        "\\end{align*} Adding the equations gives $33y=-33$, so $y=-1$.  Substituting $y=-1$ into either "
        "equation and solving, we get $x=3$.  Therefore, $(x,y)=\\boxed{(3,-1)}$.",
    ),
    # train/counting_and_probability/421.json, Level 3: a fraction.
    (
        "Ben rolls 5 fair 12-sided dice.  The 12 faces of each die are numbered from 1 to 12. "
        "What is the probability that exactly two of the dice show an even number?",
        r"There is a $\frac{1}{2}$ probability that a 12-sided die will show an even number and a $\frac{1}{2}$ "
        r"probability that it will show an odd number. We can choose which dice will show the even numbers in "
        r"$\binom{5}{2}=10$ ways. For each way, there is a $\left( \frac{1}{2} \right) ^5=\frac{1}{32}$ probability "
        r"that the chosen dice actually roll even numbers and the other dice roll odd numbers. Therefore, the "
        r"probability that exactly two of the dice show an even number is $10\cdot \frac{1}{32}=\boxed{\frac{5}{16}}$.",
    ),
    # train/geometry/737.json, Level 3: a multiple of pi.
    (
        r"The surface area of a particular sphere is $324\pi\text{ cm}^2$. What is the volume, in cubic "
        r"centimeters, of the sphere? Express your answer in terms of $\pi$.",
        r"Let the sphere have radius $r$.  A sphere with radius $r$ has surface area $4\pi r^2$, so we have "
        r"\[324\pi = 4\pi r^2.\]  Solving for $r$ and keeping the positive value yields $r^2=81$, so $r = 9$.  "
        r"Hence the volume of the sphere is \[\frac{4}{3}\pi(9^3)=81\cdot 3\cdot 4 \pi = \boxed{972\pi}.\]",
    ),
    # train/intermediate_algebra/548.json, Level 3: a formula.
    (
        r"Find the quadratic polynomial $p(x)$ such that $p(-7) = 0,$ $p(4) = 0,$ and $p(5) = -36.$",
        "Since $p(-7) = p(4) = 0,$ the quadratic polynomial $p(x)$ is of the form\n"
        "\\[p(x) = c(x + 7)(x - 4),\\]for some constant $c.$  To find $c,$ we set $x = 5,$ and use the fact "
        "that $p(5) = -36$:\n\\[-36 = c(12)(1),\\]so $c = -3.$  Hence, $p(x) = -3(x + 7)(x - 4) = "
        "\\boxed{-3x^2 - 9x + 84}.$",
    ),
)
FEW_SHOT_PROBLEMS = frozenset(problem.strip() for problem, _ in FEW_SHOT)

BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
# A model that keeps going after its answer starts a new few-shot round; nothing after it counts.
NEXT_QUESTION = re.compile(r"\n\s*Question:")
FINAL_ANSWER = re.compile(r"final\s+answer\s*:", re.IGNORECASE)
INLINE_MATH = re.compile(r"\$+([^$]+)\$+")


def boxed_answers(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` (braces balanced, so `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`),
    `\\fbox{...}` or brace-less `\\boxed 5` in `text`, in order; unclosed ones are skipped."""
    answers = []
    for match in BOXED.finditer(text):
        rest = text[match.end() :]
        if not rest.startswith("{"):
            # "\boxed 5$": the argument is the next token (MATH has a few of these).
            token = re.match(r"[^\s${}]+", rest)
            if token:
                answers.append(token.group())
            continue
        depth = 0
        for index, character in enumerate(rest):
            depth += {"{": 1, "}": -1}.get(character, 0)
            if depth == 0:
                answers.append(rest[1:index])
                break
    return answers


def solution_completion(solution: str) -> str:
    """A MATH solution (its answer boxed) as the prompt asks for it: then a line "Final answer: <answer>"."""
    return f"{solution}\nFinal answer: {boxed_answers(solution)[-1]}"


def _question(problem: str) -> str:
    return f"Question: {problem}\nSolution:"


PROMPT_PREFIX = f"{INSTRUCTION}\n\n" + "".join(
    f"{_question(problem)} {solution_completion(solution)}\n" for problem, solution in FEW_SHOT
)


def _line_answer(line: str) -> str:
    """The answer a "Final answer:" line states: its last `$...$` if it has one, without a closing period."""
    formulas = INLINE_MATH.findall(line)
    return (formulas[-1] if formulas else line).strip().rstrip(".").strip()


def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise ImportError("the math task compares answers with math-verify: pip install 'irpo_pl[math]'") from None
    return math_verify


@lru_cache(maxsize=65536)
def _parse(answer: str) -> list:
    """math-verify's reading of one answer; cached because sampled answers and gold answers repeat a lot."""
    return _math_verify().parse(f"\\boxed{{{answer}}}", parsing_timeout=_timeout())


def _timeout() -> int | None:
    # math-verify times out with signal.alarm, which only the main thread may use;
    # elsewhere it would raise, so run without a timeout there.
    return 5 if threading.current_thread() is threading.main_thread() else None


class MathTask(Task):
    """MATH (Hendrycks et al. 2021): rows have `problem` and `solution`, the solution's last `\\boxed{}` the answer."""

    name = "math"

    def __init__(
        self,
        data_dir: str | None = None,
        hub_id: str = "EleutherAI/hendrycks_math",
        hub_configs: tuple[str, ...] = SUBJECTS,
    ) -> None:
        self.data_dir = data_dir
        self.hub_id = hub_id
        self.hub_configs = tuple(hub_configs)

    def load_split(self, split: str) -> list[dict]:
        """The split's rows, less the prompt's four worked examples (which come from the training split)."""
        # The hub dataset keeps each subject in its own config; a local folder holds them all in one file.
        configs = self.hub_configs if self.data_dir is None else (None,)
        rows = []
        for config in configs:
            config_rows, places = load_rows(self.data_dir, split, self.hub_id, config)
            for row, where in zip(config_rows, places):
                require_fields(row, where, ("problem", "solution"))
                if not isinstance(row["solution"], str) or not boxed_answers(row["solution"]):
                    raise ValueError(f"{where}: field 'solution' has no \\boxed{{...}} answer")
            rows.extend(row for row in config_rows if str(row["problem"]).strip() not in FEW_SHOT_PROBLEMS)
        return rows

    def prompt(self, example: dict) -> str:
        return PROMPT_PREFIX + _question(example["problem"])

    def gold_answer(self, example: dict) -> str:
        answers = boxed_answers(example["solution"])
        if not answers:
            raise ValueError(f"math row has no \\boxed{{...}} answer in its solution: {example['solution']!r}")
        return answers[-1]

    def gold_solution(self, example: dict) -> str:
        self.gold_answer(example)  # the same clear error for a row without a box
        return solution_completion(example["solution"])

    def extract_answer(self, completion: str) -> str | None:
        """The raw LaTeX of the answer, read up to the end of the first "Final answer:" line.

        The last `\\boxed{}` there wins over that line's text: a box delimits the answer exactly,
        while the line is free text ("Final answer: the volume is $972\\pi$ cubic cm."). Without a
        box, the line's last `$...$`, or the whole line. Nothing after a next "Question:" counts,
        nor anything after the "Final answer:" line, so what the model writes after answering
        cannot change the answer.
        """
        text = NEXT_QUESTION.split(completion, maxsplit=1)[0]
        line = None
        marker = FINAL_ANSWER.search(text)
        if marker is not None:
            rest = text[marker.end() :].lstrip()
            line = rest.split("\n", 1)[0]
            text = text[: len(text) - len(rest) + len(line)]
        answers = boxed_answers(text)
        if answers:
            return answers[-1]
        if line is None:
            return None
        return _line_answer(line) or None

    def answers_match(self, answer: str, reference: str) -> bool:
        """Whether two LaTeX answers are mathematically equal ("\\frac{1}{2}", "0.5" and "\\dfrac12" all are)."""
        if answer == reference:
            return True
        return _math_verify().verify(_parse(reference), _parse(answer), timeout_seconds=_timeout())
