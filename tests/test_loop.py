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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    main(["fit", "--config", TOY_CONFIG, "--run_dir", str(run_dir), *TINY, "--eval.maj_k", "3"])
    return run_dir


@pytest.mark.slow
def test_toy_run_end_to_end(tiny_run):
    run_dir = tiny_run

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

    assert "test_maj@3" in summary[1]


@pytest.mark.slow
def test_rerun_of_a_finished_run_redoes_nothing(tiny_run, capsys):
    before = (tiny_run / "summary.json").read_text()
    main(["fit", "--config", TOY_CONFIG, "--run_dir", str(tiny_run), *TINY, "--eval.maj_k", "3"])
    printed = capsys.readouterr().out
    assert "resuming" in printed and "run directory:" in printed and str(tiny_run.resolve()) in printed
    assert (tiny_run / "summary.json").read_text() == before


@pytest.mark.slow
def test_inspect_notebook_runs_on_a_real_run(tiny_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("IRPO_RUN_DIR", str(tiny_run))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(Path(__file__).resolve().parents[1] / "notebooks" / "inspect_run.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3").execute()
    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "test accuracy" in printed and "CHOSEN:" in printed


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


def test_long_prompts_are_dropped_and_counted_never_truncated(toy_policy, toy_task, capsys):
    from irpo_pl.loop import _usable
    from irpo_pl.models import encode_prompt

    _, tokenizer = toy_policy
    examples = toy_task.load_split("test")
    lengths = sorted(len(encode_prompt(tokenizer, toy_task.prompt(e))) for e in examples)
    limit = lengths[len(lengths) // 2]
    kept = _usable(toy_task, tokenizer, examples, "test", limit)
    assert all(len(encode_prompt(tokenizer, toy_task.prompt(e))) < limit for e in kept)
    assert f"dropped {len(examples) - len(kept)} of {len(examples)} test questions" in capsys.readouterr().out
    with pytest.raises(ValueError, match="every test prompt is longer than pairs.max_length=3"):
        _usable(toy_task, tokenizer, examples, "test", 3)
    with pytest.raises(ValueError, match="the train split is empty"):
        _usable(toy_task, tokenizer, [], "train", 100)
