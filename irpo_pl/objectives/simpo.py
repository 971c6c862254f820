"""SimPO (Meng, Xia and Chen 2024): a reference-free preference loss on length-normalised log-probs.

Its implicit reward is beta x the completion's mean token log-prob, and it asks the
chosen's to beat the rejected's by a margin gamma. No reference model or pre-pass.
"""

from __future__ import annotations

from typing import ClassVar

from jsonargparse.typing import NonNegativeFloat, PositiveFloat

from irpo_pl.losses import simpo_loss
from irpo_pl.objectives.base import PairLogps, PairObjective


class SimPO(PairObjective):
    name: ClassVar[str] = "simpo"
    needs_reference: ClassVar[bool] = False

    def __init__(self, beta: PositiveFloat = 2.0, gamma: NonNegativeFloat = 0.5) -> None:
        """
        Args:
            beta: Scale of the length-normalised reward (the SimPO paper: 2 to 2.5).
            gamma: Target reward margin between chosen and rejected.
        """
        self.beta, self.gamma = beta, gamma

    def loss(self, logps: PairLogps):
        return simpo_loss(logps.policy_chosen, logps.policy_rejected, logps.chosen_lengths, logps.rejected_lengths, self.beta, self.gamma)
