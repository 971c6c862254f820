"""The command line: LightningCLI's options, every config, and errors as a CLI user expects them."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

from irpo_pl.cli import IRPOCLI, main, parse

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
TOY = str(REPO / "configs" / "toy.yaml")


def test_the_cli_is_a_lightning_cli():
    assert issubclass(IRPOCLI, LightningCLI)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(path):
    config = parse(["fit", "--config", str(path)]).fit
    assert config.iterations >= 1
    assert len(config.data.init_args.sampling.temperatures) >= config.iterations


def test_arguments_passed_in_are_parsed_without_warnings_about_the_scripts_own(monkeypatch):
    # A benchmark script calls parse() with its own options on its command line.
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--json"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = parse(["fit", "--config", TOY, "--iterations", "2"])
    assert config.fit.iterations == 2
    assert not [w for w in caught if "args parameter" in str(w.message)], [str(w.message) for w in caught]


def test_overrides_reach_their_section():
    config = parse(["fit", "--config", TOY, "--data.sampling.num_samples", "3", "--trainer.devices", "2", "--model.objective", "DPO"]).fit
    assert config.data.init_args.sampling.num_samples == 3
    assert str(config.trainer.devices) == "2"
    assert config.model.init_args.objective.class_path == "irpo_pl.objectives.DPO"


def _help(capsys, *args: str) -> str:
    with pytest.raises(SystemExit):
        main(["fit", *args])
    return " ".join(capsys.readouterr().out.split())


def test_fit_help_lists_lightnings_options_and_explains_ours(capsys):
    help_text = _help(capsys, "--help")
    for option in ("--print_config", "--seed_everything", "--trainer.logger", "--trainer.callbacks", "--run_dir", "--overwrite", "--iterations"):
        assert option in help_text
    # Subclass mode, as LightningCLI does it: the module's and data module's own options have their own help.
    assert "N: completions drawn per question." in _help(capsys, "--data.help", "IRPODataModule")
    assert "precomputed: reference log-probs computed once from M_t" in _help(capsys, "--model.help", "IRPOModule")
    assert "Weight of the NLL term on the winners" in _help(capsys, "--model.objective.help", "IRPO")


@pytest.mark.parametrize(
    "override, option",
    [
        (["--data.sampling.num_samples", "0"], "sampling.num_samples"),
        (["--data.pairs.pairs_per_question", "0"], "pairs.pairs_per_question"),
        (["--model.objective.beta", "0"], "objective.beta"),
        (["--model.objective.beta", "-1"], "objective.beta"),
        (["--iterations", "5", "--data.sampling.temperatures", "[1.0, 1.0]"], "data.sampling.temperatures"),
        (["--model.objective", "PPO"], "PPO"),
        (["--model.reference", "none"], "reference"),
        (["--model.cpu_streams", "0"], "cpu_streams"),
        (["--model.cpu_streams", "3"], "cpu_streams"),
        (["--warm_start.steps", "-1"], "warm_start.steps"),
    ],
)
def test_bad_options_fail_at_start_with_the_usage_line_naming_the_option(override, option, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse(["fit", "--config", TOY, *override])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "usage:" in error and option in error


def test_an_invalid_config_prints_no_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "irpo_pl", "fit", "--config", TOY, "--data.sampling.num_samples", "0", "--run_dir", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2
    assert "usage:" in done.stderr and "num_samples" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_print_config_round_trips(tmp_path):
    printed = subprocess.run(
        [sys.executable, "-m", "irpo_pl", "fit", "--config", TOY, "--iterations", "2", "--print_config"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    (tmp_path / "c.yaml").write_text(printed)
    read_back, direct = (parse(["fit", "--config", path, *extra]).fit.as_dict() for path, extra in ((str(tmp_path / "c.yaml"), []), (TOY, ["--iterations", "2"])))
    read_back.pop("config"), direct.pop("config")
    assert read_back == direct


def test_unknown_task_names_the_task():
    from irpo_pl.tasks import get_task

    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="cannot import"):
        get_task("no_such_module.Task")
