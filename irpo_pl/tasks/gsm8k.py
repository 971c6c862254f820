"""GSM8K grade-school word problems, with the zero-shot "Final answer:" prompt of the IRPO paper.

Also home to `answer_span`, which finds the text an explicit answer marker
introduces; ARC shares it.
"""

from __future__ import annotations

import logging
import re
from decimal import Decimal

from irpo_pl.tasks.base import Task, load_rows, require_fields

log = logging.getLogger(__name__)

# Pang et al. 2024 (arXiv 2404.19733 v3), appendix B.1, word for word. The appendix prints
# "you’re" with a typeset apostrophe, as LaTeX renders a typed "'". It prints the prompt as one
# paragraph ('... "Final answer: ..." Question: [question here] Solution:'), with no blank line
# where its MATH and ARC prompts show one, so the fields start on new lines without blank lines.
PROMPT = (
    "Your task is to answer the question below. Give step by step reasoning before you answer, "
    'and when you\'re ready to answer, please use the format "Final answer: ..."\n'
    "Question: {question}\n"
    "Solution:"
)

# An answer marker ends the reasoning. Bare "final answer" without ":" or "is" is left out
# because models write it in prose ("before the final answer, check 3 + 4 = 7").
ANSWER_MARKER = re.compile(
    r"final\s+answer\s*(?:is\b\s*:?|:)|the\s+answer\s+is\b\s*:?|\\boxed\s*\{|####",
    re.IGNORECASE,
)

# A number as people write it: optional sign and "$", digits grouped by commas or not, optional decimals.
# The sign counts only when it does not follow a word or digit, so "5-3" is 5 and 3, not 5 and -3.
NUMBER = re.compile(r"(?<![\w.])(?P<sign>-)?\$?\s?(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")

CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


def _canonical(match: re.Match) -> str:
    value = Decimal(match["digits"].replace(",", ""))
    if match["sign"] and value != 0:
        value = -value
    # "f" keeps normalize() from printing 100 as 1E+2.
    return format(value.normalize(), "f")


def normalize_number(text: str) -> str | None:
    """The first number in `text` in a canonical form ("$1,000.00" -> "1000", "-3.50%" -> "-3.5"), or None."""
    match = NUMBER.search(text)
    return _canonical(match) if match else None


def answer_span(completion: str) -> str | None:
    """The text the first answer marker introduces: its first non-blank line; None without a marker.

    Only the first marker counts, and only its line, so whatever the model writes after
    answering (a new "Question: ..." with its own numbers, say) cannot change the answer.
    """
    marker = ANSWER_MARKER.search(completion)
    if marker is None:
        return None
    return completion[marker.end() :].lstrip().split("\n", 1)[0]


def gold_cot_answer(answer: str) -> str | None:
    """The normalised number after `####` in a GSM8K-style gold answer, or None if there is none."""
    _, marker, tail = answer.rpartition("####")
    return normalize_number(tail) if marker else None


class GSM8KTask(Task):
    """GSM8K (Cobbe et al. 2021): rows have `question` and `answer`, the answer ending in `#### <number>`."""

    name = "gsm8k"

    def __init__(
        self, data_dir: str | None = None, hub_id: str = "openai/gsm8k", hub_config: str = "main", skip_bad_answers: bool = False
    ) -> None:
        """`skip_bad_answers`: drop rows whose gold answer does not parse, with a counted warning, instead of failing."""
        self.data_dir = data_dir
        self.hub_id = hub_id
        self.hub_config = hub_config
        self.skip_bad_answers = skip_bad_answers

    def load_split(self, split: str) -> list[dict]:
        rows, places = load_rows(self.data_dir, split, self.hub_id, self.hub_config)
        kept, bad = [], []
        for row, where in zip(rows, places):
            require_fields(row, where, ("question", "answer"))
            if isinstance(row["answer"], str) and gold_cot_answer(row["answer"]) is not None:
                kept.append(row)
            elif self.skip_bad_answers:
                bad.append(where)
            else:
                raise ValueError(f"{where}: field 'answer' does not end in '#### <number>' (task arg skip_bad_answers: true drops such rows)")
        if bad:
            log.warning("gsm8k %s: skipped %d rows whose 'answer' does not end in '#### <number>', first %s", split, len(bad), bad[0])
        return kept

    def prompt(self, example: dict) -> str:
        return PROMPT.format(question=example["question"])

    def gold_answer(self, example: dict) -> str:
        answer = gold_cot_answer(example["answer"])
        if answer is None:
            raise ValueError(f"gsm8k row has no '#### <number>' in its answer: {example['answer']!r}")
        return answer

    def gold_solution(self, example: dict) -> str:
        """The gold chain of thought as the prompt asks for it: no calculator annotations, "Final answer: N"."""
        reasoning, _, tail = example["answer"].rpartition("####")
        reasoning = CALCULATOR_ANNOTATION.sub("", reasoning).rstrip()
        return f"{reasoning}\nFinal answer: {tail.strip()}"

    def extract_answer(self, completion: str) -> str | None:
        span = answer_span(completion)
        if span is not None:
            # "the final answer is 15 * 8 = 120": an equation's result is right of its last "=".
            _, _, result = span.rpartition("=")
            return normalize_number(result) or normalize_number(span)
        numbers = list(NUMBER.finditer(completion))
        return _canonical(numbers[-1]) if numbers else None
