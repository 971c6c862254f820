"""GSM8K: loading and checking rows, the gold chain of thought as a completion, answer extraction."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from irpo_pl.pairing import build_pairs
from irpo_pl.tasks import get_task
from irpo_pl.tasks.gsm8k import GSM8KTask, normalize_number

ROW = {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
       "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72"}


@pytest.fixture(scope="module")
def task() -> GSM8KTask:
    return GSM8KTask()


@pytest.fixture(scope="module")
def all_rows(shared_data_dir) -> list[dict]:
    folder = shared_data_dir / "gsm8k"
    if not (folder / "train.jsonl").is_file():
        pytest.skip(f"GSM8K not found in {folder}")
    task = GSM8KTask(data_dir=str(folder))
    return task.load_split("train") + task.load_split("test")


def write_jsonl(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path.parent)


def test_registered():
    assert isinstance(get_task("gsm8k"), GSM8KTask)


def test_shared_data_is_all_of_gsm8k(all_rows):
    assert len(all_rows) == 7473 + 1319


def test_every_gold_solution_earns_its_reward(task, all_rows):
    failures = [row["answer"] for row in all_rows if task.reward(task.gold_solution(row), row) != 1.0]
    assert failures == []


def test_a_gold_solution_earns_nothing_once_the_gold_answer_changes(task, all_rows):
    for row in all_rows:
        reasoning, _, _ = row["answer"].rpartition("####")
        changed = {**row, "answer": f"{reasoning}#### {Decimal(task.gold_answer(row)) + 1}"}
        assert task.reward(task.gold_solution(row), changed) == 0.0, row["answer"]


def test_a_wrong_final_answer_earns_nothing(task):
    assert task.reward("48 + 24 = 72, so the total is 72.\nFinal answer: 73", ROW) == 0.0
    assert task.reward("Final answer: 72", ROW) == 1.0


# Appendix B.1 of Pang et al. 2024 (arXiv 2404.19733 v3), with its placeholder; see
# irpo_pl/tasks/gsm8k.py for how its layout is read.
PAPER_PROMPT = (
    "Your task is to answer the question below. Give step by step reasoning before you answer, and when "
    'you\'re ready to answer, please use the format "Final answer: ..."\n'
    "Question: [question here]\n"
    "Solution:"
)


def test_prompt_is_the_papers(task):
    assert task.prompt({"question": "[question here]", "answer": "#### 1"}) == PAPER_PROMPT


def test_gold_solution_reads_like_an_answer_to_the_prompt(task):
    assert task.gold_solution(ROW) == "In May she sold 48/2 = 24 clips.\nIn all 48+24 = 72 clips.\nFinal answer: 72"


def test_votes_count_numbers_however_written(task):
    row = {"question": "q", "answer": "So 1000.\n#### 1,000"}
    completions = ["Final answer: $1,000", "Final answer: 999", "Final answer: 1000.00", "Final answer: 999", "The answer is 1000 dollars"]
    assert task.majority_answer([task.extract_answer(c) for c in completions]) == "1000"
    assert task.vote_is_correct(completions, row)
    # 2 votes each: the answer seen first wins the tie.
    assert task.vote_is_correct(completions[:4], row)
    assert not task.vote_is_correct(completions[1:4] + completions[:1], row)


def test_with_the_gold_solution_in_the_winners_no_question_is_all_wrong(task, all_rows):
    # Every sample wrong, for 200 real questions: the gold solution is the one winner of each.
    rows = all_rows[:200]
    samples = [[f"Final answer: {Decimal(task.gold_answer(row)) + 1}"] * 3 for row in rows]
    rewards = [[task.reward(c, row) for c in completions] for completions, row in zip(samples, rows)]
    assert {r for scores in rewards for r in scores} == {0.0}
    prompts = [task.prompt(row) for row in rows]
    pairs, stats = build_pairs(prompts, samples, rewards, k=10, gold_solutions=[task.gold_solution(row) for row in rows])
    assert stats.dropped_all_wrong == 0 and stats.dropped_all_correct == 0
    assert [p["question_index"] for p in pairs] == list(range(len(rows)))
    assert all(task.reward(p["chosen"], rows[p["question_index"]]) == 1.0 for p in pairs)


def test_a_question_with_every_sample_right_gives_no_pair(task, all_rows):
    row = all_rows[0]
    samples = [[task.gold_solution(row), f"Final answer: {task.gold_answer(row)}"]]
    rewards = [[task.reward(c, row) for c in samples[0]]]
    assert rewards == [[1.0, 1.0]]
    pairs, stats = build_pairs([task.prompt(row)], samples, rewards, k=10, gold_solutions=[task.gold_solution(row)])
    assert pairs == [] and stats.dropped_all_correct == 1


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("So she earns $1,000.", "1000"),
        ("Final answer: $10.00", "10"),
        ("Final answer: 10.50 dollars", "10.5"),
        ("Final answer: -3", "-3"),
        ("Final answer: 50%", "50"),
        ("The answer is: 1,000 apples", "1000"),
        ("We get $\\boxed{42}$.", "42"),
        ("#### 7", "7"),
        ("**Final Answer:** 18", "18"),
        ("The final answer is 18.", "18"),
        ("Final answer:\n\n18", "18"),
        ("Final answer: 18\n\nQuestion: Tom has 42 apples.\nFinal answer: 42", "18"),
        ("The final answer is 15 gallons * 8 pints / gallon = 120 pints", "120"),
        ("Before the final answer, check 5 - 3 = 2 and 2 + 4 = 6", "6"),
        ("Final answer: eighteen\nShe has 18.", None),
        ("No numbers here.", None),
    ],
)
def test_extract_answer(task, completion, answer):
    assert task.extract_answer(completion) == answer


INTEGERS = st.integers(min_value=-(10**12), max_value=10**12)


@given(INTEGERS)
def test_formatting_of_an_integer_does_not_change_it(number):
    plain = normalize_number(str(number))
    assert plain == str(number)
    sign, digits = ("-" if number < 0 else ""), abs(number)
    writings = (f"{number:,}", f"{sign}${digits:,}", f"${number}", f"{number}.00", f"{number}%", f"{number:,} dollars")
    for written in writings:
        assert normalize_number(written) == plain, written


@given(st.decimals(min_value=-(10**6), max_value=10**6, places=2))
def test_trailing_zeros_of_a_decimal_do_not_matter(number):
    assert normalize_number(f"{number:.2f}") == normalize_number(f"{number:.2f}000")
    assert Decimal(normalize_number(f"{number:,.2f}")) == number


@given(INTEGERS, st.lists(INTEGERS, max_size=3), st.lists(INTEGERS, max_size=3),
       st.sampled_from(["Final answer: {}", "The answer is {}", "\\boxed{{{}}}", "#### {}"]))
def test_the_first_marker_wins_over_every_other_number(answer, before, after, marker):
    task = GSM8KTask()
    reasoning = "".join(f"We have {number} here.\n" for number in before)
    later = "".join(f"\n\nQuestion: what is {number}?\nFinal answer: {number}" for number in after)
    completion = reasoning + marker.format(answer) + later
    assert task.extract_answer(completion) == str(answer)


@given(st.lists(INTEGERS, min_size=1, max_size=5))
def test_without_a_marker_the_last_number_counts(numbers):
    completion = " and then ".join(f"{number:,} apples" for number in numbers)
    assert GSM8KTask().extract_answer(completion) == str(numbers[-1])


@pytest.mark.parametrize(
    ("lines", "where", "field"),
    [
        ([json.dumps(ROW), "", json.dumps({"answer": "#### 3"})], "line 3", "'question'"),
        ([json.dumps({"question": "q"})], "line 1", "'answer'"),
        ([json.dumps(ROW), json.dumps({"question": "q", "answer": "It is 3."})], "line 2", "'answer'"),
        ([json.dumps({"question": "q", "answer": "#### many"})], "line 1", "'answer'"),
    ],
)
def test_a_bad_row_is_an_error_naming_file_line_and_field(tmp_path, lines, where, field):
    data_dir = write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(ValueError, match="train.jsonl") as error:
        GSM8KTask(data_dir=data_dir).load_split("train")
    assert where in str(error.value) and field in str(error.value)


def test_parquet_files_load_and_are_checked(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([ROW, {"question": "q", "answer": "3"}]).to_parquet(tmp_path / "test.parquet")
    with pytest.raises(ValueError, match=r"test.parquet, row 2: field 'answer'"):
        GSM8KTask(data_dir=str(tmp_path)).load_split("test")
    datasets.Dataset.from_list([ROW]).to_parquet(tmp_path / "test.parquet")
    assert GSM8KTask(data_dir=str(tmp_path)).load_split("test") == [ROW]


def test_a_missing_split_names_the_files_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="validation.jsonl or validation.parquet"):
        GSM8KTask(data_dir=str(tmp_path)).load_split("validation")


def test_without_data_dir_the_hub_dataset_is_used(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list([ROW])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert GSM8KTask().load_split("test") == [ROW]
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"})]


def test_unparseable_gold_answers_can_be_skipped_and_counted(tmp_path, caplog):
    data_dir = write_jsonl(tmp_path / "train.jsonl", [json.dumps(ROW), json.dumps({"question": "q", "answer": "#### many"})])
    with caplog.at_level("WARNING"):
        rows = GSM8KTask(data_dir=data_dir, skip_bad_answers=True).load_split("train")
    assert rows == [ROW]
    assert "skipped 1 rows" in caplog.text and "line 2" in caplog.text
