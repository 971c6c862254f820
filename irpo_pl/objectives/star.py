"""STaR (Zelikman et al. 2022): supervised fine-tuning on the model's own correct samples, one row per distinct one."""

from __future__ import annotations

from typing import ClassVar

from irpo_pl.losses import nll_loss
from irpo_pl.objectives.base import RowObjective, TrainsOn


class STaR(RowObjective):
    name: ClassVar[str] = "star"
    trains_on: ClassVar[TrainsOn] = "samples"

    def loss(self, logps, lengths):
        loss = nll_loss(logps, lengths)
        return {"loss": loss, "nll": loss.detach()}
