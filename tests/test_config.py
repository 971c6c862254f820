from pathlib import Path

import pytest

from irpo_pl.cli import fit_parser, parse

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(path):
    config, trainer_options = parse(["fit", "--config", str(path)])
    assert config.iterations >= 1
    assert len(config.sampling.temperatures) >= config.iterations
    assert isinstance(trainer_options, dict)


def test_overrides_reach_their_section():
    config, trainer_options = parse(["fit", "--config", str(CONFIGS[0]), "--sampling.num_samples", "3", "--trainer.devices", "2"])
    assert config.sampling.num_samples == 3
    assert str(trainer_options["devices"]) == "2"


@pytest.mark.parametrize(
    "override, option",
    [
        (["--sampling.num_samples", "0"], "sampling.num_samples"),
        (["--pairs.pairs_per_question", "0"], "pairs.pairs_per_question"),
        (["--train.beta", "0"], "train.beta"),
        (["--train.beta", "-1"], "train.beta"),
        (["--iterations", "5", "--sampling.temperatures", "[1.0, 1.0]"], "sampling.temperatures"),
        (["--train.method", "ppo"], "train.method"),
        (["--train.reference", "none"], "train.reference"),
        (["--train.cpu_streams", "0"], "train.cpu_streams"),
        (["--train.cpu_streams", "3"], "train.cpu_streams"),
    ],
)
def test_bad_options_fail_at_start_naming_the_option(override, option):
    with pytest.raises(ValueError, match=option.replace(".", r"\.")):
        parse(["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"), *override])


def test_unknown_task_names_the_task():
    from irpo_pl.tasks import get_task

    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="cannot import"):
        get_task("no_such_module.Task")


def test_help_explains_each_option(capsys):
    with pytest.raises(SystemExit):
        fit_parser().parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "N: completions drawn per question." in help_text
    assert "precomputed: reference log-probs computed once after pairing" in help_text
