"""Drawing completions with vLLM (`sampling.backend: vllm`): same call and result as sampling.generate_completions.

vLLM is optional (`pip install vllm`, or `pip install 'irpo_pl[vllm]'`) and runs on CUDA GPUs only;
it is imported on first use. One engine (`vllm.LLM`) per process serves the whole run: it is built
on the first call from the policy's config and tokenizer with placeholder weights
(`load_format="dummy"`), and every call, at the start of an iteration's data step, first copies the
policy's current weights into it (`LLM.apply_model` -> the model's `load_weights`), so it samples
from M_t. The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the weights pass
by reference, never through a pipe.

Reproducible: each question gets one seeded request (`SamplingParams(n=N, seed=...)`), its seed
derived from (seed, question) as the HF backend's are, so a question's draws depend neither on its
batch-mates nor on the number of processes, up to vLLM's kernels (not batch-invariant). They are
not the HF backend's draws: the two backends use different random streams.

Under torch.distributed (`--trainer.strategy fsdp`) every process runs an engine of its own on its
own GPU (vLLM's "external_launcher" backend, tensor_parallel_size 1), draws its share of the
questions, and the processes exchange results, as the HF backend does. Each engine holds the whole
model beside the process's training shard, so this suits models that fit on one GPU.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from irpo_pl.adapters import has_adapter, merged_state_dict
from irpo_pl.distributed import rank_and_world
from irpo_pl.models import encode_prompt
from irpo_pl.sampling import sequence_seed

# Training shares the GPU with the engine; sampling.vllm_args overrides any of these.
ENGINE_DEFAULTS: dict[str, Any] = {"gpu_memory_utilization": 0.3}


class CompletionLike(Protocol):
    """The fields of a vllm.CompletionOutput that are read here."""

    index: int
    token_ids: Sequence[int]


class RequestOutputLike(Protocol):
    """The field of a vllm.RequestOutput that is read here."""

    outputs: Sequence[CompletionLike]


def require_vllm():
    """The vllm module, or an error that says what is missing: the package, or a CUDA GPU."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            "sampling.backend 'vllm' needs vLLM: pip install vllm (or pip install 'irpo_pl[vllm]'). "
            "vLLM runs on CUDA GPUs only; on CPUs use sampling.backend hf."
        ) from error
    if not torch.cuda.is_available():
        raise RuntimeError("sampling.backend 'vllm' needs a CUDA GPU, and torch sees none; use sampling.backend hf on CPUs.")
    return vllm


def question_seed(seed: int, question: int) -> int:
    """The seed of question `question`'s request: its N draws come from one stream, whatever else is in the batch."""
    return sequence_seed(seed, question, 0)


def sampling_params_kwargs(num_samples: int, temperature: float, max_new_tokens: int, seed: int, stop_token_ids: Iterable[int]) -> dict:
    """Keyword arguments of one question's vllm.SamplingParams: N draws at `temperature`, plain sampling.

    Temperature 0 is greedy: one draw, which completions_from_outputs repeats N times (N greedy
    draws would be the same). top_p and top_k stay off, as in the HF backend.
    """
    greedy = temperature == 0
    return {
        "n": 1 if greedy else num_samples,
        "temperature": temperature,
        "max_tokens": max_new_tokens,
        "seed": None if greedy else seed,
        "stop_token_ids": list(stop_token_ids),
    }


def shard_of(num_questions: int, rank: int, world: int) -> list[int]:
    """The questions process `rank` of `world` draws for; together the shares cover each question once."""
    return list(range(rank, num_questions, world))


def cut_at_stop(token_ids: Sequence[int], stop_token_ids: Iterable[int]) -> list[int]:
    """The tokens before the first stop token (EOS): vLLM may or may not include the one it stopped on."""
    stops = set(stop_token_ids)
    for position, token in enumerate(token_ids):
        if token in stops:
            return list(token_ids[:position])
    return list(token_ids)


def completions_from_outputs(
    outputs: Sequence[RequestOutputLike], num_samples: int, decode: Callable[[list[int]], str], stop_token_ids: Iterable[int]
) -> list[list[str]]:
    """vLLM's results, one RequestOutput per prompt in the prompts' order, as N stripped strings per prompt.

    Completions are put in their `index` order and decoded from their tokens, cut at EOS, as the
    HF backend decodes its own; a prompt with one completion (greedy) has it repeated N times.
    """
    stop_token_ids = list(stop_token_ids)
    completions = []
    for request in outputs:
        texts = [decode(cut_at_stop(c.token_ids, stop_token_ids)).strip() for c in sorted(request.outputs, key=lambda c: c.index)]
        if len(texts) == 1:
            texts *= num_samples
        if len(texts) != num_samples:
            raise ValueError(f"vLLM returned {len(texts)} completions for a prompt, not {num_samples}")
        completions.append(texts)
    return completions


