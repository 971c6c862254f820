import os
import subprocess
import sys

import pytest

from irpo_pl.allocator import keep_freed_memory

# Each step allocates, touches and frees activation-sized blocks, as a training step does. Plain
# malloc through ctypes: torch's own start-up allocations made the page-fault counts noisy.
FAULTS_PER_STEP = """
import ctypes, resource, sys
from irpo_pl.allocator import keep_freed_memory
if sys.argv[1] == "library":  # building the module and data module must leave glibc as it is
    from irpo_pl.datamodule import IRPODataModule
    from irpo_pl.module import IRPOModule
    IRPOModule(); IRPODataModule()
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
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
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def faults_per_step(mode: str) -> tuple[bool, float]:
    # No MALLOC_* or LD_PRELOAD from the caller's environment.
    env = {"PATH": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    output = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True, check=True, env=env).stdout.split()
    return output[0] == "True", float(output[1])


def test_freed_memory_is_reused_instead_of_faulted_in_again():
    applied, tuned = faults_per_step("tuned")
    if not applied:
        pytest.skip("not glibc: the allocator is left as it is")
    _, default = faults_per_step("default")
    assert tuned < 0.5 * default, (tuned, default)


def test_building_the_module_leaves_the_allocator_alone():
    """Only the CLI entry point tunes glibc, and only where the row streams need it."""
    applied, tuned = faults_per_step("tuned")
    if not applied:
        pytest.skip("not glibc: the allocator is left as it is")
    _, after_library = faults_per_step("library")
    assert after_library > 2 * tuned, (after_library, tuned)


def test_a_users_own_allocator_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert keep_freed_memory() is False
