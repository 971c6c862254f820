"""Library code changes no process-wide state: building the module and data module, and sampling, leave
thread counts, environment variables and jsonargparse's settings as they were (glibc's allocator:
tests/test_allocator.py)."""

import os
import subprocess
import sys

import pytest
import torch

from irpo_pl.module import IRPOModule
from irpo_pl.sampling import generate_completions
from irpo_pl.sampling_vllm import environment_defaults

def test_the_module_and_sampling_change_no_thread_count_or_environment(toy_policy, toy_task):
    model, tokenizer = toy_policy
    threads, environment = torch.get_num_threads(), dict(os.environ)
    IRPOModule()
    generate_completions(model, tokenizer, [toy_task.prompt(toy_task.load_split("test")[0])], 2, 1.0, 4, 8, progress=False)
    assert torch.get_num_threads() == threads
    assert dict(os.environ) == environment


def test_environment_defaults_last_only_for_their_block(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("IRPO_PL_TEST_SETTING", raising=False)
    with environment_defaults({"RANK": "0", "IRPO_PL_TEST_SETTING": "1"}):
        assert os.environ["RANK"] == "3" and os.environ["IRPO_PL_TEST_SETTING"] == "1"
    assert os.environ["RANK"] == "3" and "IRPO_PL_TEST_SETTING" not in os.environ


def test_jsonargparse_settings_are_set_by_the_entry_point_only():
    read = "import jsonargparse._optionals as o; print(o._docstring_parse_options['attribute_docstrings'])"
    before = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, check=True).stdout
    after_import = subprocess.run([sys.executable, "-c", "import irpo_pl.cli, irpo_pl.module, irpo_pl.datamodule; " + read], capture_output=True, text=True, check=True).stdout
    assert after_import == before
