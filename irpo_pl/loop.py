"""The outer loop: warm start, then sample -> pair -> train -> evaluate, iteration after iteration.

IRPOCLI's `fit` hands the parsed module, data module and options to `IterationLoop.fit`.
Each phase gets a fresh Trainer built from the config's `trainer` section (re-used fit
loops stop at once) around the same module and policy, so M_{t+1} starts from M_t's
weights. A run directory that already holds finished iterations is resumed after the last one.
"""

from __future__ import annotations

import html
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import lightning as L
from datasets import load_from_disk
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from irpo_pl.config import WarmStartConfig
from irpo_pl.datamodule import DataPhase, IRPODataModule, save_dataset
from irpo_pl.adapters import save_adapter, trainable_parameters
from irpo_pl.distributed import barrier, broadcast_object, is_main_process
from irpo_pl.module import IRPOModule
from irpo_pl.objectives import SFT
from irpo_pl.run_dir import open_run_dir, save_model, write_json
from irpo_pl.sampling_vllm import require_vllm


@dataclass
class LoopOptions:
    """The loop's own options, the top-level ones of `fit`."""

    iterations: int
    run_dir: str | None
    overwrite: bool
    warm_start: WarmStartConfig
    checkpoint_every: int
    seed: int
    temperatures: list[float]
    max_steps: int
    max_epochs: int | None
    precision: str = "32-true"


