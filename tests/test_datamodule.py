import pytest

from irpo_pl.datamodule import IRPODataModule
from irpo_pl.objectives import IRPO


def test_offline_rows_with_an_empty_completion_are_refused_naming_row_and_field(tmp_path):
    rows = [{"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 2]}, {"prompt_ids": [1], "chosen_ids": [6, 2], "rejected_ids": []}]
    with pytest.raises(ValueError, match=r"rows\[1\]: rejected_ids is empty"):
        IRPODataModule.from_rows(rows, batch_size=4, objective=IRPO(), out_dir=tmp_path)


def _prepared(tokenizer, gold_chains, needs_gold=(), **sampling):
    from irpo_pl.config import SamplingConfig, TaskConfig

    task = TaskConfig(name="toy", args={"num_train": 300, "num_test": 50}, gold_chains=gold_chains)
    data = IRPODataModule(task=task, sampling=SamplingConfig(**sampling))
    data.prepare_questions(tokenizer, list(needs_gold))
    return data


def test_gold_chains_keep_a_seed_set_and_the_iterations_sample_the_answer_only_rest(toy_policy):
    _, tokenizer = toy_policy
    data = _prepared(tokenizer, 40, questions_per_iteration=100)
    assert data.chain_questions == data.train_questions[:40]
    assert data.sampled_questions == data.train_questions[40:]
    assert [data.gold_chain(q) for q in data.chain_questions] == [q["answer"] for q in data.chain_questions]
    assert all(data.gold_chain(q) is None for q in data.sampled_questions)
    # Samples come from the answer-only questions, a fresh slice each iteration; gold SFT rows from the seed set.
    sampled_ids = {id(q) for q in data.sampled_questions}
    first, second = data.questions_for(1), data.questions_for(2)
    assert all(id(q) in sampled_ids for q in first + second) and not {id(q) for q in first} & {id(q) for q in second}
    assert data.questions_for(1, trains_on="gold") == data.chain_questions


def test_gold_joins_the_winners_only_of_questions_that_keep_their_chain(toy_policy, tmp_path):
    from irpo_pl.datamodule import DataPhase

    _, tokenizer = toy_policy
    data = _prepared(tokenizer, 40)
    questions = data.chain_questions[:2] + data.sampled_questions[:2]
    data.begin_phase(DataPhase(tmp_path, questions, IRPO(), batch_size=4, seed=0))
    prompts = [data.task.prompt(q) for q in questions]
    wrong = [["#### 99", "#### 98"] for _ in questions]
    pairs = data._pairs(prompts, wrong, [[0.0, 0.0] for _ in questions])
    assert {p["question_index"] for p in pairs} == {0, 1}
    assert {p["chosen"] for p in pairs} == {q["answer"] for q in questions[:2]}
    assert data.stats.dropped_all_wrong == 2


def test_without_gold_chains_every_question_keeps_its_chain_and_is_sampled(toy_policy):
    _, tokenizer = toy_policy
    data = _prepared(tokenizer, None)
    assert data.chain_questions == data.sampled_questions == data.train_questions
    assert all(data.gold_chain(q) == q["answer"] for q in data.train_questions)


def test_gold_chains_that_leave_nothing_to_train_on_are_refused_before_any_training(toy_policy):
    _, tokenizer = toy_policy
    usable = len(_prepared(tokenizer, None).train_questions)
    with pytest.raises(ValueError, match=f"gold_chains is {usable + 1}, but only {usable} usable training questions"):
        _prepared(tokenizer, usable + 1)
    with pytest.raises(ValueError, match="none is left for the iterations to sample"):
        _prepared(tokenizer, usable)
    with pytest.raises(ValueError, match="warm_start train on gold solutions, and data.task.gold_chains is 0"):
        _prepared(tokenizer, 0, needs_gold=["warm_start"])


def test_gold_solutions_longer_than_a_sample_may_be_are_reported(toy_policy, capsys):
    _, tokenizer = toy_policy
    data = _prepared(tokenizer, None, max_new_tokens=200)
    assert "longer than sampling.max_new_tokens" not in capsys.readouterr().out
    lengths = [len(tokenizer(q["answer"], add_special_tokens=False)["input_ids"]) for q in data.train_questions + data.test_questions]
    limit = sorted(lengths)[len(lengths) // 2]
    _prepared(tokenizer, None, max_new_tokens=limit)
    cut = sum(length > limit for length in lengths)
    assert 0 < cut < len(lengths)
    assert f"{cut} of {len(lengths)} gold solutions of task toy are longer than sampling.max_new_tokens={limit} tokens (the longest has {max(lengths)})" in capsys.readouterr().out
