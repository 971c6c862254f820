"""The LightningModule: the policy, its optional frozen reference, the training objective, and evaluation by generation."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Literal

import lightning as L
import torch
from jsonargparse import lazy_instance
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torchmetrics import MeanMetric

from irpo_pl.config import PolicyConfig
from irpo_pl.adapters import LoraSettings, add_lora, adapter_state_dict, merge_adapter_and_restart, merged_state_dict
from irpo_pl.checkpointing import enable_activation_checkpointing
from irpo_pl.distributed import broadcast_object, full_state_dict, is_main_process, local_share, reshard, shard, shard_from_rank0
from irpo_pl.layouts import decide_pair_layout, set_pair_layout
from irpo_pl.layouts import summary as layout_summary
from irpo_pl.logprobs import segment_logps
from irpo_pl.metrics import TagMeans
from irpo_pl.models import load_policy
from irpo_pl.objectives import IRPO, Objective, PairLogps
from irpo_pl.streams import interleave_back, run_streams, split_rows, usable_streams


class IRPOModule(L.LightningModule):
    """Trains the policy with its objective (IRPO: DPO + alpha * NLL on pairs), and evaluates it by generating answers.

    The policy is loaded by `load_policy` (the loop does it once per run, so that the
    model persists from phase to phase) or handed over with `use_policy`. The reference is
    M_t, fixed for the whole iteration: log-probs that came with the batch (computed once
    before training) or a frozen copy of the policy (`reference: model`). On one CPU
    process each batch runs as `cpu_streams` row streams (streams.py).
    """

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        objective: Objective = lazy_instance(IRPO),
        lr: PositiveFloat = 2e-5,
        warmup_ratio: ClosedUnitInterval = 0.1,
        weight_decay: NonNegativeFloat = 0.0,
        reference: Literal["precomputed", "model"] = "precomputed",
        cpu_streams: Literal[1, 2] = 2,
        pair_layout: Literal["auto", "shared_prefix", "separate"] = "auto",
        activation_checkpointing: bool = False,
        lora: LoraSettings | None = None,
        histogram_every: PositiveInt = 10,
    ) -> None:
        """
        Args:
            policy: The model to train: where it comes from and how it is loaded.
            objective: What iterations 1..T train on and with which loss: IRPO (the paper's), DPO, SFT, STaR, SimPO, or a class path of your own.
            lr: Peak learning rate of each IRPO iteration (AdamW).
            warmup_ratio: Linear warmup over this share of each iteration's steps, then cosine decay.
            weight_decay: AdamW's weight decay.
            reference: precomputed: reference log-probs computed once from M_t after pairing, no second model in memory; model: a frozen copy of M_t.
            cpu_streams: On one CPU process, run each batch as this many row streams at once, each on its share of the cores: 2, or 1 (off). GPUs, DDP, FSDP and activation checkpointing use 1.
            pair_layout: How a pair is batched for scoring: shared_prefix (the prompt once, both completions after it: fewer tokens), separate (each completion after its own copy of the prompt), or auto: shared_prefix where the model scores it exactly (full attention; decided from its config, else measured on the model when it is loaded), separate otherwise (sliding windows shorter than a pair, ALiBi, recurrent layers, flash attention). An explicit shared_prefix where it is not exact is refused.
            activation_checkpointing: Recompute each decoder block's activations in the backward pass instead of keeping them (less memory, about a third more compute), in the policy's training forward only.
            lora: Train a LoRA adapter (pip install 'irpo_pl[lora]') instead of every weight; each iteration's adapter is folded into the weights before the next one samples, so M_{t+1} still starts from M_t and every saved model is a plain one.
            histogram_every: Log a histogram of the batch's reward margins every this many steps (TensorBoard).
        """
        super().__init__()
        self.policy_config = policy  # the default is a shared instance: read, never changed
        self.objective = objective
        # Plain floats: the parser's restricted number types would end up pickled in the optimizer's checkpointed state.
        self.lr, self.warmup_ratio, self.weight_decay = float(lr), float(warmup_ratio), float(weight_decay)
        self.reference_mode = reference
        self.cpu_streams = cpu_streams
        self.pair_layout = pair_layout
        self.activation_checkpointing = activation_checkpointing
        self.lora = lora
        self.histogram_every = histogram_every
        self.policy: nn.Module | None = None
        self.tokenizer = None
        self.reference: nn.Module | None = None
        # What the current phase trains with; begin_phase sets it, the warm start to SFT.
        self.phase_objective: Objective = objective
        self.phase_lr, self.phase_warmup_ratio = self.lr, self.warmup_ratio
        # Added to the Trainer's step when logging, so that a logger shared by every phase sees one rising step.
        self.step_offset = 0
        self.streams_in_use = 1  # set when training starts, from the Trainer
        # The policy's per-stream log-probs of the current step, whose backward runs in `backward`.
        self._stream_outputs: list[torch.Tensor] | None = None
        self.train_means: TagMeans | None = None
        self.eval_metrics = nn.ModuleDict({name: MeanMetric().set_dtype(torch.float64) for name in ("greedy", "vote", "selection")})
        self.eval_records: list[dict] = []
        self.eval_step: int | None = None
        self.selection_history: list[tuple[int, float]] = []
        """(step, greedy accuracy on the held-out questions) of each validation of the current phase."""
        self.devices: dict[str, str] = {}
        """Where the current phase trained and evaluated."""

    # ---- the policy -------------------------------------------------------------------------

    def load_policy(
        self, vocabulary: list[str] | None, max_positions: int, name_or_path: str | None = None, precision: str = "32-true",
        adapter_seed: int = 0, max_pair_tokens: int | None = None,
    ) -> None:
        """Load (or build) the policy and its tokenizer from `policy`, or from `name_or_path` (a saved iteration) instead.

        With `lora`, a fresh adapter drawn from `adapter_seed` (the seed of the phase that will
        train it) is added; with `activation_checkpointing`, its blocks are checkpointed. Under
        fsdp with several processes (the strategy has handed this module its device mesh), only
        rank 0 reads the weights; the others build the model on the meta device and receive their
        shards, so a node holds one copy of the weights at most, never one per process.

        Then, before any expensive work, the model is checked (a model that cannot be scored or
        batched is refused, naming what to set) and its pair layout decided for pairs of up to
        `max_pair_tokens` (pairs.max_length), on the process that holds the weights, and logged.
        """
        config = self.policy_config if name_or_path is None else replace(self.policy_config, name_or_path=name_or_path, gguf_file=None)
        mesh = self._device_mesh
        distributed = mesh is not None and mesh.size() > 1
        rank = torch.distributed.get_rank() if distributed else 0
        policy, tokenizer = load_policy(config, vocabulary, max_positions, on_meta=rank != 0)
        layout = _decided_on_rank0(lambda: decide_pair_layout(policy, self.pair_layout, max_pair_tokens), rank)
        set_pair_layout(policy, layout)
        if rank == 0:
            print(layout_summary(policy, layout, max_pair_tokens), flush=True)
        if self.lora is not None:
            add_lora(policy, self.lora, adapter_seed)  # before sharding, which must see the adapter's parameters
        if self.activation_checkpointing:
            enable_activation_checkpointing(policy)
        if distributed:
            shard_from_rank0(policy, mesh["data_parallel"], _mixed_precision(precision, mesh.device_type))
            if rank != 0:
                print(f"irpo_pl: rank {rank} built the policy on the meta device and received its shard from rank 0", flush=True)
        self.use_policy(policy, tokenizer)

    def use_policy(self, policy: nn.Module, tokenizer) -> None:
        self.policy, self.tokenizer = policy, tokenizer

    def end_phase(self, next_adapter_seed: int) -> dict | None:
        """Fold a trained LoRA adapter into the weights and restart it for the next phase (every process calls this).

        Returns the adapter alone, taken before folding, when `lora.save_adapter` asks for it.
        """
        if self.lora is None:
            return None
        adapter = adapter_state_dict(self.policy) if self.lora.save_adapter else None
        merge_adapter_and_restart(self.policy, next_adapter_seed)
        return adapter

    def weights_to_save(self) -> dict | None:
        """The policy's weights for save_pretrained, on rank 0: gathered if sharded (a collective), plain names if it has an adapter.

        None means the model's own state dict, as it is.
        """
        state = full_state_dict(self.policy)
        if self.lora is None or not is_main_process():
            return state
        return merged_state_dict(self.policy, state)

    def begin_phase(self, objective: Objective, lr: float, warmup_ratio: float, step_offset: int = 0) -> None:
        """Train the next fit with `objective` at peak `lr`; keep a frozen copy of M_t if it needs one and asked so."""
        self.phase_objective, self.phase_lr, self.phase_warmup_ratio = objective, float(lr), float(warmup_ratio)
        self.step_offset = step_offset
        self.selection_history = []
        self.devices = {}
        self.train_means = None
        self.reference = None
        if objective.needs_reference and self.reference_mode == "model":
            self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)

    def configure_model(self) -> None:
        """Shard policy and reference with FSDP2 when the strategy gives a device mesh (ModelParallelStrategy)."""
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        mesh = self.trainer.strategy.device_mesh
        mixed = _mixed_precision(self.trainer.precision, self.device.type)
        shard(self.policy, mesh["data_parallel"], mixed)
        if self.reference is not None:
            shard(self.reference, mesh["data_parallel"], mixed)
        if self.trainer.state.fn == "fit":
            local, total = local_share(self.policy)
            print(f"irpo_pl: rank {self.global_rank} holds {local:,} of the policy's {total:,} parameters ({local / total:.1%})")

    # ---- training ---------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        # from_pretrained returns models in eval mode; training runs in train mode whatever the source.
        self.policy.train()
        self.devices["training"] = str(self.device)
        # Two streams recomputing checkpointed blocks would share the CPU's random state (dropout) between threads.
        self.streams_in_use = 1 if self.activation_checkpointing else usable_streams(self.cpu_streams, self.trainer)

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
        if self.phase_objective.trains_on == "pairs":
            outputs = self._pair_step(batch)
        else:
            outputs = self._row_step(batch)
        if not torch.isfinite(outputs["loss"]):
            # Raising before the optimizer step keeps the weights, and the last checkpoint, good.
            raise FloatingPointError(
                f"training loss is {outputs['loss'].item()} at step {self.global_step}; stopped before updating the weights. "
                "The last checkpoint is from before this step; a lower learning rate usually helps."
            )
        self._log_step(outputs)
        return outputs["loss"]

    def _pair_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        chosen, rejected = self._logps(self.policy, batch, num_segments=2).unbind(1)
        logps = PairLogps(chosen, rejected, batch["chosen_lengths"], batch["rejected_lengths"])
        if self.phase_objective.needs_reference:
            if "reference_logps" in batch:
                logps.reference_chosen, logps.reference_rejected = batch["reference_logps"].values.to(chosen.dtype).unbind(1)
            elif self.reference is not None:
                with torch.no_grad():
                    logps.reference_chosen, logps.reference_rejected = self._logps(self.reference, batch, num_segments=2).unbind(1)
            else:
                raise ValueError("the objective needs reference log-probs: the batch has none and the module has no reference model")
        return {"logps_chosen": chosen.detach(), "logps_rejected": rejected.detach(), **self.phase_objective.loss(logps)}

    def _row_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logps = self._logps(self.policy, batch, num_segments=1).squeeze(1)
        return {"logps_chosen": logps.detach(), **self.phase_objective.loss(logps, batch["lengths"])}

    def _log_step(self, outputs: dict[str, torch.Tensor]) -> None:
        """Each tag's mean over the rows of every process since the last log (a torchmetrics metric), every log_every_n_steps.

        The scalars go to the loggers directly: `self.log` costs ~2 ms per tag and step
        (Lightning issue #20388). Only the loss goes through it, for the progress bar.
        """
        scalars = {tag: value for tag, value in outputs.items() if tag != "loss"} | {"loss": outputs["loss"].detach()}
        if self.train_means is None:
            self.train_means = TagMeans(sorted(scalars)).to(self.device)
        self.train_means.update(scalars)
        self.log("train/loss", outputs["loss"].detach(), on_step=True, on_epoch=False, prog_bar=True, logger=False, batch_size=len(outputs["logps_chosen"]))
        if self.logger is not None and "rewards_margin" in outputs and self.global_step % self.histogram_every == 0 and isinstance(self.logger, TensorBoardLogger):
            # The experiment is a no-op off rank 0, so the histogram shows rank 0's share of the batch.
            self.logger.experiment.add_histogram("train/rewards_margin_histogram", outputs["rewards_margin"], self.global_step + self.step_offset)
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:
            means = self.train_means.compute()  # every process takes part
            self.train_means.reset()
            for logger in self.loggers:
                logger.log_metrics({f"train/{tag}": value for tag, value in means.items()}, step=self.global_step + self.step_offset)

    def configure_optimizers(self):
        parameters = [p for p in self.policy.parameters() if p.requires_grad]
        # One fused kernel per step instead of a loop over tensors (on CPU, the default): 3 ms against 12-17 ms here.
        fused = all(p.device.type in ("cpu", "cuda") for p in parameters)
        optimizer = torch.optim.AdamW(parameters, lr=self.phase_lr, weight_decay=self.weight_decay, fused=fused)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.phase_warmup_ratio * total)

        def warmup_then_cosine(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- evaluation: greedy accuracy and maj@k, as Lightning's test loop -----------------------

    def on_test_epoch_start(self) -> None:
        self.devices["eval"] = str(self.device)
        for metric in self.eval_metrics.values():
            metric.reset()
        self.eval_records = []

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        completions, correct = self._score(batch, batch.kind)
        if batch.kind == "greedy" and not batch.filler:
            self.eval_records += [
                {"question_index": i, "completion": c, "reward": float(r)} for i, c, r in zip(batch.indices, completions, correct.tolist())
            ]

    def _score(self, batch, metric: str) -> tuple[list[str], torch.Tensor]:
        correct, completions = self.trainer.datamodule.score_eval_batch(self.policy, self.tokenizer, batch)
        self.eval_metrics[metric].update(correct, weight=torch.full_like(correct, 0.0 if batch.filler else 1.0))
        return completions, correct

    # Checkpoint selection during training: greedy accuracy on held-out training questions, as Lightning's validation loop.
    def on_validation_epoch_start(self) -> None:
        self.eval_metrics["selection"].reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._score(batch, "selection")

    def on_validation_epoch_end(self) -> None:
        reshard(self.policy)
        if self.eval_metrics["selection"].update_count == 0:
            return  # no held-out questions (data.eval.selection_questions 0): nothing to select on
        accuracy = self.eval_metrics["selection"].compute()
        self.selection_history.append((self.global_step, float(accuracy)))
        # ModelCheckpoint(monitor="val/accuracy") keeps the best step's weights.
        self.log("val/accuracy", accuracy, logger=False, sync_dist=True)  # the same on every process already
        for logger in self.loggers:
            logger.log_metrics({"val/accuracy": float(accuracy)}, step=self.global_step + self.step_offset)

    def on_test_epoch_end(self) -> None:
        reshard(self.policy)
        metrics = {"eval/accuracy": self.eval_metrics["greedy"].compute()}
        maj_k = self.trainer.datamodule.eval.maj_k
        if maj_k:
            metrics[f"eval/maj@{maj_k}"] = self.eval_metrics["vote"].compute()
        if self.eval_step is not None:
            metrics["step"] = float(self.eval_step)
        self.log_dict(metrics)
        if self.trainer.world_size > 1:
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, self.eval_records)
            self.eval_records = [record for part in gathered for record in part]
        self.eval_records.sort(key=lambda record: record["question_index"])


def _mixed_precision(precision, device_type: str) -> bool:
    """FSDP2's bf16 compute over float32 shards: on GPUs, with a bf16 precision setting."""
    return "bf16" in str(precision) and device_type == "cuda"


def _decided_on_rank0(decide, rank: int):
    """`decide()` on rank 0 (which holds the weights), its result or its error on every process, so none waits for a dead one."""
    outcome = None
    if rank == 0:
        try:
            outcome = ("ok", decide())
        except ValueError as error:
            outcome = ("error", error)
    status, value = broadcast_object(outcome)
    if status == "error":
        raise value
    return value
