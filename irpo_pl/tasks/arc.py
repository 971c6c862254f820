"""ARC-Challenge grade-school science questions, multiple choice, with the paper's zero-shot prompt.

Some ARC rows label their options "1".."4" instead of "A".."D"; options are always
shown, and answers always given, as letters by position, so one answer format fits every row.
"""

from __future__ import annotations

import re
import string

from irpo_pl.tasks.base import Task, load_rows, require_fields
from irpo_pl.tasks.gsm8k import answer_span

# Pang et al. 2024 (arXiv 2404.19733 v3), appendix B.1, word for word ("you’re" typeset from
# a typed "'"). The appendix shows the instruction, a blank line, "Question: [question here]", a
# blank line, then one "(A) [option A here]" line per option (it shows four and says questions
# have three to five), and "Solution:" run on after the last option with no blank line, so here
# on the line after it. Options are lettered by position, not by the row's labels (see above).
PROMPT = (
    "Your task is to answer the question below. Give step by step reasoning before you answer, "
    'and when you\'re ready to answer, conclude using the format "Final answer: (insert letter here)"\n\n'
    "Question: {question}\n\n"
    "{options}\n"
    "Solution:"
)

LETTERS = string.ascii_uppercase
# An option letter standing alone ("(B)", "B.", "B"), not one inside a word or code like "B12".
# ARC has at most 5 options.
LETTER = re.compile(r"(?<![\w'])\(?([A-E])\)?(?![\w'])")


def option_letter(text: str, last: bool = False) -> str | None:
    """The first (or last) standalone option letter in `text`, or None."""
    letters = LETTER.findall(text)
    if not letters:
        return None
    return letters[-1] if last else letters[0]


def _option_labels(choices: object, where: str) -> list:
    """The option labels of a row's `choices`, after checking it lists 2 to 5 options, each with a text."""
    texts = choices.get("text") if isinstance(choices, dict) else None
    labels = choices.get("label") if isinstance(choices, dict) else None
    if not (isinstance(texts, list) and isinstance(labels, list) and len(texts) == len(labels)):
        raise ValueError(f"{where}: field 'choices' must hold lists 'text' and 'label' of the same length")
    if not 2 <= len(labels) <= 5:
        raise ValueError(f"{where}: field 'choices' has {len(labels)} options; expected 2 to 5")
    return labels


class ArcChallengeTask(Task):
    """AI2 ARC (Clark et al. 2018): rows have `question`, `choices` {`text`, `label`} and `answerKey`."""

    name = "arc_challenge"

    def __init__(
        self,
        data_dir: str | None = None,
        hub_id: str = "allenai/ai2_arc",
        hub_config: str = "ARC-Challenge",
        train_hub_configs: tuple[str, ...] | None = None,
    ) -> None:
        """`train_hub_configs`: hub configs whose training splits together make `train`, e.g.
        ("ARC-Easy", "ARC-Challenge") as in the paper (section 3.2); by default `hub_config`'s alone."""
        self.data_dir = data_dir
        self.hub_id = hub_id
        self.hub_config = hub_config
        self.train_hub_configs = None if train_hub_configs is None else tuple(train_hub_configs)

    def load_split(self, split: str) -> list[dict]:
        configs = (self.hub_config,)
        if split == "train" and self.data_dir is None and self.train_hub_configs:
            configs = self.train_hub_configs
        rows = []
        for config in configs:
            config_rows, places = load_rows(self.data_dir, split, self.hub_id, config)
            for row, where in zip(config_rows, places):
                require_fields(row, where, ("question", "choices", "answerKey"))
                labels = _option_labels(row["choices"], where)
                if row["answerKey"] not in labels:
                    raise ValueError(f"{where}: field 'answerKey' {row['answerKey']!r} is not one of {labels}")
            rows.extend(config_rows)
        return rows

    def prompt(self, example: dict) -> str:
        options = "\n".join(f"({letter}) {text}" for letter, text in zip(LETTERS, example["choices"]["text"]))
        return PROMPT.format(question=example["question"], options=options)

    def gold_answer(self, example: dict) -> str:
        return LETTERS[example["choices"]["label"].index(example["answerKey"])]

    def extract_answer(self, completion: str) -> str | None:
        span = answer_span(completion)
        if span is not None:
            return option_letter(span)
        return option_letter(completion, last=True)
