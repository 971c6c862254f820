import torch

from irpo_pl.logprobs import gather_completion_logps


def _naive(logits, ids, mask):
    """Loop over every row and position with a full log-softmax: slow, obviously right."""
    logps = torch.log_softmax(logits, dim=-1)
    totals = []
    for row in range(ids.shape[0]):
        total = 0.0
        for position in range(1, ids.shape[1]):
            if mask[row, position]:
                total += logps[row, position - 1, ids[row, position]].item()
        totals.append(total)
    return torch.tensor(totals)


def test_right_and_left_padding_match_naive():
    torch.manual_seed(0)
    vocab, width = 11, 9
    logits = torch.randn(4, width, vocab)
    ids = torch.randint(1, vocab, (4, width))
    mask = torch.zeros(4, width, dtype=torch.long)
    mask[0, 3:7] = 1  # right padding after position 7
    mask[1, 5:9] = 1  # left padding before the prompt, completion to the end
    mask[2, 1:2] = 1  # one completion token
    mask[3, 8:9] = 1
    assert torch.allclose(gather_completion_logps(logits, ids, mask), _naive(logits, ids, mask), atol=1e-5)


def test_padding_does_not_change_a_rows_value():
    torch.manual_seed(1)
    logits = torch.randn(1, 6, 7)
    ids = torch.randint(0, 7, (1, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]])
    padded_logits = torch.cat([torch.randn(1, 3, 7), logits], dim=1)
    padded_ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    padded_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), mask], dim=1)
    assert torch.allclose(gather_completion_logps(logits, ids, mask), gather_completion_logps(padded_logits, padded_ids, padded_mask))


def test_rows_without_completion_tokens_are_zero():
    logits = torch.randn(2, 4, 5)
    ids = torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0]])
    out = gather_completion_logps(logits, ids, mask)
    assert out[0].item() == 0.0 and out[1].item() < 0
