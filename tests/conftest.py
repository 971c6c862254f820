"""Shared fixtures: offline mode, the shared data folder, a tiny toy policy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests must never reach the hub; a missing local file should fail, not download.
os.environ["HF_HUB_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The shared data folder: $IRPO_SHARED_DATA, else ../shared/data beside the repository."""
    path = Path(os.environ.get("IRPO_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"no shared data folder at {path} (set IRPO_SHARED_DATA to the folder that holds gsm8k/)")
    return path


@pytest.fixture(scope="session")
def toy_task():
    from irpo_pl.tasks import get_task

    return get_task("toy", num_train=300, num_test=50)


@pytest.fixture
def toy_policy(toy_task):
    """A freshly initialised tiny Llama and its word-level tokenizer (same weights every time)."""
    import torch

    from irpo_pl.config import PolicyConfig, ToyModelConfig
    from irpo_pl.models import load_policy

    torch.manual_seed(0)
    config = PolicyConfig(toy=ToyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2))
    return load_policy(config, toy_task.vocabulary(), max_positions=256)
