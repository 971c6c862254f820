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
        "--data.task.args", '{"num_train": 120, "num_test": 30, "shortcut_fraction": 1.0}', "--data.task", '{"gold_chains": null}',
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
    assert (tmp_path / "ablation.md").read_text().count("\n| ") == (1 + 4) + (1 + 4) + (1 + 2)
    assert (tmp_path / "ablation.png").stat().st_size > 0

    finished = subprocess.run([sys.executable, "benchmarks/toy_answer_styles.py", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    styles = json.loads((tmp_path / "answer_styles.json").read_text())["styles"]
    for method in ("sft", "star", "dpo", "irpo"):
        # Both scripts decode the same test questions greedily with the same saved models.
        assert [s["accuracy"] for s in styles[method][0]] == pytest.approx(ablation["greedy"][method][0])
        assert all(0 <= s["worked_share"] <= 1 for s in styles[method][0])


def test_gpu_check_cpu_smoke_runs_every_section_on_the_device_it_reports():
    # benchmarks/gpu_check.py's GPU sections, at tiny sizes on the CPU: same code paths, same JSON keys.
    finished = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    assert {"cpu_smoke", "device", "packages", "missing", "all_phases_on_device", "loop", "train", "sampler", "seconds"} <= set(result)
    assert result["cpu_smoke"] is True and result["device"]["type"] == "cpu" and result["device"]["peak_bf16_tflops"] is None
    assert result["all_phases_on_device"] is True

    # (a) the loop through the real CLI: the warm start and one IRPO iteration, each phase seen on the CPU.
    loop = result["loop"]
    assert loop["ok"] and loop["error"] is None, loop
    assert all(loop["checks"].values()) and loop["unplaced_forwards"] is None
    assert [row["kind"] for row in loop["iterations"]] == ["warm_start", "irpo"]
    for row in loop["iterations"]:
        phases = {"training", "eval"} | ({"sampling", "reference"} if row["kind"] == "irpo" else set())
        assert row["devices"] == dict.fromkeys(phases, "cpu"), row
        assert set(row["dtypes"].values()) == {"bfloat16"} and row["model_dtype"] == "bfloat16"
        assert all(row["forwards"][phase] > 0 for phase in phases)
        # summary.json's own per-phase devices, where the package writes them, name the CPU too.
        assert "cuda" not in json.dumps(row["devices_reported"])
        assert 0 <= row["test_accuracy"] <= 1 and row["seconds"]["training"] > 0 and "eval" in row["seconds"]
    assert loop["iterations"][1]["num_pairs"] > 0 and set(loop["iterations"][1]["seconds"]) >= {"sampling", "reference"}
    assert loop["accuracy"] == [row["test_accuracy"] for row in loop["iterations"]]

    # (b) the training step: ours (and TRL's where it is installed), with the figures' arithmetic.
    train = result["train"]
    assert train["matmul"]["error"] is None and train["matmul"]["tflops"] > 0
    ours = train["ours"]
    assert ours["error"] is None, ours
    assert ours["devices"] == {"reference": "cpu", "training": "cpu"} and ours["dtypes"] == {"reference": "bfloat16", "training": "bfloat16"}
    assert ours["tokens_per_s"] > 0 and ours["mfu"] is None and ours["mfu_vs_matmul"] > 0
    assert ours["tokens_per_s"] == pytest.approx(ours["timed_tokens"] / ours["timed_seconds"], rel=0.02)
    assert ours["timed_steps"] * ours["batch_size"] * ours["tokens_per_pair"] == ours["timed_tokens"]
    assert ours["params_counted"] < ours["params_total"] and ours["reference_seconds"] > 0
    assert ours["last_loss"] == ours["last_loss"]  # finite, not NaN
    trl = train["trl"]
    if importlib.util.find_spec("trl") is None:
        assert trl["error"] and "trl" in trl["error"]
    else:
        assert trl["error"] is None, trl
        assert trl["devices"] == {"training": "cpu"} and trl["tokens_per_s"] > 0 and trl["tokenization_matches"]
        assert trl["timed_tokens"] == ours["timed_tokens"] and train["speedup"] == pytest.approx(ours["tokens_per_s"] / trl["tokens_per_s"], rel=0.01)

    # (c) the sampler: the same shapes three times, every sequence generated on the CPU.
    sampler = result["sampler"]
    assert sampler["error"] is None and sampler["model"]["error"] is None
    for key in ("greedy_first_call", "greedy", "sampled"):
        draw = sampler[key]
        assert draw["error"] is None, draw
        assert draw["devices"] == {"sampling": "cpu"} and draw["tokens_per_s"] > 0
        assert draw["generated_tokens"] == sampler["model"]["sequences"] * sampler["model"]["max_new_tokens"] >= draw["counted_tokens"] > 0
