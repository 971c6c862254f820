"""The vLLM sampler: its pure parts on CPU, fed objects shaped like vLLM's outputs; the engine itself only where vLLM and a GPU are."""

import importlib.util
from dataclasses import dataclass, field

import pytest
import torch

from irpo_pl.config import SamplingConfig
from irpo_pl.sampling_vllm import (
    completions_from_outputs,
    cut_at_stop,
    engine_kwargs,
    question_seed,
    require_vllm,
    sampling_params_kwargs,
    shard_of,
)

EOS = 2
HAVE_VLLM_AND_GPU = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@dataclass
class CompletionOutput:
    """The fields of vllm.CompletionOutput that the sampler reads (and one it does not)."""

    index: int
    token_ids: list[int]
    text: str = "vLLM's own detokenization, not used"


@dataclass
class RequestOutput:
    outputs: list[CompletionOutput] = field(default_factory=list)


def decode(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids) + "  "


def test_completions_come_in_prompt_order_and_index_order_cut_at_eos():
    outputs = [
        RequestOutput([CompletionOutput(1, [7, 8, EOS]), CompletionOutput(0, [5, EOS, 9])]),
        RequestOutput([CompletionOutput(0, [4]), CompletionOutput(1, [EOS])]),
    ]
    assert completions_from_outputs(outputs, 2, decode, [EOS]) == [["w5", "w7 w8"], ["w4", ""]]


def test_a_greedy_completion_stands_for_all_n():
    assert completions_from_outputs([RequestOutput([CompletionOutput(0, [3, EOS])])], 4, decode, [EOS]) == [["w3"] * 4]


def test_a_short_answer_is_an_error_not_a_silent_gap():
    with pytest.raises(ValueError, match="2 completions for a prompt, not 3"):
        completions_from_outputs([RequestOutput([CompletionOutput(0, [1]), CompletionOutput(1, [2])])], 3, decode, [EOS])


def test_cut_at_stop_keeps_everything_without_a_stop_token():
    assert cut_at_stop((1, 3, 4), [EOS]) == [1, 3, 4]
    assert cut_at_stop([EOS, 1], [EOS]) == []
    assert cut_at_stop([1, 9, 2], [9, EOS]) == [1]


def test_sampling_params_sample_n_with_a_seed_or_draw_once_greedily():
    sampled = sampling_params_kwargs(8, 0.7, 96, seed=123, stop_token_ids=(EOS,))
    assert sampled == {"n": 8, "temperature": 0.7, "max_tokens": 96, "seed": 123, "stop_token_ids": [EOS]}
    greedy = sampling_params_kwargs(8, 0.0, 96, seed=123, stop_token_ids=[EOS])
    assert greedy["n"] == 1 and greedy["seed"] is None


def test_question_seeds_are_fixed_and_distinct():
    seeds = [question_seed(0, q) for q in range(1000)]
    assert seeds == [question_seed(0, q) for q in range(1000)]
    assert len(set(seeds)) == 1000 and question_seed(1, 0) != seeds[0]
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_cover_every_question_once(world):
    shares = [shard_of(10, rank, world) for rank in range(world)]
    assert sorted(q for share in shares for q in share) == list(range(10))


def test_engine_kwargs_placeholder_weights_user_overrides_and_one_engine_per_process():
    single = engine_kwargs("/tmp/m", torch.bfloat16, 5, world=1)
    assert single["model"] == "/tmp/m" and single["load_format"] == "dummy" and single["dtype"] == "bfloat16"
    assert "distributed_executor_backend" not in single
    several = engine_kwargs("/tmp/m", torch.float32, 5, world=4, user={"gpu_memory_utilization": 0.6, "dtype": "float16"})
    assert several["distributed_executor_backend"] == "external_launcher"
    assert several["gpu_memory_utilization"] == 0.6 and several["dtype"] == "float16"


def test_backend_is_validated_by_name(capsys):
    from irpo_pl.cli import parse

    with pytest.raises(SystemExit):
        parse(["fit", "--data.sampling.backend", "sglang"])
    assert "sampling.backend" in capsys.readouterr().err


