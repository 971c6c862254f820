"""SFT on gold: supervised fine-tuning on the dataset's gold solutions of the iteration's questions (also the warm start)."""

from __future__ import annotations

from typing import ClassVar

from irpo_pl.losses import nll_loss
from irpo_pl.objectives.base import RowObjective, TrainsOn


class SFT(RowObjective):
    name: ClassVar[str] = "sft"
    trains_on: ClassVar[TrainsOn] = "gold"

    def loss(self, logps, lengths):
        loss = nll_loss(logps, lengths)
        return {"loss": loss, "nll": loss.detach()}
