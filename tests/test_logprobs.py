import torch

from irpo_pl.data import PairPacker, SFTCollator
from irpo_pl.logprobs import prefix_sharing_mask, segment_logps, sum_logps_by_segment


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
