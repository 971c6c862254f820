"""STaR (Zelikman et al. 2022): supervised fine-tuning on the model's own correct samples, one row per distinct one."""

from __future__ import annotations

from typing import ClassVar

from irpo_pl.objectives.base import TrainsOn
from irpo_pl.objectives.sft import SFT


class STaR(SFT):
    """SFT's loss, on other rows."""

    name: ClassVar[str] = "star"
    trains_on: ClassVar[TrainsOn] = "samples"
