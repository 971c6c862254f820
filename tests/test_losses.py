import math

import pytest
import torch

from irpo_pl.losses import irpo_loss, nll_loss


def _hand_loss(pc, pr, rc, rr, lengths, beta, alpha):
    """The paper's equation, written out with floats one pair at a time."""
    dpo = [-math.log(1 / (1 + math.exp(-beta * ((a - c) - (b - d))))) for a, b, c, d in zip(pc, pr, rc, rr)]
    nll = [-a / n for a, n in zip(pc, lengths)]
    return sum(dpo) / len(dpo) + alpha * sum(nll) / len(nll)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.5])
def test_irpo_loss_matches_hand_computation(alpha):
    pc, pr, rc, rr = [-10.0, -30.0, -5.0], [-12.0, -20.0, -9.0], [-11.0, -29.0, -6.0], [-11.0, -21.0, -8.0]
    lengths = [5, 10, 2]
    out = irpo_loss(*(torch.tensor(x) for x in (pc, pr, rc, rr)), torch.tensor(lengths), beta=0.1, alpha=alpha)
    assert out["loss"].item() == pytest.approx(_hand_loss(pc, pr, rc, rr, lengths, 0.1, alpha), rel=1e-6)


def test_rewards_and_margins():
    out = irpo_loss(torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([1]), beta=0.5, alpha=1.0)
    assert out["rewards_chosen"].item() == pytest.approx(0.5)
    assert out["rewards_rejected"].item() == pytest.approx(-0.5)
    assert out["rewards_margin"].item() == pytest.approx(1.0)
    assert out["rewards_accuracy"].item() == 1.0


def test_nll_normalisation_sequence_vs_token():
    chosen = torch.tensor([-10.0, -2.0])
    lengths = torch.tensor([10, 1])
    zeros = torch.zeros(2)
    sequence = irpo_loss(chosen, zeros, zeros, zeros, lengths, beta=0.1, alpha=1.0, nll_normalization="sequence")
    token = irpo_loss(chosen, zeros, zeros, zeros, lengths, beta=0.1, alpha=1.0, nll_normalization="token")
    assert sequence["nll"].item() == pytest.approx((1.0 + 2.0) / 2)
    assert token["nll"].item() == pytest.approx(12.0 / 11)


def test_gradient_flows_only_through_policy_logps():
    policy = torch.tensor([-3.0, -4.0], requires_grad=True)
    out = irpo_loss(policy[:1], policy[1:], torch.tensor([-3.0]), torch.tensor([-4.0]), torch.tensor([3]), beta=0.1, alpha=1.0)
    out["loss"].backward()
    # At margin 0, d(-log sigmoid(beta m))/dm = -beta/2; NLL adds -1/|w| to the chosen side.
    assert policy.grad.tolist() == pytest.approx([-0.05 - 1 / 3, 0.05])


def test_nll_loss_is_mean_of_per_sequence_means():
    assert nll_loss(torch.tensor([-4.0, -9.0]), torch.tensor([2, 3])).item() == pytest.approx(2.5)
