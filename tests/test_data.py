import torch

from irpo_pl.data import PairPacker, SeparatePairCollator, SFTCollator, cut_after_divergence, length_grouped_order, tokenize_preference
from irpo_pl.models import build_word_tokenizer
from irpo_pl.streams import split_rows


def test_pairs_are_packed_as_prompt_then_chosen_branch_then_rejected_branch():
    rows = [
        {"prompt_ids": [1, 5], "chosen_ids": [6, 7, 2], "rejected_ids": [8, 2]},
        {"prompt_ids": [1], "chosen_ids": [9, 2], "rejected_ids": [6, 6, 2]},
    ]
    batch = PairPacker(pad_id=0)(rows)
    # The prompt's last token opens both branches, at the position where the prompt ends; EOS is a target, not an input.
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 5, 8], [1, 9, 1, 6, 6, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 1, 2], [0, 1, 0, 1, 2, 0]]
    assert batch["segment_ids"].tolist() == [[0, 1, 1, 1, 2, 2], [1, 1, 2, 2, 2, -1]]
    assert batch["target_ids"].tolist() == [[0, 6, 7, 2, 8, 2], [9, 2, 6, 6, 2, 0]]
    assert batch["target_segments"].tolist() == [[0, 1, 1, 1, 2, 2], [1, 1, 2, 2, 2, 0]]
    assert batch["chosen_lengths"].tolist() == [3, 2]
    assert batch["rejected_lengths"].tolist() == [2, 3]


def test_sft_batch_targets_only_the_completion():
    batch = SFTCollator(pad_id=0)([{"prompt_ids": [1, 4], "completion_ids": [5, 2]}, {"prompt_ids": [1], "completion_ids": [2]}])
    assert batch["input_ids"].tolist() == [[1, 4, 5], [1, 0, 0]]
    assert batch["target_ids"].tolist() == [[0, 5, 2], [2, 0, 0]]
    assert batch["target_segments"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["lengths"].tolist() == [2, 1]


def test_length_grouped_order_is_a_seeded_permutation_that_reduces_padding():
    torch.manual_seed(0)
    lengths = torch.randint(5, 100, (1000,)).tolist()
    order = length_grouped_order(lengths, batch_size=8, seed=3)
    assert sorted(order) == list(range(1000))
    assert order == length_grouped_order(lengths, batch_size=8, seed=3)
    assert order != length_grouped_order(lengths, batch_size=8, seed=4)

    def padded(o):
        return sum(max(lengths[i] for i in o[s : s + 8]) * len(o[s : s + 8]) for s in range(0, len(o), 8))

    assert padded(order) < 0.8 * padded(torch.randperm(1000).tolist())


PAIRS = [
    {"prompt_ids": [1, 5], "chosen_ids": [6, 7, 2], "rejected_ids": [8, 2], "reference_chosen_logps": -1.5, "reference_rejected_logps": -2.5},
    {"prompt_ids": [1], "chosen_ids": [9, 2], "rejected_ids": [6, 6, 2], "reference_chosen_logps": -3.0, "reference_rejected_logps": -4.0},
]


def test_separate_pairs_are_two_padded_rows_per_pair_each_the_prompt_then_one_completion():
    batch = SeparatePairCollator(pad_id=0)(PAIRS)
    # [pair, (chosen, rejected), token]: EOS is a target, not an input; padding sits at the end of each row.
    assert batch["input_ids"].tolist() == [[[1, 5, 6, 7], [1, 5, 8, 0]], [[1, 9, 0, 0], [1, 6, 6, 0]]]
    assert batch["attention_mask"].tolist() == [[[1, 1, 1, 1], [1, 1, 1, 0]], [[1, 1, 0, 0], [1, 1, 1, 0]]]
    assert batch["target_ids"].tolist() == [[[0, 6, 7, 2], [0, 8, 2, 0]], [[9, 2, 0, 0], [6, 6, 2, 0]]]
    assert batch["target_segments"].tolist() == [[[0, 1, 1, 1], [0, 2, 2, 0]], [[1, 1, 0, 0], [2, 2, 2, 0]]]


def test_both_pair_layouts_carry_completion_lengths_and_reference_logps():
    for collate in (PairPacker(pad_id=0), SeparatePairCollator(pad_id=0)):
        batch = collate(PAIRS)
        assert batch["chosen_lengths"].tolist() == [3, 2]
        assert batch["rejected_lengths"].tolist() == [2, 3]
        assert batch["reference_logps"].values.tolist() == [[-1.5, -2.5], [-3.0, -4.0]]
        assert batch["reference_logps"].values.dtype == torch.float64
    assert "reference_logps" not in SeparatePairCollator(pad_id=0)([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in PAIRS])


def test_row_streams_split_a_separate_batch_into_whole_pairs():
    batch = SeparatePairCollator(pad_id=0)(PAIRS + PAIRS[:1])
    first, second = split_rows(batch, 2)
    assert first["input_ids"].shape == (2, 2, 4) and second["input_ids"].shape == (1, 2, 4)
    assert torch.equal(second["input_ids"][0], batch["input_ids"][1])  # pair 1, both of its rows
    assert first["rejected_lengths"].tolist() == [2, 2] and second["rejected_lengths"].tolist() == [3]


def test_a_rejected_completion_is_cut_the_given_tokens_past_where_it_leaves_the_chosen_one():
    assert cut_after_divergence([5, 6, 7, 8, 2], [5, 6, 9, 9, 9, 2], keep=1) == [5, 6, 9]
    assert cut_after_divergence([5, 6, 7, 8, 2], [5, 6, 9, 9, 9, 2], keep=3) == [5, 6, 9, 9, 9]
    assert cut_after_divergence([5, 6, 7, 8, 2], [9, 2], keep=1) == [9]
    # A loser that stops inside the winner keeps all of itself.
    assert cut_after_divergence([5, 6, 7, 8, 2], [5, 6], keep=2) == [5, 6]
    tokenizer = build_word_tokenizer(["Q", "a", "b", "c", "d", "x", "y", "z"])
    row = {"prompt": "Q", "chosen": "a b c d", "rejected": "a b x y z"}
    (whole,), _ = tokenize_preference(tokenizer, [row], max_length=64)
    (cut,), _ = tokenize_preference(tokenizer, [row], max_length=64, rejected_tokens_after_divergence=1)
    assert cut["chosen_ids"] == whole["chosen_ids"] and cut["prompt_ids"] == whole["prompt_ids"]
    assert cut["rejected_ids"] == cut_after_divergence(whole["chosen_ids"], whole["rejected_ids"], 1)
    assert len(cut["rejected_ids"]) < len(whole["rejected_ids"])