def engine_kwargs(model_dir: str, dtype: torch.dtype, seed: int, world: int, user: dict | None = None) -> dict:
    """Keyword arguments of vllm.LLM: placeholder weights (the policy's are loaded next), one GPU each."""
    kwargs = {"model": model_dir, "load_format": "dummy", "dtype": str(dtype).removeprefix("torch."), "seed": seed, **ENGINE_DEFAULTS}
    if world > 1:
        # Each process its own engine, inside the process group torch.distributed already has.
        kwargs["distributed_executor_backend"] = "external_launcher"
    return {**kwargs, **(user or {})}


@dataclass
class _Engine:
    llm: Any
    folder: tempfile.TemporaryDirectory  # the config and tokenizer the engine was built from


_ENGINE: _Engine | None = None
_PENDING_WEIGHTS: dict[str, torch.Tensor] = {}


@torch.no_grad()
def generate_completions_vllm(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    num_samples: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int = 0,
    seed: int = 0,
    cache: str = "static",
    desc: str = "sampling",
    progress: bool = True,
    engine_args: dict | None = None,
) -> list[list[str]]:
    """`num_samples` completions for each prompt, in the prompts' order, drawn by vLLM from `model`'s current weights.

    `batch_size` and `cache` are the HF backend's and unused: vLLM schedules its own batches
    (tune it with `engine_args`, keyword arguments of vllm.LLM such as gpu_memory_utilization).
    Under torch.distributed every process must call this, as it gathers the sharded weights.
    """
    vllm = require_vllm()
    rank, world = rank_and_world()
    engine = _engine(vllm, model, tokenizer, seed, world, engine_args)
    _load_weights(engine.llm, model)
    stop_token_ids = [tokenizer.eos_token_id]
    mine = shard_of(len(prompts), rank, world)
    results: dict[int, list[str]] = {}
    if mine:
        outputs = engine.llm.generate(
            [{"prompt_token_ids": encode_prompt(tokenizer, prompts[i])} for i in mine],
            sampling_params=[
                vllm.SamplingParams(**sampling_params_kwargs(num_samples, temperature, max_new_tokens, question_seed(seed, i), stop_token_ids))
                for i in mine
            ],
            use_tqdm=progress and rank == 0,
        )
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        results = dict(zip(mine, completions_from_outputs(outputs, num_samples, decode, stop_token_ids)))
    if world > 1:
        gathered: list[dict] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, results)
        results = {index: texts for part in gathered for index, texts in part.items()}
    return [results[i] for i in range(len(prompts))]


def _engine(vllm, model: torch.nn.Module, tokenizer, seed: int, world: int, engine_args: dict | None) -> _Engine:
    """This process's engine, built on first use."""
    global _ENGINE
    if _ENGINE is None:
        # In this process, so that apply_model hands the weights over by reference (and vLLM requires it under external_launcher).
        settings = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if world > 1:  # what external_launcher reads; Lightning's launcher does not set all of them
            settings.update(RANK=str(dist.get_rank()), WORLD_SIZE=str(world), LOCAL_RANK=str(torch.cuda.current_device()))
        folder = tempfile.TemporaryDirectory(prefix="irpo_pl_vllm_")
        model.config.save_pretrained(folder.name)
        tokenizer.save_pretrained(folder.name)
        dtype = next(model.parameters()).dtype
        with environment_defaults(settings):
            _ENGINE = _Engine(vllm.LLM(**engine_kwargs(folder.name, dtype, seed, world, engine_args)), folder)
    return _ENGINE


@contextmanager
def environment_defaults(settings: dict[str, str]):
    """The variables of `settings` that are not set already, for the duration of the block only (the engine reads them as it starts)."""
    added = {name: value for name, value in settings.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _load_weights(llm, model: torch.nn.Module) -> None:
    """Copy `model`'s weights, gathered whole if sharded (every process gets them all), into the engine."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    else:
        state = model.state_dict()
    if has_adapter(model):
        state = merged_state_dict(model, state)  # the engine's model has the plain architecture's names
    _PENDING_WEIGHTS.update(state)
    try:
        loaded = llm.apply_model(_load_pending_weights)
    finally:
        _PENDING_WEIGHTS.clear()
    if not loaded or not all(loaded):
        raise RuntimeError(
            "vLLM's model runs in another process, where the policy's weights cannot reach it: "
            "leave VLLM_ENABLE_V1_MULTIPROCESSING unset (or 0) when sampling.backend is vllm"
        )
    if hasattr(llm, "reset_prefix_cache"):
        llm.reset_prefix_cache()  # cached prompt states were computed with the old weights


def _load_pending_weights(model: torch.nn.Module) -> int:
    """Run by vLLM on its model, in this process: load the weights put aside by _load_weights."""
    model.load_weights(iter(_PENDING_WEIGHTS.items()))
    return len(_PENDING_WEIGHTS)
