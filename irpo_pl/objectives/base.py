"""What an objective is: the rows it trains on, whether it needs the reference's log-probs, and its loss.

An iteration's data module asks `trains_on` which rows to build; the module asks it
which step to run and calls `loss`. A new objective is one subclass in one file,
chosen in the config by class path (`model.objective: my_pkg.MyObjective`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

# pairs: (chosen, rejected) from the model's own samples; gold: the dataset's gold solutions;
# samples: the model's own correct samples, one row each.
TrainsOn = Literal["pairs", "gold", "samples"]


@dataclass
class PairLogps:
    """Summed completion log-probs of a batch of pairs, [B] each, and the completions' token counts."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    reference_chosen: torch.Tensor | None = None
    reference_rejected: torch.Tensor | None = None


class Objective:
    """Base class. `loss` returns a dict whose "loss" is the scalar to minimise; its other
    entries (detached, per row or scalar) are logged as train/<key>."""

    name: ClassVar[str] = "objective"
    """The kind of an iteration in summary.json."""
    trains_on: ClassVar[TrainsOn] = "pairs"
    needs_reference: ClassVar[bool] = False
    """Whether `loss` reads the reference's log-probs (computed once from M_t, or from a frozen copy)."""


class PairObjective(Objective):
    """Trains on (chosen, rejected) pairs."""

    trains_on: ClassVar[TrainsOn] = "pairs"

    def loss(self, logps: PairLogps) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class RowObjective(Objective):
    """Trains on single (prompt, completion) rows."""

    trains_on: ClassVar[TrainsOn] = "gold"

    def loss(self, logps: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """`logps` [B]: each row's summed completion log-prob; `lengths` [B]: its completion's token count."""
        raise NotImplementedError
