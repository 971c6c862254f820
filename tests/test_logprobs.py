import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from irpo_pl.data import PairPacker, SeparatePairCollator, SFTCollator
from irpo_pl.layouts import decide_pair_layout
from irpo_pl.logprobs import (
    pair_token_logps,
    plain_token_logps,
    prefix_sharing_block_mask,
    prefix_sharing_mask,
    score_pairs,
    segment_logps,
    sum_logps_by_segment,
)


def _naive(logits, targets, segments, num_segments):
    """Loop over every row and position with a full log-softmax: slow, obviously right."""
    logps = torch.log_softmax(logits, dim=-1)
    totals = torch.zeros(logits.shape[0], num_segments)
    for row in range(targets.shape[0]):
        for position in range(targets.shape[1]):
            if segments[row, position]:
                totals[row, segments[row, position] - 1] += logps[row, position, targets[row, position]]
    return totals


def test_sums_by_segment_match_naive():
    torch.manual_seed(0)
    logits = torch.randn(3, 9, 11)
    targets = torch.randint(0, 11, (3, 9))
    segments = torch.tensor([[0, 0, 1, 1, 1, 0, 2, 2, 0], [0, 1, 0, 2, 2, 2, 2, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0]])
    out = sum_logps_by_segment(logits, targets, segments, 2)
    assert torch.allclose(out, _naive(logits, targets, segments, 2), atol=1e-5)
    assert out[2].tolist() == [0.0, 0.0]  # a row without targets sums to zero


def test_branches_see_the_prompt_and_their_own_tokens_only():
    # shared prompt (0, 0), chosen branch (1, 1, 1), rejected branch (2, 2), padding (-1)
    mask = prefix_sharing_mask(torch.tensor([[0, 0, 1, 1, 1, 2, 2, -1]]))[0, 0]
    assert mask[4].tolist() == [True, True, True, True, True, False, False, False]
    assert mask[6].tolist() == [True, True, False, False, False, True, True, False]
    assert mask.any(dim=1).all()  # no empty row, not even for padding


def _alone(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1], dim=-1)
    return logps.gather(-1, torch.tensor(completion).unsqueeze(-1)).sum().item()


@torch.no_grad()
def test_prefix_shared_pairs_score_like_each_completion_alone(toy_policy):
    model, tokenizer = toy_policy
    model.eval()
    rows = [
        {"prompt_ids": [1, 5, 6, 7], "chosen_ids": [8, 9, 2], "rejected_ids": [10, 2]},
        {"prompt_ids": [1, 6], "chosen_ids": [11, 2], "rejected_ids": [12, 13, 14, 15, 2]},
    ]
    packed = segment_logps(model, PairPacker(tokenizer.pad_token_id)(rows), num_segments=2)
    for row, (chosen, rejected) in zip(rows, packed.tolist()):
        assert abs(chosen - _alone(model, row["prompt_ids"], row["chosen_ids"])) < 1e-4
        assert abs(rejected - _alone(model, row["prompt_ids"], row["rejected_ids"])) < 1e-4
    sft = segment_logps(model, SFTCollator(tokenizer.pad_token_id)([{"prompt_ids": r["prompt_ids"], "completion_ids": r["chosen_ids"]} for r in rows]), 1)
    assert torch.allclose(sft[:, 0], packed[:, 0], atol=1e-4)


ROWS = [
    {"prompt_ids": [1, 5, 6, 7], "chosen_ids": [8, 9, 2], "rejected_ids": [10, 2]},
    {"prompt_ids": [1, 6], "chosen_ids": [11, 2], "rejected_ids": [12, 13, 14, 15, 2]},
    {"prompt_ids": [1, 9, 9, 9, 9, 4], "chosen_ids": [2], "rejected_ids": [5, 6, 2]},
]


@torch.no_grad()
def test_separate_rows_score_like_each_completion_alone_and_like_packed_rows(toy_policy):
    model, tokenizer = toy_policy
    model.eval()
    separate = segment_logps(model, SeparatePairCollator(tokenizer.pad_token_id)(ROWS), num_segments=2)
    packed = segment_logps(model, PairPacker(tokenizer.pad_token_id)(ROWS), num_segments=2)
    assert separate.shape == (3, 2)
    for row, (chosen, rejected) in zip(ROWS, separate.tolist()):
        assert abs(chosen - _alone(model, row["prompt_ids"], row["chosen_ids"])) < 1e-4
        assert abs(rejected - _alone(model, row["prompt_ids"], row["rejected_ids"])) < 1e-4
    assert torch.allclose(separate, packed, atol=1e-4)


@torch.no_grad()
def test_pair_token_logps_are_the_plain_per_token_logps_in_both_layouts(toy_policy):
    model, tokenizer = toy_policy
    model.eval()
    for collate in (PairPacker(tokenizer.pad_token_id), SeparatePairCollator(tokenizer.pad_token_id)):
        for row, (chosen, rejected) in zip(ROWS, pair_token_logps(model, collate(ROWS))):
            assert torch.allclose(chosen, plain_token_logps(model, row["prompt_ids"], row["chosen_ids"]), atol=1e-5)
            assert torch.allclose(rejected, plain_token_logps(model, row["prompt_ids"], row["rejected_ids"]), atol=1e-5)


def test_score_pairs_keeps_the_rows_order_and_the_model_mode_whatever_the_batching(toy_policy):
    model, tokenizer = toy_policy
    model.train()
    decide_pair_layout(model, "auto", max_row_tokens=16)
    one_by_one = score_pairs(model, ROWS, batch_size=1)
    assert model.training  # given back in train mode
    assert torch.allclose(one_by_one, score_pairs(model, list(reversed(ROWS)), batch_size=2).flip(0), atol=1e-5)
    assert torch.allclose(one_by_one, score_pairs(model, ROWS, batch_size=2, streams=2), atol=1e-5)
    model.eval()
    with torch.no_grad():
        for row, (chosen, rejected) in zip(ROWS, one_by_one.tolist()):
            assert abs(chosen - _alone(model, row["prompt_ids"], row["chosen_ids"])) < 1e-4
            assert abs(rejected - _alone(model, row["prompt_ids"], row["rejected_ids"])) < 1e-4


def test_the_flex_block_mask_is_the_prefix_sharing_mask():
    segments = torch.tensor([[0, 0, 1, 1, 1, 2, 2, -1], [1, 1, 2, 2, 2, -1, -1, -1]])
    block_mask = prefix_sharing_block_mask(segments)
    dense = create_mask(block_mask.mask_mod, 2, None, 8, 8, device="cpu")
    assert torch.equal(dense, prefix_sharing_mask(segments))


@pytest.mark.slow  # flex attention compiles its kernel on first use: ~30 s on one CPU core
def test_flex_attention_shares_prefixes_exactly_with_a_block_mask():
    # Forward only: torch 2.13's flex attention has no backward on CPU (NotImplementedError), in either layout.
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="flex_attention").eval()
    assert decide_pair_layout(model, "auto", max_row_tokens=16).name == "shared_prefix"
    scored = score_pairs(model, ROWS, batch_size=3)
    with torch.no_grad():
        for row, (chosen, rejected) in zip(ROWS, scored.tolist()):
            assert abs(chosen - _alone(model, row["prompt_ids"], row["chosen_ids"])) < 1e-4
            assert abs(rejected - _alone(model, row["prompt_ids"], row["rejected_ids"])) < 1e-4