class IterationLoop:
    """Runs (or resumes) every phase of a run around one module and data module.

    `make_trainer(**overrides)` builds a Trainer from the parsed `trainer` section (LightningCLI's
    instantiate_trainer); `loggers` are the user's own (`--trainer.logger`), or None for the default
    TensorBoard logs under the run directory; `callbacks` the user's `--trainer.callbacks`;
    `config` the parsed config as a dict and `write_config(path)` saves it as LightningCLI does.
    """

    def __init__(
        self,
        module: IRPOModule,
        data: IRPODataModule,
        options: LoopOptions,
        make_trainer: Callable[..., L.Trainer],
        loggers: list[Logger] | None,
        callbacks: list,
        config: dict,
        write_config: Callable[[Path], None],
    ) -> None:
        self.module, self.data, self.options = module, data, options
        self.make_trainer, self.user_loggers, self.user_callbacks = make_trainer, loggers, callbacks
        self.config, self.write_config = config, write_config
        self.run_dir: Path | None = None
        self.summary: list[dict] = []
        self.eval_logger: Logger | None = None
        self.steps_so_far = 0  # optimizer steps of all finished phases: the step of a shared logger
        self._best_checkpoint: ModelCheckpoint | None = None
        self.pending_weights: Path | None = None  # a selected step's checkpoint, loaded before the evaluation

    # ---- fit: the whole run -----------------------------------------------------------------

    def fit(self) -> Path:
        """Run (or resume) the warm start and the iterations; returns the run directory."""
        if self.data.sampling.backend == "vllm":
            require_vllm()  # fail now, not after the warm start
        self._open("runs/%Y%m%d-%H%M%S")
        self._check_schedule_unchanged()
        resume_from = self.run_dir / f"iteration_{self.summary[-1]['iteration']}" / "model" if self.summary else None
        L.seed_everything(self.options.seed, verbose=False)
        self._load(resume_from)
        if resume_from:
            say(f"irpo_pl: resuming {self.run_dir} after iteration {self.summary[-1]['iteration']} ({resume_from})")
        self.steps_so_far = sum(row.get("steps", 0) for row in self.summary)

        if not self.summary:
            warm = self.options.warm_start
            if warm.steps > 0:
                phase = DataPhase(self.run_dir / "iteration_0", self.data.chain_questions, SFT(), warm.batch_size, self.options.seed)
                steps, seconds = self._train(0, phase, warm.lr, warm.warmup_ratio, max_steps=warm.steps, max_epochs=-1)
                self._finish(0, "warm_start", {"num_rows": self.data.stats.rows, "steps": steps, "seconds": seconds, "devices": dict(self.module.devices)})
            else:
                self._finish(0, "base", {"seconds": {}})

        for iteration in range(self.summary[-1]["iteration"] + 1, self.options.iterations + 1):
            self._iteration(iteration)

        say(_table(self.summary))
        say(f"run directory: {self.run_dir.resolve()}")
        return self.run_dir

    def _iteration(self, iteration: int) -> None:
        """Sample, pair and train M_{t+1} from M_t (keeping the best step on held-out questions if asked); evaluate and save it."""
        objective = self.module.objective
        seed = self.options.seed * 1000 + iteration
        L.seed_everything(seed, verbose=False)
        temperature = self.options.temperatures[iteration - 1]
        phase = DataPhase(
            self.run_dir / f"iteration_{iteration}", self.data.questions_for(iteration, objective.trains_on), objective, self.data.batch_size, seed,
            temperature, precompute_reference=self.module.reference_mode == "precomputed",
        )
        selecting = bool(self.data.selection_questions)
        steps, seconds = self._train(iteration, phase, self.module.lr, self.module.warmup_ratio, self.options.max_steps, self.options.max_epochs, selecting)
        if is_main_process() and isinstance(self.eval_logger, TensorBoardLogger):
            _show_pairs(self.eval_logger, phase.out_dir / "pairs", iteration, self.data.eval.show_pairs)
        stats = asdict(self.data.stats)
        seconds.update(stats.pop("seconds"))
        rows_key = "num_pairs" if objective.trains_on == "pairs" else "num_rows"
        row = {rows_key: stats.pop("rows"), "steps": steps, "temperature": temperature, **stats, "seconds": seconds}
        row["devices"].update(self.module.devices)
        if selecting:
            row["selection"] = self._select(iteration, phase, row)
        self._finish(iteration, objective.name, row)

    def _select(self, iteration: int, phase: DataPhase, row: dict) -> dict:
        """The paper's checkpoint selection: the step with the best greedy accuracy on the held-out questions.

        Its weights become M_{t+1}; or, with data.eval.retrain_with_selection, M_t trains again for that many
        steps on pairs that include the held-out questions' (the paper's retrain), and that is kept.
        """
        best = self._best_checkpoint
        step = int(re.search(r"step=(\d+)", best.best_model_path).group(1))
        selection = {"step": step, "accuracy": float(best.best_model_score), "history": [list(h) for h in self.module.selection_history]}
        if not self.data.eval.retrain_with_selection:
            self.pending_weights = Path(best.best_model_path)
            return selection
        data = self.data
        self.module.load_policy(
            data.vocabulary(), data.pairs.max_length + data.sampling.max_new_tokens,
            str(self.run_dir / f"iteration_{iteration - 1}" / "model"), self.options.precision, adapter_seed=self._adapter_seed(iteration),
            max_pair_tokens=data.pairs.max_length,
        )
        retrain = DataPhase(
            phase.out_dir / "retrain", phase.questions + data.selection_questions, phase.objective, phase.batch_size, phase.seed,
            phase.temperature, phase.precompute_reference,
        )
        steps, seconds = self._train(iteration, retrain, self.module.lr, self.module.warmup_ratio, max_steps=step, max_epochs=self.options.max_epochs)
        rows_key = "num_pairs" if phase.objective.trains_on == "pairs" else "num_rows"
        row["seconds"].update({f"retrain_{key}": value for key, value in {**seconds, **self.data.stats.seconds}.items()})
        return {**selection, "retrained": True, "retrain_steps": steps, f"retrain_{rows_key}": self.data.stats.rows}

    # ---- test: evaluate a model without training ----------------------------------------------

    def test(self) -> Path:
        """Evaluate model.policy (a saved iteration's model, or a hub id) on the test split; returns the run directory."""
        self._open("runs/%Y%m%d-%H%M%S-test")
        if self.summary:
            raise ValueError(f"{self.run_dir} already holds results; choose another --run_dir or pass --overwrite true")
        L.seed_everything(self.options.seed, verbose=False)
        self._load(None)
        row = {"model": self.module.policy_config.name_or_path, "seconds": {}}
        row["seconds"]["eval"] = self._evaluate(0, row)
        row.update(iteration=0, kind="test")
        self.summary.append(row)
        if is_main_process():
            write_json(self.run_dir / "summary.json", {"iterations": self.summary})
        barrier()
        say(_phase_line(row))
        say(f"run directory: {self.run_dir.resolve()}")
        return self.run_dir

    # ---- the steps ----------------------------------------------------------------------------

    def _open(self, default_run_dir: str) -> None:
        """Decide the run directory on rank 0 and share it; open (or resume) it there, then let every process read it."""
        # Each process would pick its own timestamp; rank 0's is the run's.
        self.run_dir = Path(broadcast_object(self.options.run_dir or datetime.now().strftime(default_run_dir)))
        if is_main_process():
            self.summary = open_run_dir(self.run_dir, self.config, self.write_config, self.options.overwrite, main_process=True)
        barrier()
        if not is_main_process():
            self.summary = open_run_dir(self.run_dir, self.config, self.write_config, overwrite=False, main_process=False)
        self.eval_logger = TensorBoardLogger(self.run_dir, name="tensorboard", version="eval") if self.user_loggers is None else None

    def _load(self, resume_from: Path | None) -> None:
        """The policy (from a saved iteration when resuming) and the checked questions, before any expensive work."""
        data, module = self.data, self.module
        module.load_policy(
            data.vocabulary(), data.pairs.max_length + data.sampling.max_new_tokens, str(resume_from) if resume_from else None,
            self.options.precision, adapter_seed=self._adapter_seed(len(self.summary)), max_pair_tokens=data.pairs.max_length,
        )
        needs_gold = [name for name, used in (("warm_start.steps > 0", self.options.warm_start.steps > 0), (f"objective {module.objective.name}", module.objective.trains_on == "gold")) if used]
        data.prepare_questions(module.tokenizer, needs_gold if not self.summary else [], self.options.seed)
        if data.selection_questions and not (self.run_dir / "selection_questions").exists():
            save_dataset([{"prompt": data.task.prompt(question)} for question in data.selection_questions], self.run_dir / "selection_questions")
        trainable, total = trainable_parameters(module.policy)
        adapter = f" ({trainable:,} of them trainable: LoRA r={module.lora.r})" if module.lora else ""
        say(
            f"irpo_pl: {type(module.policy).__name__} with {total:,} parameters{adapter}; "
            f"task {data.task_config.name}: {len(data.train_questions)} train{_chains_note(data)}, {len(data.test_questions)} test questions; run dir {self.run_dir}"
        )

    def _loggers(self, iteration: int) -> list[Logger] | bool:
        """The phase's loggers: one TensorBoard run per iteration by default, side by side; else the user's, shared by all phases."""
        if self.user_loggers is None:
            return [TensorBoardLogger(self.run_dir, name="tensorboard", version=f"iteration_{iteration}")]
        return self.user_loggers or False

    def _train(
        self, iteration: int, phase: DataPhase, lr: float, warmup_ratio: float, max_steps: int, max_epochs: int | None, selecting: bool = False
    ) -> tuple[int, dict]:
        """One Lightning fit with a fresh Trainer, resumed from the phase's last checkpoint if there is one.

        `selecting` runs Lightning's validation loop on the held-out questions every
        data.eval.selection_every steps and keeps the best step's weights in a checkpoint.
        Returns the optimizer steps taken and the wall time of training proper.
        """
        self.data.begin_phase(phase)
        self.module.begin_phase(phase.objective, lr, warmup_ratio, step_offset=0 if self.user_loggers is None else self.steps_so_far)
        checkpoints = phase.out_dir / "checkpoints"
        callbacks = [ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=self.options.checkpoint_every, save_top_k=0, save_last=True)]
        validation = {"limit_val_batches": 0}
        if selecting:
            self._best_checkpoint = ModelCheckpoint(
                dirpath=checkpoints / "best", filename="{step}", monitor="val/accuracy", mode="max", save_top_k=1, save_weights_only=True,
            )
            callbacks.append(self._best_checkpoint)
            validation = {"val_check_interval": self.data.eval.selection_every, "check_val_every_n_epoch": None, "num_sanity_val_steps": 0}
        trainer = self.make_trainer(
            max_steps=max_steps,
            max_epochs=max_epochs,
            logger=self._loggers(iteration),
            callbacks=[*self.user_callbacks, *callbacks],
            # Not inference mode for validation: an FSDP2 model keeps the buffers it gathers, and training cannot reuse inference tensors.
            inference_mode=False,
            **validation,
        )
        last = checkpoints / "last.ckpt"
        if last.exists():
            say(f"irpo_pl: iteration {iteration}: resuming training from {last}")
        start = time.perf_counter()
        trainer.fit(self.module, datamodule=self.data, ckpt_path=last if last.exists() else None, weights_only=True)
        total = time.perf_counter() - start
        self.steps_so_far += trainer.global_step
        return trainer.global_step, {"training": total - sum(self.data.stats.seconds.values())}

    def _evaluate(self, iteration: int, row: dict) -> float:
        """Test accuracy (and maj@k) through Lightning's test loop; the greedy completions are saved beside the model."""
        start = time.perf_counter()
        loggers = [self.eval_logger] if self.eval_logger is not None else (self.user_loggers or False)
        # Not inference mode: an FSDP2 model keeps the buffers it gathers here, and training cannot reuse inference tensors.
        trainer = self.make_trainer(logger=loggers, callbacks=list(self.user_callbacks), inference_mode=False)
        self.module.eval_step = iteration if self.eval_logger is not None else self.steps_so_far
        # A selected checkpoint's weights are loaded into the policy first: they are M_{t+1}.
        weights, self.pending_weights = self.pending_weights, None
        trainer.test(self.module, datamodule=self.data, verbose=False, ckpt_path=weights, weights_only=True if weights else None)
        metrics = trainer.callback_metrics
        row.update(test_accuracy=float(metrics["eval/accuracy"]), test_questions=len(self.data.test_questions))
        row.setdefault("devices", {}).update(self.module.devices)
        maj_k = self.data.eval.maj_k
        if maj_k:
            row[f"test_maj@{maj_k}"] = float(metrics[f"eval/maj@{maj_k}"])
        save_dataset(self.module.eval_records, self.run_dir / f"iteration_{iteration}" / "test_completions")
        return time.perf_counter() - start

    def _finish(self, iteration: int, kind: str, row: dict) -> None:
        """Evaluate, then save the model and the summary row: only now is the iteration safe on disk."""
        row["seconds"]["eval"] = self._evaluate(iteration, row)
        row.update(iteration=iteration, kind=kind)
        folder = self.run_dir / f"iteration_{iteration}"
        adapter = self.module.end_phase(next_adapter_seed=self._adapter_seed(iteration + 1))  # LoRA: M_{t+1} is the folded weights
        state = self.module.weights_to_save()  # every process takes part in gathering a sharded model
        self.summary.append(row)
        if is_main_process():
            if adapter is not None:
                base = self.run_dir / f"iteration_{iteration - 1}" / "model" if iteration else self.module.policy_config.name_or_path
                save_adapter(adapter, self.module.lora, folder / "adapter", base_model_name_or_path=str(base))
            save_model(self.module.policy, self.module.tokenizer, folder / "model", state)
            write_json(self.run_dir / "summary.json", {"iterations": self.summary})
            # Its resumable checkpoints can go.
            for checkpoints in (Path("checkpoints"), Path("retrain") / "checkpoints"):
                shutil.rmtree(self.run_dir / f"iteration_{iteration}" / checkpoints, ignore_errors=True)
        barrier()
        say(_phase_line(row))

    def _adapter_seed(self, phase: int) -> int:
        """The seed of the LoRA adapter that phase `phase` trains (0: the warm start)."""
        return self.options.seed * 1000 + phase

    def _check_schedule_unchanged(self) -> None:
        temperatures = self.options.temperatures
        for row in self.summary:
            if "temperature" in row and row["temperature"] != temperatures[row["iteration"] - 1]:
                raise ValueError(
                    f"data.sampling.temperatures[{row['iteration'] - 1}] is {temperatures[row['iteration'] - 1]}, "
                    f"but iteration {row['iteration']} of this run directory sampled at {row['temperature']}"
                )


