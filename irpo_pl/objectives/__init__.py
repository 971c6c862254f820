"""Training objectives: IRPO (the paper's), DPO only, SFT on gold, STaR, and SimPO as a worked example of a new one.

Choose one in the config with `model.objective: DPO` (a class name here) or a class path
(`model.objective: my_pkg.objectives.MyObjective`), its arguments under `init_args`.
"""

from irpo_pl.objectives.base import Objective, PairLogps, PairObjective, RowObjective
from irpo_pl.objectives.dpo import DPO
from irpo_pl.objectives.irpo import IRPO
from irpo_pl.objectives.sft import SFT
from irpo_pl.objectives.simpo import SimPO
from irpo_pl.objectives.star import STaR

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (IRPO, DPO, SFT, STaR, SimPO)}

__all__ = ["DPO", "IRPO", "OBJECTIVES", "SFT", "Objective", "PairLogps", "PairObjective", "RowObjective", "STaR", "SimPO"]
