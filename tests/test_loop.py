"""A whole run at tiny sizes: warm start, one IRPO iteration, and everything it leaves behind."""

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from irpo_pl.cli import main

TOY_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "toy.yaml")

REQUIRED_TAGS = {
    "train/logps_chosen", "train/logps_rejected", "train/rewards_chosen", "train/rewards_rejected",
    "train/rewards_margin", "train/rewards_accuracy", "train/nll", "train/loss",
}

TINY = [
    "--task.args", '{"num_train": 200, "num_test": 40}',
    "--model.toy", '{"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2}',
    "--warm_start.steps", "40", "--warm_start.batch_size", "32",
    "--iterations", "1", "--sampling.questions_per_iteration", "24", "--sampling.num_samples", "4",
    "--sampling.max_new_tokens", "48", "--train.batch_size", "16", "--trainer.enable_progress_bar", "false",
]


def scalar_tags(run_dir):
    tags = set()
    for events in run_dir.glob("tensorboard/*/events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


@pytest.mark.slow
def test_toy_run_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "run"
    main(["fit", "--config", TOY_CONFIG, "--run_dir", str(run_dir), *TINY])

    summary = json.loads((run_dir / "summary.json").read_text())["iterations"]
    assert [row["iteration"] for row in summary] == [0, 1]
    assert summary[0]["kind"] == "warm_start" and summary[1]["kind"] == "irpo"
    assert all(0.0 <= row["test_accuracy"] <= 1.0 for row in summary)
    assert summary[1]["num_pairs"] > 0

    assert REQUIRED_TAGS | {"eval/accuracy"} <= scalar_tags(run_dir)

    model_dir = run_dir / "iteration_1" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.vocab_size == len(tokenizer)

    from datasets import load_from_disk

    pairs = load_from_disk(str(run_dir / "iteration_1" / "pairs"))
    assert {"prompt", "chosen", "rejected"} <= set(pairs.column_names) and len(pairs) == summary[1]["num_pairs"]
    samples = load_from_disk(str(run_dir / "iteration_1" / "samples"))
    assert len(samples) == 24 * 4 and set(samples["reward"]) <= {0.0, 1.0}

    printed = capsys.readouterr().out
    assert "run directory:" in printed and str(run_dir.resolve()) in printed


@pytest.mark.slow
def test_same_seed_same_pairs_and_losses(tmp_path):
    """Determinism: two runs with one seed sample the same pairs and log the same losses."""
    runs = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        main(["fit", "--config", TOY_CONFIG, "--run_dir", str(run_dir), *TINY, "--warm_start.steps", "10"])
        from datasets import load_from_disk

        pairs = load_from_disk(str(run_dir / "iteration_1" / "pairs")).to_list()
        accumulator = EventAccumulator(str(next((run_dir / "tensorboard" / "iteration_1").glob("events.*"))))
        accumulator.Reload()
        losses = [event.value for event in accumulator.Scalars("train/loss")]
        runs.append((pairs, losses))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == pytest.approx(runs[1][1], rel=1e-5)
