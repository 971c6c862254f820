"""A whole run at tiny sizes: warm start, one IRPO iteration, and everything it leaves behind."""

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from irpo_pl.cli import main
from irpo_pl.losses import irpo_loss
from irpo_pl.objectives import PairLogps, PairObjective

TOY_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "toy.yaml")

REQUIRED_TAGS = {
    "train/logps_chosen", "train/logps_rejected", "train/rewards_chosen", "train/rewards_rejected",
    "train/rewards_margin", "train/rewards_accuracy", "train/nll", "train/loss",
}

TINY = [
    "--data.task.args", '{"num_train": 200, "num_test": 40}', "--data.task", '{"gold_chains": null}',
    "--model.policy.toy", '{"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2}',
    "--warm_start.steps", "40", "--warm_start.batch_size", "32",
    "--iterations", "1", "--data.sampling.questions_per_iteration", "24", "--data.sampling.num_samples", "4",
    "--data.sampling.max_new_tokens", "48", "--data.batch_size", "16", "--trainer.enable_progress_bar", "false",
]


def scalar_tags(run_dir, version="*"):
    tags = set()
    for events in run_dir.glob(f"tensorboard/{version}/events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    main(["fit", "--config", TOY_CONFIG, "--run_dir", str(run_dir), *TINY, "--data.eval.maj_k", "3"])
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
def test_gold_chains_limit_the_warm_start_and_sft_to_the_seed_set(tmp_path, capsys):
    run_dir = tmp_path / "run"
    main(["fit", "--config", TOY_CONFIG, "--run_dir", str(run_dir), *TINY, "--data.task.gold_chains", "100", "--model.objective", "SFT"])
    from datasets import load_from_disk

    seed_set = load_from_disk(str(run_dir / "iteration_0" / "sft_rows"))
    gold_rows = load_from_disk(str(run_dir / "iteration_1" / "sft_rows"))
    assert len(seed_set) == 100 and len(gold_rows) == 24 and set(gold_rows["prompt"]) <= set(seed_set["prompt"])
    assert "200 train (100 with a gold chain, 100 answer-only)" in capsys.readouterr().out


@pytest.mark.slow
def test_answer_only_questions_that_give_no_pair_say_that_gold_cannot_help(tmp_path):
    # The tiny warm start gets every sample wrong, and answer-only questions have no gold winner.
    with pytest.raises(RuntimeError, match=r"24 every sample wrong.*a longer warm start on the seed set \(data.task.gold_chains\)"):
        main(["fit", "--config", TOY_CONFIG, "--run_dir", str(tmp_path / "run"), *TINY, "--data.task.gold_chains", "100"])


@pytest.mark.slow
def test_rerun_of_a_finished_run_redoes_nothing(tiny_run, capsys):
    before = (tiny_run / "summary.json").read_text()
    main(["fit", "--config", TOY_CONFIG, "--run_dir", str(tiny_run), *TINY, "--data.eval.maj_k", "3"])
    printed = capsys.readouterr().out
    assert "resuming" in printed and "run directory:" in printed and str(tiny_run.resolve()) in printed
    assert (tiny_run / "summary.json").read_text() == before


@pytest.mark.slow
def test_a_rerun_with_other_settings_is_refused_naming_them(tiny_run):
    with pytest.raises(ValueError, match=r"data\.init_args\.sampling\.num_samples.*--overwrite"):
        main(["fit", "--config", TOY_CONFIG, "--run_dir", str(tiny_run), *TINY, "--data.eval.maj_k", "3", "--data.sampling.num_samples", "5"])


@pytest.mark.slow
def test_the_config_is_saved_in_the_run_directory_and_runs_again(tiny_run, tmp_path):
    saved = tiny_run / "config.yaml"
    assert "seed_everything: 0" in saved.read_text()
    # The saved config is a complete one: with a new run directory it starts the same run over.
    main(["fit", "--config", str(saved), "--run_dir", str(tmp_path / "again"), "--iterations", "0"])
    first, again = (json.loads((d / "summary.json").read_text())["iterations"][0] for d in (tiny_run, tmp_path / "again"))
    assert again["test_accuracy"] == first["test_accuracy"]


@pytest.mark.slow
def test_test_subcommand_evaluates_a_saved_model(tiny_run, tmp_path):
    model_dir = tiny_run / "iteration_1" / "model"
    out = tmp_path / "evaluated"
    main(["test", "--config", TOY_CONFIG, *TINY, "--data.eval.maj_k", "3", "--model.policy.name_or_path", str(model_dir), "--run_dir", str(out)])
    [row] = json.loads((out / "summary.json").read_text())["iterations"]
    fitted = json.loads((tiny_run / "summary.json").read_text())["iterations"][1]
    assert row["kind"] == "test" and row["model"] == str(model_dir)
    assert row["test_accuracy"] == fitted["test_accuracy"] and row["test_maj@3"] == fitted["test_maj@3"]
    assert "eval/accuracy" in scalar_tags(out, "eval")


@pytest.mark.slow
def test_inspect_notebook_runs_on_a_real_run(tiny_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("IRPO_RUN_DIRS", f"{tiny_run}:{tiny_run}")
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
    from irpo_pl.datamodule import _usable
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


@pytest.mark.slow
def test_a_csv_logger_receives_the_same_scalars_as_tensorboard(tiny_run, tmp_path):
    import csv

    logs = tmp_path / "csv"
    main([
        "fit", "--config", TOY_CONFIG, "--run_dir", str(tmp_path / "run"), *TINY, "--warm_start.steps", "5",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(logs),
    ])
    [metrics] = logs.rglob("metrics.csv")
    with metrics.open() as handle:
        rows = list(csv.DictReader(handle))
    logged = {column for row in rows for column, value in row.items() if value}
    assert REQUIRED_TAGS | {"eval/accuracy"} <= logged
    # One logger for every phase: its steps keep rising from the warm start to the last iteration.
    steps = [int(row["step"]) for row in rows if row.get("train/loss")]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert not (tmp_path / "run" / "tensorboard").exists()


class HalfDPO(PairObjective):
    """A user's objective, chosen by class path: DPO on half the margin (so the test can tell it ran)."""

    name = "half_dpo"
    needs_reference = True

    def loss(self, logps: PairLogps):
        return irpo_loss(
            logps.policy_chosen, logps.policy_rejected, logps.reference_chosen, logps.reference_rejected,
            logps.chosen_lengths, beta=0.05, alpha=0.0,
        )


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["test_loop.HalfDPO", "SimPO"])
def test_an_objective_chosen_by_class_path_trains(objective, tmp_path):
    run_dir = tmp_path / "run"
    main(["fit", "--config", TOY_CONFIG, "--run_dir", str(run_dir), *TINY, "--warm_start.steps", "10", "--model.objective", objective])
    summary = json.loads((run_dir / "summary.json").read_text())["iterations"]
    expected = {"test_loop.HalfDPO": "half_dpo", "SimPO": "simpo"}[objective]
    assert summary[1]["kind"] == expected and summary[1]["num_pairs"] > 0 and summary[1]["steps"] > 0
    # SimPO needs no reference: no pre-pass ran.
    assert ("reference" in summary[1]["seconds"]) == (objective != "SimPO")
    assert REQUIRED_TAGS - {"train/dpo"} <= scalar_tags(run_dir, "iteration_1")


@pytest.mark.slow
def test_selection_keeps_the_best_steps_weights_not_the_last(tmp_path):
    import torch
    import yaml
    from datasets import load_from_disk
    from safetensors.torch import load_file

    every = ["--data.eval.selection_questions", "30", "--data.eval.selection_every", "2"]
    # A user's own callback keeps every step's weights, to compare with. (No warm start, so that only
    # iteration 1 trains and saves.)
    saved = tmp_path / "every_step"
    config = tmp_path / "callbacks.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(saved), "filename": "{step}", "every_n_train_steps": 1, "save_top_k": -1, "save_weights_only": True},
    }]}}))
    run_dir = tmp_path / "run"
    main(["fit", "--config", TOY_CONFIG, "--config", str(config), "--run_dir", str(run_dir), *TINY, "--warm_start.steps", "0", *every])
    row = json.loads((run_dir / "summary.json").read_text())["iterations"][1]
    selection = row["selection"]
    assert [step for step, _ in selection["history"]] == list(range(2, row["steps"] + 1, 2))
    assert selection["accuracy"] == max(accuracy for _, accuracy in selection["history"])
    assert selection["step"] == next(step for step, accuracy in selection["history"] if accuracy == selection["accuracy"])

    kept = load_file(run_dir / "iteration_1" / "model" / "model.safetensors")

    def policy_weights(checkpoint):
        state = torch.load(checkpoint, weights_only=True)["state_dict"]
        return {key.removeprefix("policy."): value for key, value in state.items() if key.startswith("policy.")}

    selected, last = policy_weights(saved / f"step={selection['step']}.ckpt"), policy_weights(saved / f"step={row['steps']}.ckpt")
    assert selection["step"] < row["steps"], "the test needs a kept step before the last"
    assert all(torch.equal(kept[key], selected[key]) for key in kept)
    assert not all(torch.equal(kept[key], last[key]) for key in kept)

    # The held-out questions were never sampled from or trained on.
    held_out = set(load_from_disk(str(run_dir / "selection_questions"))["prompt"])
    assert len(held_out) == 30
    assert not held_out & set(load_from_disk(str(run_dir / "iteration_1" / "samples"))["prompt"])
    warm = tmp_path / "warm"
    main(["fit", "--config", TOY_CONFIG, "--run_dir", str(warm), *TINY, *every, "--iterations", "0"])
    assert set(load_from_disk(str(warm / "selection_questions"))["prompt"]) == held_out  # the same seed holds out the same
    assert not held_out & set(load_from_disk(str(warm / "iteration_0" / "sft_rows"))["prompt"])