def test_weights_reach_the_engine_by_reference_and_are_not_kept(toy_policy):
    """The handover, with a stand-in for vllm.LLM: apply_model runs the function on the engine's model, here."""
    from irpo_pl import sampling_vllm

    model, _ = toy_policy
    received = {}

    class EngineModel:
        def load_weights(self, weights):
            received.update(weights)

    class LLM:
        def __init__(self):
            self.prefix_cache_resets = 0

        def apply_model(self, function):
            return [function(EngineModel())]

        def reset_prefix_cache(self):
            self.prefix_cache_resets += 1

    llm = LLM()
    sampling_vllm._load_weights(llm, model)
    assert received.keys() == model.state_dict().keys()
    assert all(received[name].data_ptr() == tensor.data_ptr() for name, tensor in model.state_dict().items()), "weights were copied"
    assert llm.prefix_cache_resets == 1 and not sampling_vllm._PENDING_WEIGHTS


def test_an_engine_in_another_process_is_a_clear_error(toy_policy):
    from irpo_pl import sampling_vllm

    class OutOfProcessLLM:
        def apply_model(self, function):
            return [0]  # what the function returns where _load_weights's weights are not

    with pytest.raises(RuntimeError, match="VLLM_ENABLE_V1_MULTIPROCESSING"):
        sampling_vllm._load_weights(OutOfProcessLLM(), toy_policy[0])


@pytest.mark.skipif(HAVE_VLLM_AND_GPU, reason="vLLM and a CUDA GPU are here")
def test_without_vllm_or_a_gpu_the_backend_says_what_is_missing():
    with pytest.raises((ImportError, RuntimeError), match=r"sampling\.backend 'vllm' needs (vLLM: pip install vllm|a CUDA GPU)"):
        require_vllm()


@pytest.mark.skipif(HAVE_VLLM_AND_GPU, reason="vLLM and a CUDA GPU are here")
def test_the_datamodule_dispatches_to_the_vllm_backend(tmp_path, toy_task, toy_policy):
    from irpo_pl.datamodule import DataPhase, IRPODataModule
    from irpo_pl.objectives import IRPO

    model, tokenizer = toy_policy
    examples = toy_task.load_split("train")[:2]
    data = IRPODataModule(sampling=SamplingConfig(backend="vllm"))
    data.begin_phase(DataPhase(tmp_path, examples, IRPO(), batch_size=4, seed=0))
    with pytest.raises((ImportError, RuntimeError), match=r"sampling\.backend 'vllm'"):
        data._sample_and_score(model, tokenizer, [toy_task.prompt(e) for e in examples])


@pytest.mark.skipif(not HAVE_VLLM_AND_GPU, reason="needs vLLM (pip install vllm) and a CUDA GPU")
def test_vllm_draws_n_per_prompt_from_the_policy_reproducibly(toy_policy, toy_task):
    from irpo_pl.models import format_prompt
    from irpo_pl.sampling import generate_completions
    from irpo_pl.sampling_vllm import generate_completions_vllm

    model, tokenizer = toy_policy
    model.cuda()
    prompts = [format_prompt(tokenizer, toy_task.prompt(row)) for row in toy_task.load_split("test")[:6]]
    engine = {"max_model_len": 256, "gpu_memory_utilization": 0.2, "enforce_eager": True}
    draws = [generate_completions_vllm(model, tokenizer, prompts, 3, 1.0, 12, 0, seed=7, engine_args=engine) for _ in range(2)]
    assert len(draws[0]) == 6 and all(len(samples) == 3 for samples in draws[0])
    assert all(len(sample.split()) <= 12 for samples in draws[0] for sample in samples)
    assert draws[0] == draws[1]
    # Greedy, the engine computes what the policy does: the same text, but for a near-tie (other kernels).
    greedy = generate_completions_vllm(model, tokenizer, prompts, 1, 0.0, 12, 0, engine_args=engine)
    reference = generate_completions(model, tokenizer, prompts, 1, 0.0, 12, 64, progress=False)
    assert sum(a == b for a, b in zip(greedy, reference)) >= len(prompts) - 1, (greedy, reference)
    # New weights reach the engine: after zeroing the policy's, its draws change.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    assert generate_completions_vllm(model, tokenizer, prompts, 1, 0.0, 12, 0, engine_args=engine) != greedy
