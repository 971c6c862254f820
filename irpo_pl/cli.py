"""`python -m irpo_pl fit --config configs/toy.yaml`: Lightning's CLI, whose `fit` runs the iterations.

IRPOCLI is a LightningCLI: `--print_config`, `--seed_everything`, `--trainer.*` (loggers and
callbacks by class path included), `--model.class_path` / `--data.class_path` for subclasses of
IRPOModule and IRPODataModule, and the config saved in the run directory all work as Lightning
users expect. What differs is what its subcommands run:

- `fit` runs the warm start and the iterations (loop.IterationLoop), each phase on a fresh
  Trainer built from the `trainer` section (LightningCLI.instantiate_trainer);
- `test` evaluates `model.policy` (a saved model or a hub id) on the task's test split.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from jsonargparse import set_parsing_settings
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

from irpo_pl.allocator import keep_freed_memory
from irpo_pl.config import WarmStartConfig
from irpo_pl.datamodule import IRPODataModule
from irpo_pl.distributed import resolve_strategy
from irpo_pl.loop import IterationLoop, LoopOptions
from irpo_pl.module import IRPOModule
from irpo_pl.streams import usable_streams

# Lightning's defaults that the loop needs otherwise: one device unless asked, one epoch per
# iteration unless max_steps says more, a scalar every step, no model table in every phase.
TRAINER_DEFAULTS = {"devices": 1, "max_epochs": 1, "log_every_n_steps": 1, "enable_model_summary": False}


class IRPOCLI(LightningCLI):
    """LightningCLI with IRPO's options and a `fit` that loops over iterations."""

    def __init__(self, args=None, run: bool = True, **kwargs) -> None:
        kwargs = {
            "model_class": IRPOModule,
            "datamodule_class": IRPODataModule,
            "subclass_mode_model": True,
            "subclass_mode_data": True,
            "seed_everything_default": 0,
            "trainer_defaults": TRAINER_DEFAULTS,
            # The loop saves the config once, in the run directory, not in every phase's log folder.
            "save_config_callback": None,
            # Each phase builds its own AdamW and schedule (the warm start's differ from the iterations').
            "auto_configure_optimizers": False,
            **kwargs,
        }
        super().__init__(args=args, run=run, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            # A run resumes from its run directory, not from --ckpt_path.
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule", "ckpt_path", "weights_only"},
            "test": {"model", "dataloaders", "datamodule", "ckpt_path", "weights_only", "verbose"},
        }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--iterations", type=NonNegativeInt, default=3, help="IRPO iterations after iteration 0 (the warm start, or the base model).")
        parser.add_argument("--run_dir", type=str | None, default=None, help="Where the run writes everything; default runs/<timestamp>. An existing one is resumed.")
        parser.add_argument("--overwrite", type=bool, default=False, help="Delete an existing run_dir and start over instead of resuming it.")
        parser.add_argument(
            "--checkpoint_every", type=PositiveInt, default=50,
            help="Save a resumable checkpoint every this many steps (removed once the iteration's model is saved).",
        )
        parser.add_class_arguments(WarmStartConfig, "warm_start")
        parser.set_defaults({"data": {"class_path": f"{IRPODataModule.__module__}.{IRPODataModule.__name__}"}})

    def before_instantiate_classes(self) -> None:
        """Checks across sections, as parse errors: the usage line and every message, before anything is built."""
        config = self.config[self.subcommand]
        problems = []
        temperatures = config.data.init_args.sampling.temperatures
        if self.subcommand == "fit" and len(temperatures) < config.iterations:
            problems.append(
                f"data.sampling.temperatures has {len(temperatures)} entries for {config.iterations} iterations; give one per iteration"
            )
        strategy = config.trainer.strategy
        on_cpu = config.trainer.accelerator == "cpu" or (config.trainer.accelerator == "auto" and not torch.cuda.is_available())
        if config.model.init_args.policy.attn_implementation == "flex_attention" and on_cpu:
            problems.append("model.policy.attn_implementation flex_attention cannot train on a CPU (torch has no backward for it there): use sdpa")
        if strategy == "fsdp" and config.model.init_args.reference == "model":
            problems.append("model.reference model keeps a frozen copy of the policy, and an FSDP2-sharded model cannot be copied: use precomputed (the same loss) under fsdp")
        if strategy == "fsdp" and not str(config.trainer.devices).isdigit():
            problems.append(f"trainer.strategy fsdp needs trainer.devices as a number of devices per node, got {config.trainer.devices!r}")
        if problems:
            self._parser(self.subcommand).error("\n  ".join(problems))

    def instantiate_trainer(self, **kwargs):
        """A Trainer from the `trainer` section; "fsdp" means PyTorch's FSDP2, which also runs on CPU processes (distributed.py)."""
        options = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if options.get("strategy") == "fsdp":
            kwargs["strategy"] = resolve_strategy(options)["strategy"]
        return super().instantiate_trainer(**kwargs)

    def fit(self, model: IRPOModule, datamodule: IRPODataModule) -> Path:
        return self._loop(model, datamodule).fit()

    def test(self, model: IRPOModule, datamodule: IRPODataModule) -> Path:
        return self._loop(model, datamodule).test()

    def _loop(self, model: IRPOModule, datamodule: IRPODataModule) -> IterationLoop:
        self._connect(model)
        if usable_streams(model.cpu_streams, self.trainer) > 1:
            keep_freed_memory()  # the row streams need it (streams.py)
        config = self.config[self.subcommand]
        trainer_config = self._get(self.config_init, "trainer", default={})
        options = LoopOptions(
            iterations=config.iterations, run_dir=config.run_dir, overwrite=config.overwrite, warm_start=WarmStartConfig(**vars(config.warm_start)),
            checkpoint_every=config.checkpoint_every, seed=int(config.seed_everything),
            temperatures=list(datamodule.sampling.temperatures), max_steps=trainer_config["max_steps"], max_epochs=trainer_config["max_epochs"],
            precision=str(self.trainer.precision),
        )
        parser = self._parser(self.subcommand)
        return IterationLoop(
            model, datamodule, options, self.instantiate_trainer, _user_loggers(trainer_config.get("logger")),
            _as_list(trainer_config.get("callbacks")), config=self.config_dict(),
            write_config=lambda path: parser.save(config, path, skip_unset=False, overwrite=True),
        )

    def config_dict(self) -> dict:
        """The subcommand's config as the run directory saves it (config.yaml), read back as a dict."""
        return yaml.safe_load(self._parser(self.subcommand).dump(self.config[self.subcommand], skip_unset=False))

    def _connect(self, model: IRPOModule) -> None:
        """Start the other processes of a multi-process run now, and join the process group.

        So every process runs the whole loop from the start and knows its rank (read from the
        launcher's own variables by Lightning's cluster environments: torchrun's, SLURM's or
        Lightning's) before anything is decided or written. Lightning's own launcher (devices > 1
        without torchrun or SLURM) re-runs this command in each new process, which then finds
        itself launched; a spawning strategy cannot run the loop and is refused.
        """
        trainer = self.trainer
        if trainer.world_size <= 1:
            return
        launcher = trainer.strategy.launcher
        if isinstance(launcher, _MultiProcessingLauncher):
            self._parser(self.subcommand).error(
                f"trainer.strategy {type(trainer.strategy).__name__} starts its processes by spawning, which cannot run IRPO's "
                "loop of phases: use ddp or fsdp (or start the processes with torchrun or srun)"
            )
        if launcher is not None and not trainer.strategy.cluster_environment.creates_processes_externally:
            launcher.launch(lambda: None)
        trainer.strategy.connect(model)  # some strategies hand the module their device mesh here
        trainer.strategy.setup_environment()


