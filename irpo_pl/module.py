"""The LightningModule: the policy, its optional frozen reference, and the training objective."""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torchmetrics import MeanMetric

from irpo_pl.allocator import keep_freed_memory
from irpo_pl.distributed import local_share, shard
from irpo_pl.logprobs import segment_logps
from irpo_pl.losses import irpo_loss, nll_loss

PREFERENCE_TAGS = ("logps_chosen", "logps_rejected", "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy", "nll", "dpo", "loss")


class IRPOModule(L.LightningModule):
    """Trains `policy` with DPO + alpha * NLL on pair batches, or with NLL alone on SFT batches.

    The reference is M_t, fixed for the whole iteration: either log-probs that came
    with the batch (computed once before training) or a frozen `reference` model.
    """

    def __init__(
        self,
        policy: nn.Module,
        beta: float = 0.1,
        alpha: float = 1.0,
        nll_normalization: str = "sequence",
        lr: float = 2e-5,
        warmup_ratio: float = 0.1,
        weight_decay: float = 0.0,
        reference: nn.Module | None = None,
        histogram_every: int = 10,
    ) -> None:
        super().__init__()
        # Before fit starts, so sampling, the reference pre-pass and training all reuse freed memory.
        keep_freed_memory()
        self.policy = policy
        self.reference = reference
        if reference is not None:
            reference.eval().requires_grad_(False)
        self.beta, self.alpha, self.nll_normalization = beta, alpha, nll_normalization
        self.lr, self.warmup_ratio, self.weight_decay = lr, warmup_ratio, weight_decay
        self.histogram_every = histogram_every
        # torchmetrics objects, so per-step values and epoch means reduce correctly across processes.
        self.train_metrics = nn.ModuleDict({tag: MeanMetric() for tag in PREFERENCE_TAGS})

    def configure_model(self) -> None:
        """Shard policy and reference with FSDP2 when the strategy gives a device mesh (ModelParallelStrategy)."""
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        mesh = self.trainer.strategy.device_mesh
        mixed = "bf16" in str(self.trainer.precision) and self.device.type == "cuda"
        shard(self.policy, mesh["data_parallel"], mixed)
        if self.reference is not None:
            shard(self.reference, mesh["data_parallel"], mixed)
        local, total = local_share(self.policy)
        print(f"irpo_pl: rank {self.global_rank} holds {local:,} of the policy's {total:,} parameters ({local / total:.1%})")

    def on_train_start(self) -> None:
        # from_pretrained returns models in eval mode; training runs in train mode whatever the source.
        self.policy.train()

    def training_step(self, batch: dict[str, torch.Tensor], batch_index: int) -> torch.Tensor:
        if "chosen_lengths" in batch:
            outputs = self._preference_step(batch)
        else:
            outputs = self._sft_step(batch)
        if not torch.isfinite(outputs["loss"]):
            # Raising before the optimizer step keeps the weights, and the last checkpoint, good.
            raise FloatingPointError(
                f"training loss is {outputs['loss'].item()} at step {self.global_step}; stopped before updating the weights. "
                "The last checkpoint is from before this step; a lower train.lr usually helps."
            )
        if self.logger is not None and "rewards_margin" in outputs and self.global_step % self.histogram_every == 0:
            # The experiment is a no-op off rank 0, so the histogram shows rank 0's share of the batch.
            self.logger.experiment.add_histogram("train/rewards_margin_histogram", outputs["rewards_margin"], self.global_step)
        for tag, value in outputs.items():
            metric = self.train_metrics[tag]
            metric(value.detach().float())
            self.log(f"train/{tag}", metric, on_step=True, on_epoch=False, prog_bar=tag == "loss")
        return outputs["loss"]

    def _preference_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        chosen, rejected = segment_logps(self.policy, batch, num_segments=2).unbind(1)
        if "reference_chosen_logps" in batch:
            reference_chosen, reference_rejected = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
        elif self.reference is not None:
            with torch.no_grad():
                reference_chosen, reference_rejected = segment_logps(self.reference, batch, num_segments=2).unbind(1)
        else:
            raise ValueError("preference batch has no reference log-probs and the module has no reference model")
        parts = irpo_loss(
            chosen, rejected, reference_chosen, reference_rejected, batch["chosen_lengths"], self.beta, self.alpha, self.nll_normalization
        )
        return {"logps_chosen": chosen.detach(), "logps_rejected": rejected.detach(), **parts}

    def _sft_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logps = segment_logps(self.policy, batch, num_segments=1).squeeze(1)
        loss = nll_loss(logps, batch["lengths"])
        return {"logps_chosen": logps.detach(), "nll": loss.detach(), "loss": loss}

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.policy.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_ratio * total)

        def warmup_then_cosine(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
