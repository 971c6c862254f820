"""Kill a real run with SIGKILL and run the same command again: nothing finished is redone or lost."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "--data.task.args", '{"num_train": 400, "num_test": 40}', "--data.task", '{"gold_chains": null}',
    "--model.policy.toy", '{"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2}',
    "--warm_start.steps", "20", "--warm_start.batch_size", "16",
    "--data.sampling.temperatures", "[1.0, 1.0]", "--data.sampling.max_new_tokens", "48",
    "--data.batch_size", "8", "--checkpoint_every", "2", "--trainer.enable_progress_bar", "false",
]


def command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "irpo_pl", "fit", "--config", str(REPO / "configs" / "toy.yaml"), "--run_dir", str(run_dir), *TINY, *extra]


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def kill_when(process: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run ended before the moment it was to be killed"
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def summary_iterations(run_dir: Path) -> list[int]:
    return [row["iteration"] for row in json.loads((run_dir / "summary.json").read_text())["iterations"]]


@pytest.mark.slow
def test_killed_during_training_resumes_from_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = command(run_dir, "--iterations", "2", "--data.sampling.questions_per_iteration", "48", "--data.sampling.num_samples", "4")
    process = start(args, tmp_path / "first.log")
    kill_when(process, lambda: (run_dir / "iteration_2" / "checkpoints" / "last.ckpt").exists())
    assert summary_iterations(run_dir) == [0, 1]

    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming" in second.stdout and "resuming training from" in second.stdout
    assert summary_iterations(run_dir) == [0, 1, 2]
    assert not (run_dir / "iteration_2" / "checkpoints").exists()
    # The resumed iteration trained to the weights of an uninterrupted one, bit for bit: its reference
    # log-probs are M_1's (read back from reference_logps/), not those of the checkpoint's weights.
    whole = tmp_path / "whole"
    third = subprocess.run(command(whole, *args[args.index("--iterations"):]), cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    resumed, uninterrupted = (load_file(d / "iteration_2" / "model" / "model.safetensors") for d in (run_dir, whole))
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in uninterrupted)


@pytest.mark.slow
def test_killed_during_sampling_never_reads_partial_samples(tmp_path):
    run_dir = tmp_path / "run"
    # Many samples, so that iteration 1's sampling takes seconds and the kill lands inside it.
    args = command(run_dir, "--iterations", "1", "--data.sampling.questions_per_iteration", "300", "--data.sampling.num_samples", "8",
                   "--data.sampling.batch_size", "64", "--data.sampling.max_new_tokens", "64")
    process = start(args, tmp_path / "first.log")
    kill_when(process, lambda: (run_dir / "iteration_0" / "model").exists())
    assert not (run_dir / "iteration_1" / "samples").exists(), "the kill came after sampling; the test did not test it"

    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert summary_iterations(run_dir) == [0, 1]
    assert len(load_from_disk(str(run_dir / "iteration_1" / "samples"))) == 300 * 8


def test_partial_folders_and_files_are_not_taken_for_finished_ones(tmp_path):
    """What a kill in the middle of a write leaves behind (a .partial twin) is ignored and replaced."""
    from irpo_pl.run_dir import write_json

    target = tmp_path / "summary.json"
    write_json(target, {"iterations": [1]})
    (tmp_path / "summary.json.partial").write_text('{"iterations": [1, 2')  # a write cut short
    write_json(target, {"iterations": [1, 2]})
    assert json.loads(target.read_text()) == {"iterations": [1, 2]}


def test_rerun_with_other_settings_is_refused(tmp_path):
    import yaml

    from irpo_pl.cli import parse_to_dict
    from irpo_pl.run_dir import open_run_dir

    def config(*overrides: str) -> dict:
        return parse_to_dict(["fit", "--config", str(REPO / "configs" / "toy.yaml"), *overrides])

    def write(path: Path) -> None:
        path.write_text(yaml.safe_dump(config()))

    open_run_dir(tmp_path, config(), write, overwrite=False)
    with pytest.raises(ValueError, match=r"model\.init_args\.lr.*--overwrite"):
        open_run_dir(tmp_path, config("--model.lr", "1e-3"), write, overwrite=False)
    open_run_dir(tmp_path, config("--iterations", "2", "--trainer.enable_progress_bar", "false"), write, overwrite=False)