def say(message: str) -> None:
    """Print once, from the main process."""
    if is_main_process():
        print(message, flush=True)


def _show_pairs(logger: TensorBoardLogger, pairs_dir: Path, iteration: int, count: int) -> None:
    """A few of the iteration's pairs as TensorBoard text; <pre> keeps Markdown from reflowing them."""
    if count <= 0 or not pairs_dir.exists():
        return
    pairs = load_from_disk(str(pairs_dir))
    shown = pairs.select(range(0, len(pairs), max(1, len(pairs) // count))[:count])
    text = "\n\n".join(
        f"<pre>PROMPT:   {html.escape(p['prompt'])}\nCHOSEN:   {html.escape(p['chosen'])}\nREJECTED: {html.escape(p['rejected'])}</pre>"
        for p in shown
    )
    logger.experiment.add_text("pairs", text, global_step=iteration)


def _chains_note(data: IRPODataModule) -> str:
    """How many training questions keep their gold chain, when data.task.gold_chains limits them."""
    if data.task_config.gold_chains is None:
        return ""
    return f" ({len(data.chain_questions)} with a gold chain, {len(data.sampled_questions)} answer-only)"


def _phase_line(row: dict) -> str:
    devices = row.get("devices", {})
    seconds = ", ".join(f"{k} {v:.0f}s" + (f" on {devices[k]}" if k in devices else "") for k, v in row["seconds"].items())
    parts = [f"iteration {row['iteration']} ({row['kind']})"]
    if "num_pairs" in row:
        parts.append(
            f"{row['num_pairs']} pairs from {row['questions']} questions "
            f"(dropped: {row['dropped_all_correct']} all correct, {row['dropped_all_wrong']} all wrong, {row['dropped_too_long']} pairs too long)"
        )
    if row.get("sample_accuracy") is not None:
        parts.append(f"sample accuracy {row['sample_accuracy']:.1%}")
    if "selection" in row:
        selection = row["selection"]
        retrained = f", retrained {selection['retrain_steps']} steps with them" if selection.get("retrained") else ""
        parts.append(f"kept step {selection['step']} (held-out accuracy {selection['accuracy']:.1%}{retrained})")
    parts.append(f"test accuracy {row['test_accuracy']:.1%}")
    return " | ".join(parts + [seconds])


def _table(summary: list[dict]) -> str:
    lines = ["", "iteration  kind        pairs   test accuracy", "---------  ----------  ------  -------------"]
    for row in summary:
        lines.append(f"{row['iteration']:>9}  {row['kind']:<10}  {row.get('num_pairs', ''):>6}  {row['test_accuracy']:>13.1%}")
    return "\n".join(lines)
