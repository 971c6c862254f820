import torch

from irpo_pl.data import PairPacker, SFTCollator, length_grouped_order


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
