"""The LightningModule: the policy, its optional frozen reference, and the training objective."""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from irpo_pl.allocator import keep_freed_memory
from irpo_pl.distributed import local_share, shard
from irpo_pl.logprobs import segment_logps
from irpo_pl.losses import irpo_loss, nll_loss
from irpo_pl.streams import interleave_back, run_streams, split_rows, usable_streams


class IRPOModule(L.LightningModule):
    """Trains `policy` with DPO + alpha * NLL on pair batches, or with NLL alone on SFT batches.

    The reference is M_t, fixed for the whole iteration: either log-probs that came
    with the batch (computed once before training) or a frozen `reference` model.
    On one CPU process each batch runs as `cpu_streams` row streams (streams.py).
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
        cpu_streams: int = 2,
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
        self.cpu_streams = cpu_streams
        self.streams_in_use = 1  # set when training starts, from the Trainer
        # The policy's per-stream log-probs of the current step, whose backward runs in `backward`.
        self._stream_outputs: list[torch.Tensor] | None = None

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
        self.streams_in_use = usable_streams(self.cpu_streams, self.trainer)

    def _logps(self, model: nn.Module, batch: dict[str, torch.Tensor], num_segments: int) -> torch.Tensor:
        """segment_logps, in row streams when there are rows enough; the policy's streams are kept for `backward`."""
        streams = min(self.streams_in_use, len(batch["input_ids"]))
        if streams < 2:
            return segment_logps(model, batch, num_segments)
        outputs = run_streams(lambda part: segment_logps(model, part, num_segments), split_rows(batch, streams), streams)
        if torch.is_grad_enabled():
            self._stream_outputs = outputs
        return interleave_back(outputs)

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """The loss is cheap to differentiate down to each stream's log-probs; from there the streams run the model's backward."""
        outputs, self._stream_outputs = self._stream_outputs, None
        if outputs is None:
            return super().backward(loss, *args, **kwargs)
        gradients = torch.autograd.grad(loss, outputs)
        run_streams(lambda pair: pair[0].backward(pair[1]), list(zip(outputs, gradients)), len(outputs))

    def training_step(self, batch: dict[str, torch.Tensor], batch_index: int) -> torch.Tensor:
        self._stream_outputs = None
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
        self._log_step(outputs, batch_size=len(batch["input_ids"]))
        return outputs["loss"]

    def _log_step(self, outputs: dict[str, torch.Tensor], batch_size: int) -> None:
        """Each tag's mean over the step's batch, all processes together (one small all-reduce, not one per tag).

        The scalars go to the loggers directly: `self.log` costs ~2 ms per tag and step
        (Lightning issue #20388), 3% of a CPU training step here for nine tags. Only the
        loss goes through it, for the progress bar.
        """
        tags = list(outputs)
        means = torch.stack([outputs[tag].detach().float().mean() for tag in tags])
        if self.trainer.world_size > 1:
            means = self.trainer.strategy.reduce(means, reduce_op="mean")
        self.log("train/loss", means[tags.index("loss")], on_step=True, on_epoch=False, prog_bar=True, logger=False, batch_size=batch_size)
        every = self.trainer.log_every_n_steps
        if self.loggers and every and (self.global_step + 1) % every == 0:
            scalars = {f"train/{tag}": value for tag, value in zip(tags, means.tolist())}
            for logger in self.loggers:
                logger.log_metrics(scalars, step=self.global_step)

    def _preference_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        chosen, rejected = self._logps(self.policy, batch, num_segments=2).unbind(1)
        if "reference_chosen_logps" in batch:
            reference_chosen, reference_rejected = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
        elif self.reference is not None:
            with torch.no_grad():
                reference_chosen, reference_rejected = self._logps(self.reference, batch, num_segments=2).unbind(1)
        else:
            raise ValueError("preference batch has no reference log-probs and the module has no reference model")
        parts = irpo_loss(
            chosen, rejected, reference_chosen, reference_rejected, batch["chosen_lengths"], self.beta, self.alpha, self.nll_normalization
        )
        return {"logps_chosen": chosen.detach(), "logps_rejected": rejected.detach(), **parts}

    def _sft_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logps = self._logps(self.policy, batch, num_segments=1).squeeze(1)
        loss = nll_loss(logps, batch["lengths"])
        return {"logps_chosen": logps.detach(), "nll": loss.detach(), "loss": loss}

    def configure_optimizers(self):
        parameters = list(self.policy.parameters())
        # One fused kernel per step instead of a loop over tensors (on CPU, the default): 3 ms against 12-17 ms here.
        fused = all(p.device.type in ("cpu", "cuda") for p in parameters)
        optimizer = torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay, fused=fused)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_ratio * total)

        def warmup_then_cosine(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
