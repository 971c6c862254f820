"""IRPO (Pang et al. 2024): DPO on the model's own (correct, wrong) pairs plus alpha x NLL on the correct ones."""

from __future__ import annotations

from typing import ClassVar, Literal

from jsonargparse.typing import NonNegativeFloat, PositiveFloat

from irpo_pl.losses import irpo_loss
from irpo_pl.objectives.base import PairLogps, PairObjective


class IRPO(PairObjective):
    name: ClassVar[str] = "irpo"
    needs_reference: ClassVar[bool] = True

    def __init__(self, beta: PositiveFloat = 0.1, alpha: NonNegativeFloat = 1.0, nll_normalization: Literal["sequence", "token"] = "sequence") -> None:
        """
        Args:
            beta: Scale of the DPO margin (the paper: 0.1).
            alpha: Weight of the NLL term on the winners (the paper: 1).
            nll_normalization: sequence: each winner's NLL over its own length (the paper); token: over the batch's tokens (TRL).
        """
        self.beta, self.alpha, self.nll_normalization = beta, alpha, nll_normalization

    def loss(self, logps: PairLogps):
        return irpo_loss(
            logps.policy_chosen, logps.policy_rejected, logps.reference_chosen, logps.reference_rejected,
            logps.chosen_lengths, self.beta, self.alpha, self.nll_normalization,
        )
