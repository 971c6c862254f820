"""What a reasoning task is: its data, how a question is put, how an answer is checked."""

from __future__ import annotations

import json
from pathlib import Path


class Task:
    """A dataset of questions with known answers, and the rule that scores a completion.

    Subclasses implement `load_split`, `prompt`, `gold_answer` and `extract_answer`;
    `gold_solution` is optional (tasks without a gold chain of thought return None).
    Rows are dicts exactly as the dataset stores them.
    """

    name: str = "task"

    def load_split(self, split: str) -> list[dict]:
        raise NotImplementedError

    def prompt(self, example: dict) -> str:
        """The user-side text of the question, before any chat template."""
        raise NotImplementedError

    def gold_answer(self, example: dict) -> str:
        """The normalised final answer that a correct completion must reach."""
        raise NotImplementedError

    def gold_solution(self, example: dict) -> str | None:
        """A correct chain of thought written as a completion, or None if the data has none."""
        return None

    def extract_answer(self, completion: str) -> str | None:
        """The normalised final answer a completion gives, or None if it gives none."""
        raise NotImplementedError

    def reward(self, completion: str, example: dict) -> float:
        answer = self.extract_answer(completion)
        return float(answer is not None and answer == self.gold_answer(example))


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a jsonl file; a malformed row is an error naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {line_number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows
