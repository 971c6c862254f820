"""Row streams: on a CPU, split a batch by rows and run the parts at the same time, one core each.

A small model's step is many small operations (norms, rotary embeddings, attention,
Python dispatch) that one stream cannot spread over a CPU's cores: on the 2-core
benchmark machine, two intra-op threads make a training step only ~1.5x faster than
one. Two streams of whole operations, each with its own share of the threads, keep
every core busy instead: there the reference pre-pass took 0.88-0.91x its time and a
training step 0.95x (docs/benchmarks.md).

Streams run in threads of this process (PyTorch releases the GIL inside its
operations), so the parts share the model and their gradients add up in it. Each
parameter receives exactly one gradient per stream, and with two streams the sum
does not depend on which arrives first (a + b == b + a): runs stay deterministic.
With three, the order of the additions would change the sum; hence MAX_STREAMS.

They need freed memory kept in the process (allocator.keep_freed_memory, which
IRPOModule applies): with glibc's defaults each thread's malloc arena returns its
blocks to the kernel every step, and the benchmark's run took 46 s instead of 24.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import TypeVar

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

MAX_STREAMS = 2
Part = TypeVar("Part")
Result = TypeVar("Result")


def usable_streams(requested: int, trainer) -> int:
    """How many streams a Trainer's run can use: `requested` (at most 2) on one CPU device in full precision, else 1.

    Off the CPU, a device already runs each operation wide; DDP's and FSDP's gradient
    hooks expect one backward at a time; autocast would not reach the streams (its
    state is per thread). Each stream needs at least one thread.
    """
    one_cpu = isinstance(trainer.strategy, SingleDeviceStrategy) and trainer.strategy.root_device.type == "cpu"
    if requested < 2 or not one_cpu or str(trainer.precision) not in ("32-true", "32", "64-true", "64"):
        return 1
    return min(requested, MAX_STREAMS, torch.get_num_threads())


def split_rows(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """Rows 0, n, 2n... then 1, n+1... of every tensor: length-sorted rows give each part a similar load."""
    return [{key: value[start::parts] for key, value in batch.items()} for start in range(parts)]


def interleave_back(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Undo `split_rows` on per-row results: row i of the batch comes back to position i."""
    rows = sum(len(part) for part in parts)
    order = torch.cat([torch.arange(start, rows, len(parts)) for start in range(len(parts))])
    return torch.cat(list(parts))[torch.argsort(order)]


def run_streams(fn: Callable[[Part], Result], parts: Sequence[Part], streams: int) -> list[Result]:
    """`fn` on every part, `streams` at a time, each with an equal share of this process's threads.

    Gradient mode is per thread, so the caller's is carried into the streams. The
    results come back in the order of `parts`.
    """
    threads = torch.get_num_threads()
    share = max(1, threads // streams)
    grad_enabled = torch.is_grad_enabled()

    def run(part: Part) -> Result:
        # Sets this worker's own OpenMP team size as well as the process-wide value.
        torch.set_num_threads(share)
        with torch.set_grad_enabled(grad_enabled):
            return fn(part)

    torch.set_num_threads(share)
    try:
        return list(_pool(streams).map(run, parts))
    finally:
        torch.set_num_threads(threads)


@cache
def _pool(streams: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=streams, thread_name_prefix="irpo_pl-stream")
