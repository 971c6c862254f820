"""Library code changes no process-wide state: building the module and data module, and sampling, leave
thread counts, environment variables, jsonargparse's settings and glibc's allocator as they were."""

import os
import subprocess
import sys

import pytest
import torch

from irpo_pl.module import IRPOModule
from irpo_pl.sampling import generate_completions
from irpo_pl.sampling_vllm import environment_defaults

# What the test below does between two measurements of glibc's behaviour: if anything had called
# allocator.keep_freed_memory, freed blocks would be reused instead of faulted in again.
AFTER_LIBRARY_USE = """
import ctypes, resource, sys
from irpo_pl.datamodule import IRPODataModule
from irpo_pl.module import IRPOModule
IRPOModule(); IRPODataModule()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 4 << 20
def step():
    blocks = [libc.malloc(SIZE) for _ in range(8)]
    for block in blocks:
        ctypes.memset(block, 1, SIZE)
    for block in blocks:
        libc.free(block)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def test_the_module_and_sampling_change_no_thread_count_or_environment(toy_policy, toy_task):
    model, tokenizer = toy_policy
    threads, environment = torch.get_num_threads(), dict(os.environ)
    IRPOModule()
    generate_completions(model, tokenizer, [toy_task.prompt(toy_task.load_split("test")[0])], 2, 1.0, 4, 8, progress=False)
    assert torch.get_num_threads() == threads
    assert dict(os.environ) == environment


def test_building_the_module_leaves_glibcs_allocator_alone():
    from irpo_pl.allocator import _glibc

    if _glibc() is None:
        pytest.skip("not glibc")
    env = {"PATH": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    faults = float(subprocess.run([sys.executable, "-c", AFTER_LIBRARY_USE], capture_output=True, text=True, check=True, env=env).stdout.split()[-1])
    # With glibc's defaults every step faults its 32 MiB in again: 8 blocks of 1,024 pages each.
    assert faults > 0.5 * 8 * 1024, faults


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
