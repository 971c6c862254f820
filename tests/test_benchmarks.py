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
