"""The IRPO objective: DPO on (winner, loser) pairs plus an NLL term on the winners."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def irpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    beta: float,
    alpha: float,
    nll_normalization: str = "sequence",
) -> dict[str, torch.Tensor]:
    """L = L_DPO + alpha * L_NLL, as in Pang et al. (2024), equation 1.

    The `*_logps` are per-sequence sums of completion-token log-probs, shape [B];
    `chosen_lengths` the chosen completions' token counts. The NLL term divides each
    winner's log-prob by its own length, then averages over the batch (the paper's
    form, `nll_normalization="sequence"`); `"token"` divides the batch's summed
    log-prob by the batch's token count instead, as TRL's "sft" term does.
    alpha = 0 is plain DPO. Returns the loss under "loss" and the detached parts.
    """
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
    margins = chosen_rewards - rejected_rewards
    dpo = -F.logsigmoid(margins).mean()
    lengths = chosen_lengths.to(policy_chosen_logps.dtype)
    if nll_normalization == "sequence":
        nll = (-policy_chosen_logps / lengths).mean()
    elif nll_normalization == "token":
        nll = -policy_chosen_logps.sum() / lengths.sum()
    else:
        raise ValueError(f"nll_normalization must be 'sequence' or 'token', not {nll_normalization!r}")
    return {
        "loss": dpo + alpha * nll,
        "dpo": dpo.detach(),
        "nll": nll.detach(),
        "rewards_chosen": chosen_rewards.detach(),
        "rewards_rejected": rejected_rewards.detach(),
        "rewards_margin": margins.detach(),
        "rewards_accuracy": (margins > 0).to(margins.dtype).detach(),
    }


def nll_loss(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning: each sequence's mean token NLL, averaged over the batch."""
    return (-logps / lengths.to(logps.dtype)).mean()


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    gamma: float,
) -> dict[str, torch.Tensor]:
    """SimPO (Meng et al. 2024, equation 6): -log sigmoid(beta |w|^-1 log p(w|x) - beta |l|^-1 log p(l|x) - gamma).

    No reference: the rewards are beta x each completion's mean token log-prob.
    """
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype)
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths.to(policy_rejected_logps.dtype)
    margins = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(margins - gamma).mean()
    return {
        "loss": loss,
        "nll": (-policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype)).mean().detach(),
        "rewards_chosen": chosen_rewards.detach(),
        "rewards_rejected": rejected_rewards.detach(),
        "rewards_margin": margins.detach(),
        "rewards_accuracy": (margins > 0).to(margins.dtype).detach(),
    }
