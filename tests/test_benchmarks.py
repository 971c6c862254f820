"""The benchmark scripts run end to end on tiny sizes, so they cannot rot; their figures are not checked here."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _last_json_line(command: list[str]) -> dict:
    finished = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])


def test_train_throughput_compares_both_sides_on_the_same_pairs():
    if importlib.util.find_spec("trl") is None:
        pytest.skip("TRL is not installed (pip install -e '.[bench]')")
    result = _last_json_line(["benchmarks/train_throughput.py", "--json", "--runs", "1", "--pairs", "32", "--threads", "1"])
    assert result["ours_tokens_per_s"] > 0 and result["trl_tokens_per_s"] > 0
    assert result["speedup"] == pytest.approx(result["ours_tokens_per_s"] / result["trl_tokens_per_s"], rel=0.01)
    assert 0 < result["peak_rss_ratio"]


def test_sampling_throughput_reports_both_samplers():
    result = _last_json_line(["benchmarks/sampling_throughput.py", "--json", "--questions", "4", "--max_new_tokens", "8", "--threads", "1"])
    assert result["plain_tokens_per_s"] > 0 and result["ours_tokens_per_s"] > 0


def test_toy_ablation_and_answer_styles_on_a_tiny_sweep(tmp_path):
    # Every gold answer bare: a barely trained model's guesses are sometimes right, so STaR has rows.
    tiny = [
        "--data.task.args", '{"num_train": 120, "num_test": 30, "shortcut_fraction": 1.0}',
        "--model.policy.toy", '{"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2}',
        "--warm_start.steps", "100", "--iterations", "1", "--data.sampling.questions_per_iteration", "30",
        "--data.sampling.num_samples", "8", "--data.sampling.max_new_tokens", "40", "--data.batch_size", "8",
    ]
    command = [sys.executable, "benchmarks/toy_ablation.py", "--out", str(tmp_path), "--seeds", "0", "--steps", "2", "--maj_k", "2", "--iteration_maj_k", "0", "--", *tiny]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    ablation = json.loads((tmp_path / "ablation.json").read_text())
    for method in ("sft", "star", "dpo", "irpo"):
        [accuracies] = ablation["greedy"][method]
        assert len(accuracies) == 2 and all(0 <= a <= 1 for a in accuracies)
    assert (tmp_path / "ablation.md").read_text().count("\n| ") == 4 + 1 + 2 + 1
    assert (tmp_path / "ablation.png").stat().st_size > 0

    finished = subprocess.run([sys.executable, "benchmarks/toy_answer_styles.py", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    styles = json.loads((tmp_path / "answer_styles.json").read_text())["styles"]
    for method in ("sft", "star", "dpo", "irpo"):
        # Both scripts decode the same test questions greedily with the same saved models.
        assert [s["accuracy"] for s in styles[method][0]] == pytest.approx(ablation["greedy"][method][0])
        assert all(0 <= s["worked_share"] <= 1 for s in styles[method][0])
