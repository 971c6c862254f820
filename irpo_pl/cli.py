"""`python -m irpo_pl fit --config configs/toy.yaml`, with `--section.key value` overrides.

Built on jsonargparse, as LightningCLI is: the run's dataclasses become the
sections (task, model, sampling, pairs, train, ...) and `--trainer.*` takes any
lightning.Trainer argument. Unlike LightningCLI it builds a fresh Trainer for
every phase of the loop.
"""

from __future__ import annotations

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from irpo_pl.config import RunConfig, validate

# Options the loop sets per phase; the rest of lightning.Trainer's are the user's.
TRAINER_OPTIONS_SET_BY_LOOP = {"logger", "max_steps", "max_epochs", "callbacks", "default_root_dir"}


def fit_parser() -> ArgumentParser:
    # The dataclasses document each option in an attribute docstring; this puts them in --help.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(description="Run IRPO: a warm start, then iterations of sample, pair, train, evaluate.")
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file from configs/.")
    parser.add_class_arguments(RunConfig, nested_key=None, fail_untyped=False)
    parser.add_method_arguments(L.Trainer, "__init__", "trainer", skip=TRAINER_OPTIONS_SET_BY_LOOP, fail_untyped=False)
    parser.set_defaults({"trainer.accelerator": "auto", "trainer.devices": 1})
    return parser


def parse(args: list[str] | None = None) -> tuple[RunConfig, dict]:
    """The run's config and the Trainer options, validated."""
    fit = fit_parser()
    root = ArgumentParser(prog="python -m irpo_pl", description="Iterative Reasoning Preference Optimization on Lightning.")
    root.add_subcommands().add_subcommand("fit", fit, help="Warm start and IRPO iterations, end to end.")
    namespace = root.parse_args(args).fit
    trainer_options = {k: v for k, v in namespace.pop("trainer").as_dict().items() if v is not None}
    namespace.pop("config", None)
    config = RunConfig(**vars(fit.instantiate(namespace)))
    validate(config)
    return config, trainer_options


def main(args: list[str] | None = None) -> None:
    from irpo_pl.loop import run

    config, trainer_options = parse(args)
    run(config, trainer_options)
