"""Two real processes on gloo: FSDP2 training, and sampling that matches one process exactly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_from_disk

from irpo_pl.distributed import resolve_strategy

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "--task.args", '{"num_train": 200, "num_test": 24}',
    "--model.toy", '{"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2}',
    # No warm start: iteration 1 samples from the same initial weights in both runs.
    "--warm_start.steps", "0", "--iterations", "1", "--sampling.questions_per_iteration", "40",
    "--sampling.num_samples", "4", "--sampling.max_new_tokens", "40", "--sampling.batch_size", "32",
    "--train.batch_size", "8", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
]


def fit(run_dir: Path, *extra: str) -> str:
    args = [sys.executable, "-m", "irpo_pl", "fit", "--config", str(REPO / "configs" / "toy.yaml"), "--run_dir", str(run_dir), *TINY, *extra]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_two_process_fsdp_iteration_samples_what_one_process_samples(tmp_path):
    printed = fit(tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy", "fsdp")
    fit(tmp_path / "one")

    shares = [line for line in printed.splitlines() if "holds" in line and "of the policy's" in line]
    assert {line.split()[2] for line in shares} == {"0", "1"}
    for line in shares:
        share = float(line.rsplit("(", 1)[1].rstrip("%)")) / 100
        assert 0.4 < share < 0.65, line

    for name in ("samples", "pairs"):
        two = load_from_disk(str(tmp_path / "two" / "iteration_1" / name)).to_list()
        one = load_from_disk(str(tmp_path / "one" / "iteration_1" / name)).to_list()
        assert two == one, f"{name} differ between 2 processes and 1"
    assert (tmp_path / "two" / "iteration_1" / "model" / "model.safetensors").exists()


def test_fsdp_needs_a_number_of_devices():
    with pytest.raises(ValueError, match="--trainer.devices"):
        resolve_strategy({"strategy": "fsdp", "devices": "auto"})
    assert resolve_strategy({"strategy": "ddp"}) == {"strategy": "ddp"}
