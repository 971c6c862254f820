from hypothesis import given
from hypothesis import strategies as st

from irpo_pl.pairing import build_pairs, walk_and_wrap


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
