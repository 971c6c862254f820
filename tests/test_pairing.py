import pytest
from hypothesis import given
from hypothesis import strategies as st

from irpo_pl.data import tokenize_preference
from irpo_pl.models import build_word_tokenizer
from irpo_pl.pairing import build_pairs, cap_pairs, walk_and_wrap


def test_walk_wraps_around_the_shorter_side():
    assert walk_and_wrap(["w1", "w2"], ["l1", "l2", "l3", "l4"], k=4) == [("w1", "l1"), ("w2", "l2"), ("w1", "l3"), ("w2", "l4")]


def test_walk_stops_at_k():
    assert walk_and_wrap(["w1", "w2", "w3"], ["l1", "l2", "l3"], k=2) == [("w1", "l1"), ("w2", "l2")]


def test_k_larger_than_both_sides_uses_each_sample_once_without_repeating_a_pair():
    assert walk_and_wrap(["w1"], ["l1", "l2", "l3"], k=10) == [("w1", "l1"), ("w1", "l2"), ("w1", "l3")]
    assert walk_and_wrap(["w1"], ["l1"], k=10) == [("w1", "l1")]


def test_empty_side_gives_no_pairs():
    assert walk_and_wrap([], ["l1"], k=3) == []
    assert walk_and_wrap(["w1"], [], k=3) == []


def test_build_pairs_counts_dropped_questions_and_adds_gold():
    pairs, stats = build_pairs(
        prompts=["q0", "q1", "q2"],
        samples=[["a", "b"], ["c", "c"], ["d", "e"]],
        rewards=[[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]],
        k=4,
        gold_solutions=["gold0", "gold1", "gold2"],
    )
    assert stats.dropped_all_correct == 1  # q1: every sample right, no loser
    assert stats.dropped_all_wrong == 0  # q2 has the gold solution as its winner
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("q0", "a", "b"),
        ("q0", "gold0", "b"),
        ("q2", "gold2", "d"),
        ("q2", "gold2", "e"),
    ]
    assert stats.pairs == 4


def test_without_gold_an_all_wrong_question_is_dropped():
    pairs, stats = build_pairs(["q"], [["x", "y"]], [[0.0, 0.0]], k=3)
    assert pairs == [] and stats.dropped_all_wrong == 1


@given(
    winners=st.lists(st.text(max_size=3), max_size=8, unique=True),
    losers=st.lists(st.text(max_size=3), max_size=8, unique=True),
    k=st.integers(min_value=1, max_value=20),
)
def test_walk_properties(winners, losers, k):
    pairs = walk_and_wrap(winners, losers, k)
    if not winners or not losers:
        assert pairs == []
        return
    assert len(pairs) == min(k, max(len(winners), len(losers)))
    assert len(set(pairs)) == len(pairs)
    assert all(w in winners and l in losers for w, l in pairs)
    # The walk uses the samples in order: the first len(pairs) of each side all appear.
    assert set(winners[: len(pairs)]) <= {w for w, _ in pairs}
    assert set(losers[: len(pairs)]) <= {l for _, l in pairs}


@given(
    rewards=st.lists(st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=6), min_size=1, max_size=6),
    k=st.integers(min_value=1, max_value=8),
)
def test_build_pairs_properties(rewards, k):
    samples = [[f"q{i}s{j}" for j in range(len(row))] for i, row in enumerate(rewards)]
    prompts = [f"q{i}" for i in range(len(rewards))]
    pairs, stats = build_pairs(prompts, samples, rewards, k)
    for pair in pairs:
        i = pair["question_index"]
        assert rewards[i][samples[i].index(pair["chosen"])] == 1.0
        assert rewards[i][samples[i].index(pair["rejected"])] == 0.0
    per_question = [sum(p["question_index"] == i for p in pairs) for i in range(len(prompts))]
    assert all(n <= k for n in per_question)
    assert stats.dropped_all_correct + stats.dropped_all_wrong == sum(n == 0 for n in per_question)


def _iteration(questions: int, k: int) -> list[dict]:
    """The pairs of an iteration in which every question has k winners and k losers."""
    samples = [[f"q{i}w{j}" for j in range(k)] + [f"q{i}l{j}" for j in range(k)] for i in range(questions)]
    rewards = [[1.0] * k + [0.0] * k for _ in range(questions)]
    pairs, _ = build_pairs([f"q{i}" for i in range(questions)], samples, rewards, k)
    return pairs


def test_cap_pairs_keeps_a_seeded_random_subset_in_order():
    pairs = _iteration(questions=7000, k=10)  # 70,000 pairs, the paper caps at ~60,000
    kept, dropped = cap_pairs(pairs, max_pairs=60_000, seed=0)
    assert len(kept) == 60_000 and dropped == 10_000
    position = {id(pair): index for index, pair in enumerate(pairs)}
    positions = [position[id(pair)] for pair in kept]
    assert positions == sorted(set(positions))  # distinct pairs, in the order they were built
    # About a seventh of each question's pairs go: random, not the last 10,000.
    assert {p["question_index"] for p in kept} >= set(range(6900, 7000))
    assert cap_pairs(pairs, 60_000, seed=0) == (kept, dropped)
    other, _ = cap_pairs(pairs, 60_000, seed=1)
    assert other != kept


def test_cap_pairs_leaves_a_small_iteration_alone():
    pairs = _iteration(questions=30, k=5)
    assert cap_pairs(pairs, max_pairs=None, seed=0) == (pairs, 0)
    assert cap_pairs(pairs, max_pairs=150, seed=0) == (pairs, 0)
    assert cap_pairs(pairs, max_pairs=149, seed=0)[1] == 1
    with pytest.raises(ValueError, match="pairs.max_pairs must be a positive number or null, got 0"):
        cap_pairs(pairs, max_pairs=0, seed=0)


def test_a_question_whose_samples_are_all_right_gives_no_pairs_even_with_gold():
    pairs, stats = build_pairs(["q"], [["a", "b"]], [[1.0, 1.0]], k=3, gold_solutions=["gold"])
    assert pairs == [] and stats.dropped_all_correct == 1 and stats.dropped_all_wrong == 0


def test_a_pair_too_long_for_the_context_is_dropped():
    tokenizer = build_word_tokenizer(["Question", "?", "yes", "no", "maybe"])
    rows = [
        {"prompt": "Question ?", "chosen": "yes", "rejected": "no"},
        {"prompt": "Question ?", "chosen": "yes", "rejected": "no no no maybe"},
        {"prompt": "Question ?", "chosen": "yes yes yes yes", "rejected": "no"},
    ]
    # BOS + 2 prompt tokens, then a branch and its EOS: 3 + 2 fits 5, 3 + 5 does not.
    kept, dropped = tokenize_preference(tokenizer, rows, max_length=5)
    assert dropped == 2 and len(kept) == 1
    assert tokenizer.decode(kept[0]["rejected_ids"], skip_special_tokens=True) == "no"
    # Each branch counts against the context on its own, not the two together.
    assert tokenize_preference(tokenizer, rows, max_length=8)[1] == 0
