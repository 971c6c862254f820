"""Two real processes on gloo: FSDP2 training, and sampling that matches one process exactly."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file

from irpo_pl.distributed import resolve_strategy

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "--data.task.args", '{"num_train": 200, "num_test": 24}', "--data.task", '{"gold_chains": null}',
    "--model.policy.toy", '{"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2}',
    # No warm start: iteration 1 samples from the same initial weights in both runs.
    "--warm_start.steps", "0", "--iterations", "1", "--data.sampling.questions_per_iteration", "40",
    "--data.sampling.num_samples", "4", "--data.sampling.max_new_tokens", "40", "--data.sampling.batch_size", "32",
    "--data.batch_size", "8", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
]


def fit(run_dir: Path, *extra: str) -> str:
    return run(run_dir, "fit", *extra)


def run(run_dir: Path, subcommand: str, *extra: str) -> str:
    args = [sys.executable, "-m", "irpo_pl", subcommand, "--config", str(REPO / "configs" / "toy.yaml"), "--run_dir", str(run_dir), *TINY, *extra]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_two_process_fsdp_iteration_samples_and_scores_what_one_process_does(tmp_path):
    # An odd number of test questions and a small batch: the processes get unequal shares, one a filler batch.
    evaluation = ["--data.eval.max_questions", "21", "--data.eval.batch_size", "8", "--data.eval.maj_k", "3"]
    printed = fit(tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy", "fsdp", "--iterations", "2", *evaluation)
    fit(tmp_path / "one", "--iterations", "2", *evaluation)

    # Each rank holds half of the policy in every iteration: in the second too, after sampling and
    # evaluation have gathered the parameters (an optimizer built on gathered ones would train no shard).
    # (a regex over the whole output: the two processes' lines can interleave)
    shares = re.findall(r"rank (\d) holds [\d,]+ of the policy's [\d,]+ parameters \(([\d.]+)%\)", printed)
    assert len(shares) == 4 and {rank for rank, _ in shares} == {"0", "1"}, printed[-3000:]
    assert all(share == "50.0" for _, share in shares), shares

    for name in ("samples", "pairs"):
        two = load_from_disk(str(tmp_path / "two" / "iteration_1" / name)).to_list()
        one = load_from_disk(str(tmp_path / "one" / "iteration_1" / name)).to_list()
        assert two == one, f"{name} differ between 2 processes and 1"
    assert (tmp_path / "two" / "iteration_1" / "model" / "model.safetensors").exists()
    # Evaluation's torchmetrics sum over both processes, fillers left out: on the same weights (iteration 0's,
    # before any training, whose numerics differ between 1 and 2 processes), the single-process figures exactly.
    two, one = (json.loads((tmp_path / name / "summary.json").read_text())["iterations"][0] for name in ("two", "one"))
    assert (two["test_accuracy"], two["test_maj@3"]) == (one["test_accuracy"], one["test_maj@3"])
    two_answers, one_answers = (load_from_disk(str(tmp_path / name / "iteration_0" / "test_completions")).to_list() for name in ("two", "one"))
    assert two_answers == one_answers and [a["question_index"] for a in one_answers] == list(range(21))
    # And `test` of a trained model on 2 processes against 1.
    trained = str(tmp_path / "one" / "iteration_2" / "model")
    tested = {}
    for name, extra in (("test_two", ["--trainer.devices", "2", "--trainer.strategy", "fsdp"]), ("test_one", [])):
        run(tmp_path / name, "test", "--model.policy.name_or_path", trained, *evaluation, *extra)
        [row] = json.loads((tmp_path / name / "summary.json").read_text())["iterations"]
        tested[name] = (row["test_accuracy"], row["test_maj@3"], load_from_disk(str(tmp_path / name / "iteration_0" / "test_completions")).to_list())
    assert tested["test_two"] == tested["test_one"]
    # Only rank 0 read the weights; rank 1 received its shard.
    assert "rank 1 built the policy on the meta device and received its shard from rank 0" in printed


@pytest.mark.slow
def test_fsdp_run_killed_in_training_resumes_from_its_sharded_checkpoint(tmp_path):
    """Under fsdp a checkpoint is a folder of shards (torch.distributed.checkpoint), one per process.

    SIGKILL both processes once iteration 1 has one, run the same command again: it resumes from the
    shards and ends exactly where an uninterrupted run ends.
    """
    # Small batches and frequent checkpoints: many steps, so the kill lands inside training.
    fsdp = [
        "--trainer.devices", "2", "--trainer.strategy", "fsdp", "--data.batch_size", "4", "--checkpoint_every", "2",
        "--data.sampling.questions_per_iteration", "16", "--data.sampling.max_new_tokens", "24", "--data.eval.max_questions", "8",
    ]
    run_dir = tmp_path / "killed"
    checkpoint = run_dir / "iteration_1" / "checkpoints" / "last.ckpt"
    args = [sys.executable, "-m", "irpo_pl", "fit", "--config", str(REPO / "configs" / "toy.yaml"), "--run_dir", str(run_dir), *TINY, *fsdp]
    with (tmp_path / "first.log").open("w") as log:
        # A session of its own, so that one killpg reaches the process Lightning started for rank 1 too.
        process = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
        deadline = time.monotonic() + 300
        while not checkpoint.exists():
            assert process.poll() is None, "the run ended before it wrote a checkpoint:\n" + (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "timed out waiting for a checkpoint"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert sorted(path.name for path in checkpoint.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert [row["iteration"] for row in json.loads((run_dir / "summary.json").read_text())["iterations"]] == [0]

    printed = fit(run_dir, *fsdp)
    assert "resuming training from" in printed
    assert not checkpoint.parent.exists(), "the iteration's checkpoints outlived its saved model"
    fit(tmp_path / "whole", *fsdp)

    resumed, whole = (json.loads((tmp_path / name / "summary.json").read_text())["iterations"] for name in ("killed", "whole"))
    keys = ("iteration", "num_pairs", "steps", "test_accuracy")
    assert [{k: row.get(k) for k in keys} for row in resumed] == [{k: row.get(k) for k in keys} for row in whole]
    # The toy model's accuracy barely moves in a few steps: the weights are the sharper test.
    resumed_model, whole_model = (load_file(tmp_path / name / "iteration_1" / "model" / "model.safetensors") for name in ("killed", "whole"))
    assert resumed_model.keys() == whole_model.keys()
    assert all(torch.equal(resumed_model[k], whole_model[k]) for k in whole_model), "the resumed run trained to other weights"


def test_fsdp_needs_a_number_of_devices():
    with pytest.raises(ValueError, match="--trainer.devices"):
        resolve_strategy({"strategy": "fsdp", "devices": "auto"})
    assert resolve_strategy({"strategy": "ddp"}) == {"strategy": "ddp"}
