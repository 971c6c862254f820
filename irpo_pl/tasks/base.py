"""What a reasoning task is: its data, how a question is put, how an answer is checked."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


class Task:
    """A dataset of questions with known answers, and the rule that scores a completion.

    Subclasses implement `load_split`, `prompt`, `gold_answer` and `extract_answer`;
    `gold_solution` is optional (tasks without a gold chain of thought return None), and
    `answers_match` where two different strings can be the same answer.
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

    def answers_match(self, answer: str, reference: str) -> bool:
        """Whether two answers as `extract_answer` and `gold_answer` give them are the same answer.

        The reward and the majority vote both use it, so a vote never splits answers that the
        reward counts as one. The default compares the normalised strings; tasks whose answers
        have many spellings (MATH's LaTeX) override it.
        """
        return answer == reference

    def reward(self, completion: str, example: dict) -> float:
        answer = self.extract_answer(completion)
        return float(answer is not None and self.answers_match(answer, self.gold_answer(example)))

    def majority_answer(self, answers: list[str | None]) -> str | None:
        """The answer most of `answers` give, grouped by `answers_match`; None if none gives one.

        A group is represented by its first-seen answer, a tie goes to the group seen first,
        and None does not vote. Identical strings are counted together first, and each other
        answer is compared with the groups' representatives only, so an expensive
        `answers_match` runs at most (distinct answers) x (groups) times, not k^2.
        """
        groups: list[list] = []  # [representative, votes], in order of first appearance
        for answer, votes in Counter(a for a in answers if a is not None).items():
            group = next((g for g in groups if self.answers_match(answer, g[0])), None)
            if group is None:
                groups.append([answer, votes])
            else:
                group[1] += votes
        # max keeps the first of equal maxima: the tie rule.
        return max(groups, key=lambda g: g[1])[0] if groups else None

    def vote_is_correct(self, completions: list[str], example: dict) -> bool:
        """maj@k for one question: whether the majority answer of `completions` matches the gold answer."""
        majority = self.majority_answer([self.extract_answer(c) for c in completions])
        return majority is not None and self.answers_match(majority, self.gold_answer(example))


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


def load_rows(data_dir: str | None, split: str, hub_id: str, hub_config: str | None) -> tuple[list[dict], list[str]]:
    """The rows of a split, and for each where it came from (e.g. "data/train.jsonl, line 3") for error messages.

    With `data_dir`, reads `<split>.jsonl` or `<split>.parquet` there; without, the split of the hub dataset.
    """
    if data_dir is None:
        import datasets  # only users of the hub need it imported

        rows = datasets.load_dataset(hub_id, hub_config, split=split).to_list()
        name = hub_id if hub_config is None else f"{hub_id} ({hub_config})"
        return rows, [f"{name}, split {split!r}, row {number}" for number in range(1, len(rows) + 1)]
    folder = Path(data_dir)
    jsonl, parquet = folder / f"{split}.jsonl", folder / f"{split}.parquet"
    if jsonl.is_file():
        with open(jsonl, encoding="utf-8") as handle:
            # read_jsonl skips blank lines; count them here so messages name the real line.
            lines = [number for number, line in enumerate(handle, start=1) if line.strip()]
        return read_jsonl(jsonl), [f"{jsonl}, line {number}" for number in lines]
    if parquet.is_file():
        import datasets

        rows = datasets.Dataset.from_parquet(str(parquet)).to_list()
        return rows, [f"{parquet}, row {number}" for number in range(1, len(rows) + 1)]
    raise FileNotFoundError(f"no {jsonl.name} or {parquet.name} in {folder}")


def require_fields(row: dict, where: str, fields: tuple[str, ...]) -> None:
    """Raise a ValueError naming the row's place and the first of `fields` it lacks."""
    for field in fields:
        if field not in row:
            raise ValueError(f"{where}: missing field {field!r}")
