"""DPO only (Rafailov et al. 2023) on the model's own pairs: IRPO's loss without its NLL term."""

from __future__ import annotations

from typing import ClassVar

from jsonargparse.typing import PositiveFloat

from irpo_pl.losses import irpo_loss
from irpo_pl.objectives.base import PairLogps, PairObjective


class DPO(PairObjective):
    name: ClassVar[str] = "dpo"
    needs_reference: ClassVar[bool] = True

    def __init__(self, beta: PositiveFloat = 0.1) -> None:
        """
        Args:
            beta: Scale of the DPO margin.
        """
        self.beta = beta

    def loss(self, logps: PairLogps):
        # alpha 0: the NLL is computed only to be logged.
        return irpo_loss(
            logps.policy_chosen, logps.policy_rejected, logps.reference_chosen, logps.reference_rejected,
            logps.chosen_lengths, self.beta, alpha=0.0,
        )
