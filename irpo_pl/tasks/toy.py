"""A synthetic, GSM8K-shaped word-problem task that needs no download.

Two people hold some items; a few events move items around; the question asks
how many one of them ends with (with `ask_both`, how many each of them ends with).
The gold chain of thought is a scratchpad: per event, the event restated, then both
holders' values after it, and at the end `#### <answer>` as in GSM8K. Every number
is one token and every sum stays small, so a small model's mistakes are about
reasoning (which holder an event touches, whether a phrase adds or subtracts,
which running value to carry forward), not arithmetic.

With `shortcut_fraction` > 0, that fraction of the training split's gold solutions
skip the work and give only `#### <answer>`, as many human-written solutions do.
A model trained on them learns two ways to answer: the worked one, which it can
carry out, and the bare guess, which it mostly cannot. More training on the same
gold leaves that habit mostly in place; learning from its own correct and wrong
samples can find out which way works.
"""

from __future__ import annotations

import random
import re

from irpo_pl.tasks.base import Task

NAMES = ("Ann", "Bob", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal")
ITEMS = ("apples", "coins", "cards", "pens", "shells", "stamps")
MAX_VALUE = 40
MAX_AMOUNT = 9

# Phrasings per kind of event; several words for the same operation make the
# model learn what a phrase means rather than match one verb.
GAIN = ("finds", "buys", "picks up")
LOSS = ("loses", "sells", "drops")
GIVE = ("gives", "hands")
TAKE = ("takes", "borrows")

# With `ordinals`, each event opens with its place, in the question and in the chain of thought.
ORDINALS = ("First", "Second", "Third", "Fourth", "Fifth", "Sixth", "Seventh", "Eighth")

_ANSWER = re.compile(r"####\s*(-?\d+)")
# With `ask_both` the answer is both holders' counts, "#### 7 , 12".
_BOTH_ANSWERS = re.compile(r"####\s*(-?\d+)\s*,\s*(-?\d+)")


def _event(rng: random.Random, values: dict[str, int], item: str, phrasings: int, actor_first: bool = False) -> tuple[str, str]:
    """One random event that keeps every value in [0, MAX_VALUE]; returns (sentence, chain-of-thought step).

    The step restates the event, then writes both holders' new values in a fixed
    order, so each step can be computed from the step before it: the model has to
    decide who the event touches and in which direction, then carry the rest.
    With `actor_first` the actor's value comes first instead (see `make_problem`).
    """
    holders = list(values)
    while True:
        actor = rng.choice(holders)
        other = holders[1 - holders.index(actor)]
        kind = rng.choice(("gain", "loss", "give", "take"))
        amount = rng.randint(1, MAX_AMOUNT)
        if kind == "gain" and values[actor] + amount <= MAX_VALUE:
            changes = {actor: +amount}
            event = f"{actor} {rng.choice(GAIN[:phrasings])} {amount}"
        elif kind == "loss" and values[actor] >= amount:
            changes = {actor: -amount}
            event = f"{actor} {rng.choice(LOSS[:phrasings])} {amount}"
        elif kind == "give" and values[actor] >= amount and values[other] + amount <= MAX_VALUE:
            changes = {actor: -amount, other: +amount}
            event = f"{actor} {rng.choice(GIVE[:phrasings])} {amount} {item} to {other}"
        elif kind == "take" and values[other] >= amount and values[actor] + amount <= MAX_VALUE:
            changes = {actor: +amount, other: -amount}
            event = f"{actor} {rng.choice(TAKE[:phrasings])} {amount} {item} from {other}"
        else:
            continue
        sentence = f"{event} {item} ." if kind in ("gain", "loss") else f"{event} ."
        updates = []
        for holder in (actor, other) if actor_first else holders:
            before = values[holder]
            delta = changes.get(holder, 0)
            values[holder] = before + delta
            if delta:
                updates.append(f"{holder} {before} {'+' if delta > 0 else '-'} {abs(delta)} = {values[holder]}")
            else:
                updates.append(f"{holder} {before}")
        return sentence, f"{event.split(f' {item} ')[0]} : {' , '.join(updates)} ."


def make_problem(
    rng: random.Random, min_events: int, max_events: int, phrasings: int, ordinals: bool = False, name_the_answer: bool = False,
    actor_first: bool = False, ask_both: bool = False,
) -> dict:
    """One question with its gold chain of thought, as a GSM8K-style row.

    With `ordinals`, the k-th event of the question and the k-th step of the solution both open
    with the k-th ordinal word ("Second , Bob loses 2 coins ."), so that the step can find its
    event by that word, as a model finds a key it has seen, instead of by counting sentences.
    With `name_the_answer`, the solution ends by saying whose count is asked ("Bob has 3 . #### 3"),
    so that the answer is read off the last step under a name, not picked between two numbers.
    With `actor_first`, each step writes the event's actor before the other holder (instead of the
    order the question introduced them in), so the sign of each update follows from the verb alone,
    and the model has to find each holder's current value by its name.
    With `ask_both`, the question asks for both holders' counts ("How many coins do Ann and Bob
    have ?", answered "#### 7 , 12"), so every update in the chain counts toward the reward: a
    sample cannot reach the right answer with a wrong update of the holder who is not asked.
    """
    first, second = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    values = {first: rng.randint(0, 19), second: rng.randint(0, 19)}
    sentences = [f"{first} has {values[first]} {item} .", f"{second} has {values[second]} {item} ."]
    steps = []
    for index in range(rng.randint(min_events, max_events)):
        sentence, step = _event(rng, values, item, phrasings, actor_first)
        place = f"{ORDINALS[index]} , " if ordinals else ""
        sentences.append(place + sentence)
        steps.append(place + step)
    if ask_both:
        sentences.append(f"How many {item} do {first} and {second} have ?")
        if name_the_answer:
            steps.append(f"{first} has {values[first]} , {second} has {values[second]} .")
        answer = f"{values[first]} , {values[second]}"
    else:
        asked = rng.choice((first, second))
        sentences.append(f"How many {item} does {asked} have ?")
        if name_the_answer:
            steps.append(f"{asked} has {values[asked]} .")
        answer = str(values[asked])
    return {"question": " ".join(sentences), "answer": " ".join(steps) + f" #### {answer}"}


def make_splits(
    num_train: int, num_test: int, seed: int, min_events: int, max_events: int, phrasings: int, shortcut_fraction: float = 0.0,
    ordinals: bool = False, name_the_answer: bool = False, actor_first: bool = False, ask_both: bool = False,
) -> dict[str, list[dict]]:
    """Disjoint train and test splits (no question text in both), the same for the same arguments."""
    rng = random.Random(seed)
    # Its own generator, so the questions are the same whatever the fraction.
    shortcut_rng = random.Random(f"{seed}-shortcut")
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {"test": [], "train": []}
    for split, size in (("test", num_test), ("train", num_train)):
        attempts = 0
        while len(splits[split]) < size:
            attempts += 1
            if attempts > 100 * (size + 10):
                raise ValueError(f"toy task: cannot draw {size} distinct {split} questions with these settings")
            row = make_problem(rng, min_events, max_events, phrasings, ordinals, name_the_answer, actor_first, ask_both)
            if row["question"] not in seen:
                seen.add(row["question"])
                if split == "train" and shortcut_rng.random() < shortcut_fraction:
                    row["answer"] = row["answer"][row["answer"].index("####") :]
                splits[split].append(row)
    return splits


class ToyTask(Task):
    """Items moving between two people; see the module docstring."""

    name = "toy"

    def __init__(
        self,
        num_train: int = 5000,
        num_test: int = 1000,
        seed: int = 1234,
        min_events: int = 3,
        max_events: int = 5,
        phrasings: int = 3,
        shortcut_fraction: float = 0.0,
        ordinals: bool = False,
        name_the_answer: bool = False,
        actor_first: bool = False,
        ask_both: bool = False,
    ) -> None:
        if not 1 <= min_events <= max_events:
            raise ValueError(f"toy task: need 1 <= min_events <= max_events, got {min_events} and {max_events}")
        if ordinals and max_events > len(ORDINALS):
            raise ValueError(f"toy task: ordinals go up to {len(ORDINALS)} events, got max_events {max_events}")
        if not 1 <= phrasings <= 3:
            raise ValueError(f"toy task: phrasings (words per operation) must be 1, 2 or 3, got {phrasings}")
        if not 0.0 <= shortcut_fraction <= 1.0:
            raise ValueError(f"toy task: shortcut_fraction must be in [0, 1], got {shortcut_fraction}")
        self._ask_both = ask_both
        self._splits = make_splits(
            num_train, num_test, seed, min_events, max_events, phrasings, shortcut_fraction, ordinals, name_the_answer, actor_first, ask_both
        )

    def load_split(self, split: str) -> list[dict]:
        if split not in self._splits:
            raise ValueError(f"toy task has splits {sorted(self._splits)}, not {split!r}")
        return self._splits[split]

    def prompt(self, example: dict) -> str:
        return f"Question : {example['question']} Answer :"

    def gold_solution(self, example: dict) -> str:
        return example["answer"]

    def gold_answer(self, example: dict) -> str:
        answer = self.extract_answer(example["answer"])
        if answer is None:
            expected = "'#### <number> , <number>'" if self._ask_both else "'#### <number>'"
            raise ValueError(f"toy row has no {expected} in its answer: {example['answer']!r}")
        return answer

    def extract_answer(self, completion: str) -> str | None:
        if self._ask_both:
            match = _BOTH_ANSWERS.search(completion)
            return f"{match.group(1)} , {match.group(2)}" if match else None
        match = _ANSWER.search(completion)
        return match.group(1) if match else None

    @staticmethod
    def vocabulary() -> list[str]:
        """Every word the task can produce, so a word-level tokenizer covers all of it."""
        words = {"Question", "Answer", ":", ".", ",", "?", "+", "-", "=", "####", "has", "How", "many", "does", "do", "and", "have", "to", "from"}
        words.update(NAMES, ITEMS, GAIN, LOSS, GIVE, TAKE, ORDINALS)
        words = {part for word in words for part in word.split()}
        words.update(str(number) for number in range(MAX_VALUE + MAX_AMOUNT + 1))
        return sorted(words)
