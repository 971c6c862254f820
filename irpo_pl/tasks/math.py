"""Hendrycks MATH competition problems, with the 4-shot Minerva prompt the IRPO paper uses.

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

# The four worked examples of Lewkowycz et al. 2022 (Minerva), appendix D.2: (problem, solution, answer).
FEW_SHOT = (
    (
        r"Find the domain of the expression  $\frac{\sqrt{x-2}}{\sqrt{5-x}}$.",
        r"The expressions inside each square root must be non-negative. Therefore, $x-2 \ge 0$, so $x\ge2$, "
        r"and $5 - x \ge 0$, so $x \le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, "
        r"which gives $x<5$. Therefore, the domain of the expression is $\boxed{[2,5)}$.",
        r"[2,5)",
    ),
    (
        r"If $\det \mathbf{A} = 2$ and $\det \mathbf{B} = 12,$ then find $\det (\mathbf{A} \mathbf{B}).$",
        r"We have that $\det (\mathbf{A} \mathbf{B}) = (\det \mathbf{A})(\det \mathbf{B}) = (2)(12) = \boxed{24}.$",
        r"24",
    ),
    (
        "Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, "
        "how many times must Terrell lift them in order to lift the same total weight?",
        r"If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\cdot 12\cdot20=480$ pounds of weight. "
        r" If he lifts two 15-pound weights instead for $n$ times, he will lift a total of $2\cdot15\cdot n=30n$ "
        r"pounds of weight.  Equating this to 480 pounds, we can solve for $n$:" "\n"
        r"\begin{align*}" "\n" r"30n&=480\\" "\n" r"\Rightarrow\qquad n&=480/30=\boxed{16}" "\n" r"\end{align*}",
        r"16",
    ),
    (
        "If the system of equations\n\n"
        r"\begin{align*}" "\n" r"6x-4y&=a,\\" "\n" r"6y-9x &=b." "\n"
        r"\end{align*}has a solution $(x, y)$ where $x$ and $y$ are both nonzero, "
        r"find $\frac{a}{b},$ assuming $b$ is nonzero.",
        r"If we multiply the first equation by $-\frac{3}{2}$, we obtain" "\n\n"
        r"$$6y-9x=-\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have" "\n\n"
        r"$$-\frac{3}{2}a=b\Rightarrow\frac{a}{b}=\boxed{-\frac{2}{3}}.$$",
        r"-\frac{2}{3}",
    ),
)


def solution_completion(solution: str, answer: str) -> str:
    """A worked solution in the format the few-shot examples teach."""
    return f"{solution}\nFinal Answer: The final answer is ${answer}$. I hope it is correct."


def _question(problem: str) -> str:
    return f"Problem:\n{problem}\n\nSolution:"


PROMPT_PREFIX = "".join(
    f"{_question(problem)}\n{solution_completion(solution, answer)}\n\n" for problem, solution, answer in FEW_SHOT
)

BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
# A model that keeps going after its answer starts a new few-shot round.
NEXT_PROBLEM = re.compile(r"\n\s*Problem:")
# The Minerva closing sentence, for completions that state the answer without boxing it.
MINERVA_ANSWER = re.compile(r"final answer is\s*\$(.+?)\$", re.IGNORECASE | re.DOTALL)


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


def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise ImportError("the math task compares answers with math-verify: pip install 'irpo_pl[math]'") from None
    return math_verify


@lru_cache(maxsize=65536)
def _parse(answer: str) -> list:
    """math-verify's reading of one boxed answer; cached because sampled answers repeat a lot."""
    return _math_verify().parse(f"\\boxed{{{answer}}}", parsing_timeout=_timeout())


def _timeout() -> int | None:
    # math-verify times out with signal.alarm, which only the main thread may use;
    # elsewhere it would raise, so run without a timeout there.
    return 5 if threading.current_thread() is threading.main_thread() else None


def answers_match(gold: str, answer: str) -> bool:
    """Whether two LaTeX answers are mathematically equal ("\\frac{1}{2}", "0.5" and "\\dfrac12" all are)."""
    return _math_verify().verify(_parse(gold), _parse(answer), timeout_seconds=_timeout())


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
        # The hub dataset keeps each subject in its own config; a local folder holds them all in one file.
        configs = self.hub_configs if self.data_dir is None else (None,)
        rows = []
        for config in configs:
            config_rows, places = load_rows(self.data_dir, split, self.hub_id, config)
            for row, where in zip(config_rows, places):
                require_fields(row, where, ("problem", "solution"))
                if not isinstance(row["solution"], str) or not boxed_answers(row["solution"]):
                    raise ValueError(f"{where}: field 'solution' has no \\boxed{{...}} answer")
            rows.extend(config_rows)
        return rows

    def prompt(self, example: dict) -> str:
        return PROMPT_PREFIX + _question(example["problem"])

    def gold_answer(self, example: dict) -> str:
        answers = boxed_answers(example["solution"])
        if not answers:
            raise ValueError(f"math row has no \\boxed{{...}} answer in its solution: {example['solution']!r}")
        return answers[-1]

    def gold_solution(self, example: dict) -> str:
        return solution_completion(example["solution"], self.gold_answer(example))

    def extract_answer(self, completion: str) -> str | None:
        """The raw LaTeX of the answer: the last box before any next "Problem:", else the Minerva sentence."""
        completion = NEXT_PROBLEM.split(completion, maxsplit=1)[0]
        answers = boxed_answers(completion)
        if answers:
            return answers[-1]
        sentence = MINERVA_ANSWER.search(completion)
        return sentence.group(1) if sentence else None

    def reward(self, completion: str, example: dict) -> float:
        answer = self.extract_answer(completion)
        return float(answer is not None and answers_match(self.gold_answer(example), answer))