@pytest.mark.slow
def test_retrain_with_the_held_out_questions_for_the_selected_steps(tmp_path):
    from datasets import load_from_disk

    run_dir = tmp_path / "run"
    main([
        "fit", "--config", TOY_CONFIG, "--run_dir", str(run_dir), *TINY,
        "--data.eval.selection_questions", "30", "--data.eval.selection_every", "4", "--data.eval.retrain_with_selection", "true",
    ])
    selection = json.loads((run_dir / "summary.json").read_text())["iterations"][1]["selection"]
    assert selection["retrained"] and selection["retrain_steps"] == selection["step"]
    held_out = set(load_from_disk(str(run_dir / "selection_questions"))["prompt"])
    retrain_prompts = set(load_from_disk(str(run_dir / "iteration_1" / "retrain" / "samples"))["prompt"])
    assert held_out <= retrain_prompts
    assert not (run_dir / "iteration_1" / "retrain" / "checkpoints").exists()


@pytest.mark.slow
def test_max_pairs_caps_an_iteration_with_a_seeded_subsample(tiny_run, tmp_path):
    from datasets import load_from_disk

    uncapped = json.loads((tiny_run / "summary.json").read_text())["iterations"][1]["num_pairs"]
    run_dir = tmp_path / "capped"
    main(["fit", "--config", TOY_CONFIG, "--run_dir", str(run_dir), *TINY, "--data.eval.maj_k", "3", "--data.pairs.max_pairs", str(uncapped // 2)])
    row = json.loads((run_dir / "summary.json").read_text())["iterations"][1]
    assert row["num_pairs"] == uncapped // 2 and row["dropped_over_cap"] == uncapped - uncapped // 2
    capped = load_from_disk(str(run_dir / "iteration_1" / "pairs")).to_list()
    every = load_from_disk(str(tiny_run / "iteration_1" / "pairs")).to_list()
    assert len(capped) == uncapped // 2 and all(pair in every for pair in capped)