def _user_loggers(logger) -> list | None:
    """The loggers the user chose with --trainer.logger; None when none was chosen (the run's own TensorBoard logs)."""
    if logger is None or logger is True:
        return None
    if logger is False:
        return []
    return _as_list(logger)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


@contextlib.contextmanager
def _lightning_cli_warnings_filtered(args: list[str] | None) -> Iterator[None]:
    with warnings.catch_warnings():
        # Lightning 2.6 calls jsonargparse APIs that jsonargparse 4.49+ deprecates: not the user's to act on.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="lightning.pytorch.cli")
        if args is not None:
            # Arguments passed in are the ones meant, whatever the calling script's own command line was.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended", category=UserWarning)
        yield


def main(args: list[str] | None = None) -> None:
    # The entry point, not the library, sets jsonargparse's process-wide settings: the dataclasses'
    # attribute docstrings become --help.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    with _lightning_cli_warnings_filtered(args):
        IRPOCLI(args=args)


class _ParseOnly(IRPOCLI):
    """Parses and checks, builds nothing, runs nothing."""

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def parse(args: list[str]):
    """The config that `python -m irpo_pl <args>` would run (what --print_config prints), without building or running anything."""
    with _lightning_cli_warnings_filtered(args):
        return _ParseOnly(args=args).config


def parse_to_dict(args: list[str]) -> dict:
    """The same as a dict, as the run directory saves it (config.yaml)."""
    with _lightning_cli_warnings_filtered(args):
        return _ParseOnly(args=args).config_dict()
