"""The per-step training scalars as one torchmetrics metric, right across processes (evaluation uses torchmetrics' MeanMetric)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class TagMeans(Metric):
    """The mean of each tag's values over every row given to `update`, on every process, since the last reset.

    One metric for all of a step's tags, so that computing them costs one synchronisation
    (two all-gathers: the sums and the counts), not one per tag. `update` every step and
    `compute` only when logging: that is all the per-step cost.
    """

    full_state_update = False

    def __init__(self, tags: list[str]) -> None:
        super().__init__()
        self.tags = list(tags)
        self.add_state("sums", torch.zeros(len(self.tags), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(len(self.tags), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: dict[str, torch.Tensor]) -> None:
        unknown = set(values) - set(self.tags)
        if unknown:
            raise KeyError(f"TagMeans got tags {sorted(unknown)} it was not built with ({self.tags})")
        for index, tag in enumerate(self.tags):
            if tag in values:
                value = values[tag].detach().to(dtype=torch.float64, device=self.sums.device)
                self.sums[index] += value.sum()
                self.counts[index] += value.numel()

    def compute(self) -> dict[str, float]:
        """Each tag seen since the last reset, with its mean; tags without values are left out."""
        means = (self.sums / self.counts.clamp(min=1)).tolist()
        return {tag: mean for tag, mean, count in zip(self.tags, means, self.counts.tolist()) if count > 0}

