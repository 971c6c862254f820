"""Ranks from the launcher: two torchrun "nodes", and SLURM's variables, on this machine's gloo.

Each run must finish, exactly one process must write (the others would race on the
run directory), and the run directory must be decided once, by rank 0.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

TINY = [
    "--config", str(REPO / "configs" / "toy.yaml"),
    "--data.task.args", '{"num_train": 200, "num_test": 24}', "--data.task", '{"gold_chains": null}',
    "--model.policy.toy", '{"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2}',
    "--warm_start.steps", "4", "--warm_start.batch_size", "8", "--iterations", "1",
    "--data.sampling.questions_per_iteration", "16", "--data.sampling.num_samples", "4", "--data.sampling.max_new_tokens", "24",
    "--data.batch_size", "8", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--trainer.strategy", "fsdp",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_together(commands: list[tuple[list[str], dict]], cwd: Path) -> list[str]:
    """Start every command at once, wait for all; each must succeed. Returns their outputs."""
    processes = [
        subprocess.Popen(command, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for command, env in commands
    ]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    return outputs


def check_one_writer(run_dir: Path, outputs: list[str]) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())["iterations"]
    assert [row["iteration"] for row in summary] == [0, 1]
    assert sum(output.count("run directory:") for output in outputs) == 1, "more than one process believes it is rank 0"
    assert not list(run_dir.rglob("*.partial")) and not list(run_dir.rglob("*.old"))
    assert (run_dir / "iteration_1" / "model" / "model.safetensors").exists()


def test_two_torchrun_nodes_decide_one_run_directory_and_one_writer(tmp_path):
    """torchrun across nodes sets RANK and GROUP_RANK, not NODE_RANK; no --run_dir, so rank 0's default must be shared."""
    port = free_port()
    commands = [
        ([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
          "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "irpo_pl", "fit", *TINY,
          "--trainer.devices", "1", "--trainer.num_nodes", "2"], {})
        for node in (0, 1)
    ]
    outputs = run_together(commands, cwd=tmp_path)
    [run_dir] = (tmp_path / "runs").iterdir()
    check_one_writer(run_dir, outputs)


def test_slurm_tasks_know_their_ranks(tmp_path):
    """Under srun neither LOCAL_RANK nor NODE_RANK is set: Lightning's SLURM environment reads SLURM_PROCID and the rest."""
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1",
             "SLURM_JOB_ID": str(free_port()), "SLURM_JOB_NAME": "irpo_pl_test"}
    run_dir = tmp_path / "run"
    commands = [
        ([sys.executable, "-m", "irpo_pl", "fit", *TINY, "--trainer.devices", "2", "--run_dir", str(run_dir)],
         {**slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)})
        for rank in (0, 1)
    ]
    outputs = run_together(commands, cwd=tmp_path)
    check_one_writer(run_dir, outputs)
