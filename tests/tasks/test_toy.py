import re

import pytest

from irpo_pl.tasks import get_task
from irpo_pl.tasks.toy import ORDINALS, ToyTask


def test_gold_solutions_score_one_and_altered_answers_zero(toy_task):
    for row in toy_task.load_split("train") + toy_task.load_split("test"):
        assert toy_task.reward(toy_task.gold_solution(row), row) == 1.0
        answer = int(toy_task.gold_answer(row))
        assert toy_task.reward(row["answer"].replace(f"#### {answer}", f"#### {answer + 1}"), row) == 0.0
        assert toy_task.reward("no answer here", row) == 0.0


def test_splits_are_disjoint_and_reproducible():
    a = ToyTask(num_train=200, num_test=100, seed=7)
    b = ToyTask(num_train=200, num_test=100, seed=7)
    assert a.load_split("train") == b.load_split("train")
    assert not {r["question"] for r in a.load_split("train")} & {r["question"] for r in a.load_split("test")}
    assert ToyTask(num_train=200, num_test=100, seed=8).load_split("train") != a.load_split("train")


def test_chain_of_thought_arithmetic_is_right_and_small(toy_task):
    for row in toy_task.load_split("train"):
        sums = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", row["answer"])
        assert sums
        for a, sign, b, result in sums:
            assert int(result) == (int(a) + int(b) if sign == "+" else int(a) - int(b))
            assert 0 <= int(result) <= 49 and 1 <= int(b) <= 9


def test_last_step_holds_the_answer(toy_task):
    for row in toy_task.load_split("test"):
        asked = row["question"].split(" does ")[-1].split()[0]
        last_step = row["answer"].split(" #### ")[0].rsplit(" : ", 1)[1]
        value = [part.split()[-1] for part in last_step.rstrip(" .").split(" , ") if part.startswith(asked + " ")]
        assert value == [toy_task.gold_answer(row)]


def test_vocabulary_covers_every_word(toy_task):
    vocabulary = set(toy_task.vocabulary())
    for row in toy_task.load_split("train"):
        assert set(toy_task.prompt(row).split()) <= vocabulary
        assert set(row["answer"].split()) <= vocabulary


def test_get_task_by_class_path():
    assert isinstance(get_task("irpo_pl.tasks.toy.ToyTask", num_train=10, num_test=10), ToyTask)


def test_shortcut_solutions_keep_the_questions_and_only_touch_train():
    worked = ToyTask(num_train=400, num_test=100, seed=7)
    mixed = ToyTask(num_train=400, num_test=100, seed=7, shortcut_fraction=0.5)
    assert [r["question"] for r in mixed.load_split("train")] == [r["question"] for r in worked.load_split("train")]
    assert mixed.load_split("test") == worked.load_split("test")
    shortcuts = [r for r in mixed.load_split("train") if r["answer"].startswith("####")]
    assert 150 < len(shortcuts) < 250
    for short, full in zip(mixed.load_split("train"), worked.load_split("train")):
        assert short["answer"] in (full["answer"], f"#### {mixed.gold_answer(full)}")
    with pytest.raises(ValueError, match="shortcut_fraction"):
        ToyTask(num_train=10, num_test=10, shortcut_fraction=1.5)


def test_ordinals_open_each_event_and_its_step_with_its_place():
    plain = ToyTask(num_train=200, num_test=50, seed=7, min_events=1, max_events=4)
    placed = ToyTask(num_train=200, num_test=50, seed=7, min_events=1, max_events=4, ordinals=True)
    vocabulary = set(placed.vocabulary())
    for before, row in zip(plain.load_split("train"), placed.load_split("train")):
        steps = row["answer"].split(" #### ")[0].split(" . ")
        assert [step.split(" , ")[0] for step in steps] == list(ORDINALS[: len(steps)])
        assert row["question"].count(" , ") == len(steps)
        # Same events, same numbers: only the ordinal words are new.
        assert re.sub(r"\b(?:" + "|".join(ORDINALS) + r") , ", "", row["answer"]) == before["answer"]
        assert set(placed.prompt(row).split()) | set(row["answer"].split()) <= vocabulary
    with pytest.raises(ValueError, match="ordinals go up to 8"):
        ToyTask(num_train=10, num_test=10, min_events=2, max_events=9, ordinals=True)


def test_name_the_answer_ends_with_whose_count_is_asked(toy_task):
    named = ToyTask(num_train=300, num_test=50, name_the_answer=True)
    for row, before in zip(named.load_split("test"), toy_task.load_split("test")):
        asked = row["question"].split(" does ")[-1].split()[0]
        assert row["answer"] == before["answer"].replace(" #### ", f" {asked} has {named.gold_answer(row)} . #### ")
        assert named.reward(row["answer"], row) == 1.0


def test_actor_first_writes_the_actor_before_the_other_holder():
    fixed = ToyTask(num_train=200, num_test=50, seed=7, min_events=1, max_events=3)
    actor_first = ToyTask(num_train=200, num_test=50, seed=7, min_events=1, max_events=3, actor_first=True)
    for before, row in zip(fixed.load_split("train"), actor_first.load_split("train")):
        assert row["question"] == before["question"] and actor_first.gold_answer(row) == fixed.gold_answer(before)
        for step, step_before in zip(row["answer"].split(" . "), before["answer"].split(" . ")):
            if " : " not in step:
                continue
            event, updates = step.split(" : ")
            holders = [update.split()[0] for update in updates.split(" , ")]
            assert holders[0] == event.split()[0]
            assert sorted(updates.split(" , ")) == sorted(step_before.split(" : ")[1].split(" , "))


def test_ask_both_asks_and_scores_both_holders_counts():
    one = ToyTask(num_train=200, num_test=50, seed=7, min_events=1, max_events=3, name_the_answer=True)
    both = ToyTask(num_train=200, num_test=50, seed=7, min_events=1, max_events=3, name_the_answer=True, ask_both=True)
    vocabulary = set(both.vocabulary())
    for row in both.load_split("train") + both.load_split("test"):
        first, second = row["question"].split(" do ")[-1].removesuffix(" have ?").split(" and ")
        # The last event's step ends with both holders' values: "Ann 5 - 3 = 2 , Bob 7 + 3 = 10".
        last_event = row["answer"].split(" . ")[-3].split(" : ")[1]
        values = {update.split()[0]: update.split()[-1] for update in last_event.split(" , ")}
        assert both.gold_answer(row) == f"{values[first]} , {values[second]}"
        assert row["answer"].endswith(f"{first} has {values[first]} , {second} has {values[second]} . #### {values[first]} , {values[second]}")
        assert both.reward(row["answer"], row) == 1.0
        wrong_second = row["answer"].replace(f"#### {values[first]} , {values[second]}", f"#### {values[first]} , {int(values[second]) + 1}")
        assert both.reward(wrong_second, row) == 0.0
        assert both.reward(f"#### {values[first]}", row) == 0.0
        assert set(both.prompt(row).split()) | set(row["answer"].split()) <= vocabulary
    # The single-answer task is unchanged by the option's existence.
    assert one.reward("Ann 3 . #### 5 , 7", {"answer": "#### 5"}) == 1.0
