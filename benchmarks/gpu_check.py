"""A prepared check for a machine with one CUDA GPU: the IRPO loop, training step and sampler at GPU scale.

    python benchmarks/gpu_check.py                      # on the GPU machine, under 8 minutes on one H100/H200
    python benchmarks/gpu_check.py --cpu-smoke          # the same code paths at tiny sizes on a CPU (the test suite runs it)
    python benchmarks/gpu_check.py --sections a,c       # a subset: a (loop), b (train), c (sampler), d (memory)

Options: --timeout-per-section S (each child process below; default 240 s, smoke 600 s),
--deadline S (the whole check; sections that would start with less than 20 s left are skipped;
default 470 s, smoke 1200 s), --loop-arg ARG (repeatable: extra `fit` overrides appended to
section a's command, e.g. --loop-arg=--warm_start.steps --loop-arg=500), --workdir DIR and --keep
(where the run directories and logs go; a temporary folder, removed at the end, by default),
--verbose (echo every line the children print). It needs the repository and the package's
dependencies only: no network, no hub, every model is built from a config with random or toy weights.

The last line of stdout is ONE JSON object; stderr gets a short summary per section as it goes
(a person on a lent machine has a hard time limit). The exit code is non-zero only when section
a fails (its CLI run failed, or a phase ran off the device). Every section runs in child
processes of its own (a clean CUDA context and memory count each, and a crash, OOM or timeout
in one is reported in its "error" field while the others still run).

What the JSON holds
-------------------
- "device": {"type": "cuda" or "cpu", "name": torch.cuda.get_device_name(), "peak_bf16_tflops":
  the dense bf16 peak from a small table (H100/H200 SXM and GH200 989, H100/H200 NVL 835,
  H100 PCIe 756, A100 312; null for any other device, a CPU included)}; "packages": the version
  of each package that matters, null where it is missing; "missing": the missing ones.
- "all_phases_on_device": every phase of every section that ran did its forward passes on
  device.type ("cuda" on the GPU run, "cpu" with --cpu-smoke). Phases are told apart by a
  forward pre-hook on each causal LM (every *ForCausalLM that transformers builds in section
  a's process, the loop's policy and a reference copy included; the script's own models in b
  and c), which reads the parameters' device and dtype
  and names the phase from the call stack (`_sample_and_score`/`generate_completions`: sampling,
  `_add_reference_logps`: reference, `training_step`: training, `test_step`: eval) and the
  iteration from the loop's `_train`/`_evaluate` frames. It is an independent check of what
  the package reports.
- "loop" (section a): `python -m irpo_pl fit --config configs/toy.yaml` as a subprocess, in
  bf16-true on one GPU, with configs/toy.yaml's task on a larger training set (50,000
  questions), a 25M-parameter toy Llama (hidden 512, intermediate 1376, 8 layers, 8 heads),
  a 1,000-step warm start and 2 IRPO iterations of 1,024 questions x 8 samples. "iterations":
  one row per summary.json row: "test_accuracy" (greedy, 1,000 test questions; the warm start's
  included), "sample_accuracy", "num_pairs"/"num_rows", "steps", "seconds" (summary.json's
  per-phase wall times), "devices"/"dtypes"/"forwards" (per phase, from the hook),
  "devices_reported" (summary.json's own per-phase "devices", where the package writes them,
  else null; a phase the hook did not see counts as placed when this names its device);
  "model_saved"/"model_dtype" (iteration_<t>/model/config.json); "checks": the CLI exited 0,
  every iteration finished, its model was saved, TensorBoard event files exist, every phase
  ran on the device;
  "log_lines": the loop's own per-phase log lines; "command": the overrides used.
- "train" (section b): a random-initialised Llama of ~1.0B parameters built from a config
  (hidden 2048, intermediate 6144, 16 layers, 16 heads, no GQA, vocab 32,000, untied
  embeddings), bf16 weights, on 8-pair batches of random token pairs (prompt 256 + chosen 512
  + rejected 512 tokens). "matmul": an 8192^3 bf16 torch.matmul, 3 warm-ups then 50 timed
  products ("tflops"). "ours": IRPODataModule.from_rows + IRPOModule (IRPO: DPO + 1.0 NLL,
  beta 0.1, precomputed reference) in a Lightning Trainer, precision bf16-true, as
  benchmarks/train_throughput.py runs it on CPU; "tokens_per_s" over the timed steps only
  (3 warm-up steps excluded; CUDA synchronised at each step's end; the reference pre-pass,
  which runs before the first step, excluded); "tflops" = 6 x params_counted x tokens / time,
  where tokens = prompt + chosen + rejected of each pair, each ONCE (the useful work; our
  prefix-shared rows process exactly these), and params_counted = every parameter but the
  input embedding (a lookup, no matmul; the untied lm_head is counted; attention's
  quadratic term is not counted; so MFU is slightly understated at these lengths);
  "mfu" = tflops / peak_bf16_tflops (null where the peak is unknown); "mfu_vs_matmul" =
  tflops / matmul tflops; "reference_seconds", "reference_tflops" (2 x params_counted x
  tokens of all pairs); "with_reference_tokens_per_s" and "with_reference_mfu": the same with
  the pre-pass's time, prorated to the timed pairs, added (FLOPs 6N + 2N per token);
  "max_memory_allocated_gb"; "devices" per phase; "batch_reference_logps_dtype": the dtype in
  which training_step receives the precomputed reference log-probs (Lightning's bf16-true
  plugin converts every floating-point tensor of a batch) and "reference_logps_rounding_error":
  the largest rounding error (nats) that dtype puts on them ("reference_logps_mean" for scale). "trl": TRL's DPOTrainer on the
  same model (bf16 weights, bf16=True), the same pairs and batch size, loss_type ["sigmoid",
  "sft"], precompute_ref_log_probs (configured as in train_throughput.py's run_trl), timed and
  counted the same way (TRL runs the prompt twice per pair, "processed_tokens_per_pair"; the
  MFU still counts the useful tokens only); null figures with an "error" when TRL is missing.
  "speedup": ours tokens/s over TRL's.
- "memory" (section d): benchmarks/train_memory.py's JSON line: the peak memory of one training
  step of a 110M-parameter Llama (bf16 on the GPU: torch.cuda.max_memory_allocated, "peak_cuda_mb"
  and "cuda_over_built_mb" per setting) with activation checkpointing off ("off") and on ("on"),
  and with a LoRA adapter without and with checkpointing ("lora", "lora+ckpt").
- "sampler" (section c): irpo_pl.sampling.generate_completions on the same ~1B model, 64 random
  prompts of 64 tokens x 8 samples = 512 sequences in one batch, 128 new tokens, static cache,
  called three times with the same shapes: "greedy_first_call" (pays what is done once per
  shape: on CUDA, transformers torch.compiles a static-cache generate's decoding step, mode
  reduce-overhead; "first_call_overhead_s" is its extra time), then "greedy" (evaluation's path)
  and "sampled" (temperature 1.0: the seeded Gumbel sampler IRPO samples with), both warm.
  "tokens_per_s" counts every sequence as max_new_tokens generated tokens (a random-init model
  almost never emits EOS, and a batch runs until its last sequence ends; "counted_tokens", the
  decoded words, is the check), "seconds_timed", "seconds_per_step", "max_memory_allocated_gb",
  "devices".

The probe's "forwards"/"eager_forwards" count the eager forward passes only: a compiled
decoding step skips the hook, the prefill of every generate call does not.
Every "seconds" at a section's top is its child process's wall time, start-up included.

Expected time on one H200 (estimated, not yet measured): a ~2.5 min (process start and 50,000
questions prepared ~25 s, warm start ~25 s, three evaluations and two iterations of sampling,
pre-pass and training ~50 s, plus the compiles of generate's decoding step ~1 min), b ~1.5 min
(two processes: start, model built on the GPU, 15 steps each; the matmul takes a second), c
~2 min (start, then the decoding step's compile in the first call, and the sampled call whose
seeded noise is drawn on the CPU: 512 x 32,000 float64 values per token). About 6 minutes in all;
--deadline keeps the whole under 8.

What the script sets: in its own child processes only, torch.manual_seed, and the environment
variables HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1, TOKENIZERS_PARALLELISM=false, TQDM_DISABLE=1,
PYTHONUNBUFFERED=1 and PYTHONPATH (the repository first). It leaves torch.backends.cuda.matmul,
TF32 and every other process-wide setting as they are (bf16 products do not read the TF32 flags).

Carrying the missing packages to a GPU machine
----------------------------------------------
The package imports jsonargparse (with docstring-parser and typeshed-client, its [signatures]
extra) and datasets (with dill and multiprocess) in every section; TRL is optional (section b's
"trl"). A machine without a network, such as the lent H200 (Python 3.12, torch 2.11, lightning
2.6.6, transformers 5.17, accelerate, peft, tensorboard, torchmetrics, pyarrow, pandas, xxhash,
fsspec and huggingface-hub already there), needs them as wheels (2.8 MB together). Here, in the
repository's root:

    echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 datasets==5.2.0 dill==0.4.1 \
        multiprocess==0.70.19 trl==1.16.0

then carry `.whl` (the device tool's `carry: [".whl"]`; only the repository's files and the named
paths travel, 64 MiB in all) and run there:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site && python3 benchmarks/gpu_check.py

(or `pip install --no-index --find-links .whl NAME...` where installing into the environment is
allowed). The script reports what is missing in "missing", and a section that needs a missing
package says so in its "error" without running.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the repository's irpo_pl, installed or not

# Dense bf16 peaks in TFLOP/s (no sparsity), matched in order against the lower-cased device name.
PEAK_BF16_TFLOPS = [
    ("h200 nvl", 835.0), ("h100 nvl", 835.0), ("h100 pcie", 756.0),
    ("gh200", 989.0), ("h200", 989.0), ("h100", 989.0), ("a100", 312.0),
]

# Section a's phases, per kind of summary.json row, and the function names (innermost on the call stack) that name them.
EXPECTED_PHASES = {"warm_start": ("training", "eval"), "base": ("eval",), "test": ("eval",)}
PAIR_PHASES = ("sampling", "reference", "training", "eval")
PHASE_FUNCTIONS = {
    "_sample_and_score": "sampling", "generate_completions": "sampling", "_add_reference_logps": "reference",
    "training_step": "training", "test_step": "eval", "score_eval_batch": "eval",
}
ITERATION_FRAMES = ("_train", "_evaluate")

# Packages the sections import: (import name, distribution name).
REQUIRED = [("jsonargparse", "jsonargparse"), ("docstring_parser", "docstring-parser"), ("typeshed_client", "typeshed-client"),
            ("datasets", "datasets"), ("dill", "dill"), ("multiprocess", "multiprocess")]
OPTIONAL = [("trl", "trl")]
REPORTED = ["torch", "lightning", "transformers", "tokenizers", "torchmetrics", "tensorboard", "accelerate", "peft",
            "jsonargparse", "docstring-parser", "typeshed-client", "datasets", "trl", "math-verify"]

WORD_PREFIX = "w"
BETA, ALPHA, LEARNING_RATE = 0.1, 1.0, 1e-5

# ---- sizes ------------------------------------------------------------------------------------

GPU_SIZES = {
    "loop": {
        "model": {"hidden_size": 512, "intermediate_size": 1376, "num_layers": 8, "num_heads": 8},
        "task": {"num_train": 50000, "num_test": 1000},
        "precision": "bf16-true", "accelerator": "gpu",
        "warm_start": {"steps": 1000, "batch_size": 64, "lr": 5e-4},
        "iterations": 2, "questions_per_iteration": 1024, "num_samples": 8, "max_new_tokens": 72,
        "sampling_batch_size": 1024, "batch_size": 32, "lr": 1e-4, "eval_batch_size": 1000, "checkpoint_every": 250,
    },
    "llama": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 6144, "num_layers": 16, "num_heads": 16, "num_kv_heads": 16},
    "train": {"prompt": 256, "chosen": 512, "rejected": 512, "batch_size": 8, "warmup_steps": 3, "timed_steps": 12, "precision": "bf16-true"},
    "matmul": {"n": 8192, "warmup": 3, "reps": 50},
    "sampler": {"prompts": 64, "prompt_length": 64, "num_samples": 8, "max_new_tokens": 128, "batch_size": 512},
}

CPU_SIZES = {
    "loop": {
        "model": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2},
        "task": {"num_train": 200, "num_test": 16},
        "precision": "bf16-true", "accelerator": "cpu",
        "warm_start": {"steps": 8, "batch_size": 8, "lr": 1e-3},
        "iterations": 1, "questions_per_iteration": 12, "num_samples": 4, "max_new_tokens": 24,
        "sampling_batch_size": 48, "batch_size": 8, "lr": 1e-4, "eval_batch_size": 16, "checkpoint_every": 50,
    },
    "llama": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4},
    "train": {"prompt": 16, "chosen": 24, "rejected": 24, "batch_size": 2, "warmup_steps": 1, "timed_steps": 2, "precision": "bf16-true"},
    "matmul": {"n": 256, "warmup": 1, "reps": 3},
    "sampler": {"prompts": 4, "prompt_length": 8, "num_samples": 2, "max_new_tokens": 8, "batch_size": 8},
}

SECTION_NAMES = {"a": "loop", "b": "train", "c": "sampler", "d": "memory"}

# Section d: benchmarks/train_memory.py (one training step's peak memory with activation checkpointing off and
# on, and with LoRA), a 110M Llama in bf16 on the GPU; tiny and float32 on a CPU.
MEMORY_ARGS = {
    "gpu": ["--device", "cuda", "--dtype", "bfloat16", "--steps", "2"],
    "cpu": ["--device", "cpu", "--hidden", "64", "--intermediate", "128", "--layers", "2", "--heads", "2", "--vocab", "512",
            "--prompt", "16", "--completion", "24", "--lora_r", "4"],
}


def say(start: float, message: str) -> None:
    print(f"[gpu_check {time.perf_counter() - start:5.0f}s] {message}", file=sys.stderr, flush=True)


# ---- what runs inside the child processes -------------------------------------------------------


class Result:
    """A child's result dict, rewritten to its file after every update: what finished survives a crash or a kill."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {}

    def update(self, **values) -> None:
        self.data.update(values)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.data, default=str))
        os.replace(partial, self.path)

    def guarded(self, key: str, fn, *args, **kwargs):
        """Run fn; store its dict under `key`, or {"error": ...} when it raises."""
        start = time.perf_counter()
        try:
            value = fn(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - every failure becomes a reported error, KeyboardInterrupt too
            traceback.print_exc()
            value = {"error": _error_text(error)}
        value.setdefault("error", None)
        value["seconds"] = round(time.perf_counter() - start, 2)
        self.update(**{key: value})
        return value


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) < 1500 else text[:700] + " ... " + text[-700:]


class PhaseProbe:
    """Counts the forward passes of causal LMs by (iteration, phase, device, dtype).

    A forward pre-hook on each model (`attach`; `attach_to_new_models` does it for every
    *ForCausalLM that transformers builds from now on, the loop's policy included). It needs
    nothing from the package but the names of the functions that run each phase, read off the
    call stack. It returns at once while torch.compile traces (transformers compiles generate's
    decoding step on CUDA with a static cache), so it never breaks a compiled graph; it then
    counts the eager calls only (the prefill of every generate call among them).
    """

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, dict[str, int]]] = {}

    def attach(self, model) -> None:
        import torch

        if getattr(model, "_gpu_check_probed", False):
            return
        counts, lock = self.counts, threading.Lock()

        # A plain function, not a bound method: deepcopy (the reference model) copies it as it is.
        def hook(module, args):
            if torch.compiler.is_compiling():
                return None
            parameter = next(module.parameters(), None)
            where = "none" if parameter is None else f"{parameter.device}|{str(parameter.dtype).removeprefix('torch.')}"
            phase, iteration = _phase_and_iteration(sys._getframe(1))
            with lock:
                by_phase = counts.setdefault(iteration, {}).setdefault(phase, {})
                by_phase[where] = by_phase.get(where, 0) + 1
            return None

        model.register_forward_pre_hook(hook)
        model._gpu_check_probed = True

    def attach_to_new_models(self) -> PhaseProbe:
        from transformers import PreTrainedModel

        original, probe = PreTrainedModel.post_init, self

        def post_init(model, *args, **kwargs):
            value = original(model, *args, **kwargs)
            if type(model).__name__.endswith("ForCausalLM"):
                probe.attach(model)
            return value

        PreTrainedModel.post_init = post_init
        return self


def _phase_and_iteration(frame) -> tuple[str, str]:
    phase, iteration = None, "-"
    while frame is not None:
        code = frame.f_code
        if phase is None:
            names = getattr(code, "co_qualname", code.co_name).split(".")
            for name in reversed(names):
                if name in PHASE_FUNCTIONS:
                    phase = PHASE_FUNCTIONS[name]
                    break
        if code.co_name in ITERATION_FRAMES and frame.f_globals.get("__name__", "").startswith("irpo_pl") and "iteration" in frame.f_locals:
            iteration = str(frame.f_locals["iteration"])
            break
        frame = frame.f_back
    return phase or "other", iteration


def _phase_devices(counts: dict[str, dict[str, int]]) -> tuple[dict, dict, dict]:
    """{phase: "cuda:0"}, {phase: "bfloat16"}, {phase: forward passes} from one iteration's probe counts."""
    devices, dtypes, forwards = {}, {}, {}
    for phase, where in sorted(counts.items()):
        devices[phase] = "+".join(sorted({w.split("|")[0] for w in where}))
        dtypes[phase] = "+".join(sorted({w.split("|")[-1] for w in where}))
        forwards[phase] = sum(where.values())
    return devices, dtypes, forwards


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        import torch

        torch.cuda.synchronize()


def _memory(device_type: str) -> dict:
    if device_type != "cuda":
        return {"max_memory_allocated_gb": None}
    import torch

    return {"max_memory_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def _reset_memory(device_type: str) -> None:
    if device_type == "cuda":
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _device_info(device_type: str) -> dict:
    import torch

    if device_type != "cuda":
        return {"type": "cpu", "name": "cpu", "peak_bf16_tflops": None}
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    return {"type": "cuda", "name": name, "capability": f"{major}.{minor}", "peak_bf16_tflops": peak_bf16_tflops(name)}


def peak_bf16_tflops(device_name: str) -> float | None:
    lowered = device_name.lower()
    for key, peak in PEAK_BF16_TFLOPS:
        if key in lowered:
            return peak
    return None


def word_tokenizer(vocab_size: int):
    from irpo_pl.models import SPECIAL_TOKENS, build_word_tokenizer

    tokenizer = build_word_tokenizer([f"{WORD_PREFIX}{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))])
    assert len(tokenizer) == vocab_size, len(tokenizer)
    return tokenizer


def build_llama(tokenizer, shape: dict, device_type: str, max_positions: int):
    """A random-initialised Llama from a config, built on the device (bf16 weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device_type):
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16)


def parameter_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"params_total": total, "params_counted": total - embedding}


def make_pairs(sizes: dict, vocab_size: int, seed: int = 0) -> list[dict]:
    """Random token pairs of fixed lengths: the prompt starts with BOS (1), each completion ends with EOS (2)."""
    rng = random.Random(seed)
    first = 4  # after <pad> <s> </s> <unk>
    pairs = sizes["batch_size"] * (sizes["warmup_steps"] + sizes["timed_steps"])

    def words(n: int) -> list[int]:
        return [rng.randrange(first, vocab_size) for _ in range(n)]

    return [
        {"prompt_ids": [1] + words(sizes["prompt"] - 1), "chosen_ids": words(sizes["chosen"] - 1) + [2], "rejected_ids": words(sizes["rejected"] - 1) + [2]}
        for _ in range(pairs)
    ]


def _timed_window(times: list[float], warmup: int) -> tuple[int, float]:
    """(timed steps, seconds) from the synced timestamps: times[0] before step 0, times[i + 1] after step i."""
    steps = len(times) - 1
    if steps <= warmup:
        raise RuntimeError(f"only {steps} steps ran; {warmup} are warm-up")
    return steps - warmup, times[-1] - times[warmup]


def _significant(value: float, digits: int = 4) -> float:
    """Rounded to `digits` significant figures: a CPU smoke's TFLOP/s are tiny, a GPU's are not."""
    return float(f"{value:.{digits}g}")


def _throughput(tokens: int, seconds: float, flops_per_token: float, peak: float | None, matmul: float | None) -> dict:
    tflops = tokens * flops_per_token / seconds / 1e12
    return {
        "tokens_per_s": round(tokens / seconds, 1), "tflops": _significant(tflops),
        "mfu": _significant(tflops / peak) if peak else None, "mfu_vs_matmul": _significant(tflops / matmul) if matmul else None,
    }


def child_loop(config: dict, result: Result) -> None:
    """Section a: the real CLI, in this process, with the probe on."""
    device_type = config["device_type"]
    probe = PhaseProbe().attach_to_new_models()
    result.update(device=_device_info(device_type))
    try:
        from irpo_pl.cli import main as cli_main

        cli_main(config["cli_args"])
        result.update(cli_ok=True)
    except SystemExit as error:
        result.update(cli_ok=error.code in (0, None), cli_error=None if error.code in (0, None) else f"SystemExit({error.code})")
    except BaseException as error:  # noqa: BLE001
        traceback.print_exc()
        result.update(cli_ok=False, cli_error=_error_text(error))
    finally:
        result.update(probe=probe.counts, **_memory(device_type))


def child_train(config: dict, result: Result) -> None:
    """Section b, our side: the matmul peak, then IRPOModule + IRPODataModule.from_rows in a Lightning Trainer."""
    device_type = config["device_type"]
    device = _device_info(device_type)
    result.update(device=device)
    matmul = result.guarded("matmul", measure_matmul, device_type, **config["matmul"])
    result.guarded("ours", train_ours, config, device["peak_bf16_tflops"], matmul.get("tflops"))


def measure_matmul(device_type: str, n: int, warmup: int, reps: int) -> dict:
    import torch

    generator = torch.Generator(device=device_type).manual_seed(0)
    a = torch.randn(n, n, device=device_type, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(n, n, device=device_type, dtype=torch.bfloat16, generator=generator)
    out = torch.empty(n, n, device=device_type, dtype=torch.bfloat16)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    _sync(device_type)
    start = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b, out=out)
    _sync(device_type)
    seconds = time.perf_counter() - start
    del a, b, out
    _reset_memory(device_type)
    return {"n": n, "reps": reps, "dtype": "bfloat16", "tflops": _significant(2 * n**3 * reps / seconds / 1e12)}


def train_ours(config: dict, peak: float | None, matmul_tflops: float | None) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger

    from irpo_pl.datamodule import IRPODataModule
    from irpo_pl.module import IRPOModule
    from irpo_pl.objectives import IRPO

    device_type, sizes, shape = config["device_type"], config["train"], config["llama"]
    probe = PhaseProbe()
    tokenizer = word_tokenizer(shape["vocab_size"])
    tokens_per_pair = sizes["prompt"] + sizes["chosen"] + sizes["rejected"]
    model = build_llama(tokenizer, shape, device_type, max_positions=tokens_per_pair)
    probe.attach(model)
    counts = parameter_counts(model)
    pairs = make_pairs(sizes, shape["vocab_size"])

    class StepTimer(Callback):
        """Synced timestamps before the first step and after every step (after the optimizer step)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.rows: list[int] = []
            self.losses: list[float] = []
            self.reference_dtype = None

        def on_train_batch_start(self, trainer, module, batch, batch_index) -> None:
            if self.reference_dtype is None and "reference_logps" in batch:
                self.reference_dtype = str(batch["reference_logps"].values.dtype).removeprefix("torch.")
            if not self.times:
                _sync(device_type)
                self.times.append(time.perf_counter())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
            _sync(device_type)
            self.times.append(time.perf_counter())
            self.rows.append(len(batch["input_ids"]))
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as folder:
        objective = IRPO(beta=BETA, alpha=ALPHA)
        data = IRPODataModule.from_rows(pairs, sizes["batch_size"], objective, Path(folder) / "phase", seed=0)
        module = IRPOModule(objective=objective, lr=LEARNING_RATE, reference="precomputed", cpu_streams=1)
        module.use_policy(model, tokenizer)
        module.begin_phase(objective, LEARNING_RATE, module.warmup_ratio)
        trainer = L.Trainer(
            max_epochs=1, accelerator="gpu" if device_type == "cuda" else "cpu", devices=1, precision=sizes["precision"],
            logger=TensorBoardLogger(folder), enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
            log_every_n_steps=1, callbacks=[timer],
        )
        _reset_memory(device_type)
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        fit_seconds = time.perf_counter() - start
        rows = data.rows
    steps, seconds = _timed_window(timer.times, sizes["warmup_steps"])
    timed_pairs = sum(timer.rows[sizes["warmup_steps"]:])
    tokens = timed_pairs * tokens_per_pair
    n = counts["params_counted"]
    reference_seconds = data.stats.seconds.get("reference")
    out = {
        **counts, "tokens_per_pair": tokens_per_pair, "pairs": len(pairs), "batch_size": sizes["batch_size"],
        "warmup_steps": sizes["warmup_steps"], "timed_steps": steps, "timed_tokens": tokens, "timed_seconds": _significant(seconds),
        **_throughput(tokens, seconds, 6 * n, peak, matmul_tflops),
        "fit_seconds": round(fit_seconds, 2), "reference_seconds": None if reference_seconds is None else round(reference_seconds, 3),
        "precision": sizes["precision"], "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "first_loss": timer.losses[0] if timer.losses else None, "last_loss": timer.losses[-1] if timer.losses else None,
        **_memory(device_type),
    }
    if reference_seconds:
        all_tokens = len(pairs) * tokens_per_pair
        out["reference_tokens_per_s"] = round(all_tokens / reference_seconds, 1)
        out["reference_tflops"] = _significant(2 * n * all_tokens / reference_seconds / 1e12)
        with_reference = seconds + reference_seconds * timed_pairs / len(pairs)
        both = _throughput(tokens, with_reference, 8 * n, peak, matmul_tflops)
        out.update(with_reference_tokens_per_s=both["tokens_per_s"], with_reference_mfu=both["mfu"], with_reference_mfu_vs_matmul=both["mfu_vs_matmul"])
    out["batch_reference_logps_dtype"] = timer.reference_dtype
    if timer.reference_dtype and rows and "reference_chosen_logps" in rows[0]:
        exact = torch.tensor([r[k] for r in rows for k in ("reference_chosen_logps", "reference_rejected_logps")], dtype=torch.float64)
        rounded = exact.to(getattr(torch, timer.reference_dtype)).double()
        out["reference_logps_rounding_error"] = round(float((rounded - exact).abs().max()), 4)
        out["reference_logps_mean"] = round(float(exact.mean()), 2)
    devices, dtypes, forwards = _phase_devices(probe.counts.get("-", {}))
    out.update(devices=devices, dtypes=dtypes, forwards=forwards)
    return out


def child_trl(config: dict, result: Result) -> None:
    """Section b, TRL's side: DPOTrainer on the same model, pairs and batch size."""
    device_type = config["device_type"]
    device = _device_info(device_type)
    result.update(device=device)
    result.guarded("trl", train_trl, config, device["peak_bf16_tflops"], config.get("matmul_tflops"))


def train_trl(config: dict, peak: float | None, matmul_tflops: float | None) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from train_throughput import timed_dpo_trainer, trl_rows  # the same TRL side as the CPU benchmark

    device_type, sizes, shape = config["device_type"], config["train"], config["llama"]
    tokenizer = word_tokenizer(shape["vocab_size"])
    tokens_per_pair = sizes["prompt"] + sizes["chosen"] + sizes["rejected"]
    # TRL concatenates prompt + completion for each side, so positions run to prompt + the longer completion.
    model = build_llama(tokenizer, shape, device_type, max_positions=tokens_per_pair)
    counts = parameter_counts(model)
    pairs = make_pairs(sizes, shape["vocab_size"])
    rows = trl_rows(pairs, tokenizer)
    timings = {"reference_seconds": 0.0}
    TimedDPOTrainer = timed_dpo_trainer(DPOTrainer, timings)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.times:
                _sync(device_type)
                self.times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device_type)
            self.times.append(time.perf_counter())

    timer = StepTimer()
    steps_total = sizes["warmup_steps"] + sizes["timed_steps"]
    on_gpu = device_type == "cuda"
    with tempfile.TemporaryDirectory() as folder:
        dpo_config = DPOConfig(
            output_dir=folder, per_device_train_batch_size=sizes["batch_size"], max_steps=steps_total, learning_rate=LEARNING_RATE,
            beta=BETA, loss_type=["sigmoid", "sft"], precompute_ref_log_probs=True, precompute_ref_batch_size=sizes["batch_size"],
            gradient_checkpointing=False, bf16=on_gpu, fp16=False, use_cpu=not on_gpu, report_to="none", save_strategy="no",
            logging_steps=1, disable_tqdm=True, max_length=None, dataloader_num_workers=0,
        )
        _reset_memory(device_type)
        trainer = TimedDPOTrainer(
            model=model, args=dpo_config, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer, callbacks=[timer],
        )
        check = trainer.train_dataset[0]
        matches = check.get("prompt_ids") == pairs[0]["prompt_ids"] and check.get("chosen_ids") == pairs[0]["chosen_ids"]
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
        parameter = next(trainer.model.parameters())
        where = {"training": str(parameter.device)}
        dtype = str(parameter.dtype).removeprefix("torch.")
    steps, seconds = _timed_window(timer.times, sizes["warmup_steps"])
    tokens = steps * sizes["batch_size"] * tokens_per_pair
    n = counts["params_counted"]
    out = {
        **counts, "tokens_per_pair": tokens_per_pair, "processed_tokens_per_pair": 2 * sizes["prompt"] + sizes["chosen"] + sizes["rejected"],
        "pairs": len(pairs), "batch_size": sizes["batch_size"], "warmup_steps": sizes["warmup_steps"], "timed_steps": steps,
        "timed_tokens": tokens, "timed_seconds": _significant(seconds), **_throughput(tokens, seconds, 6 * n, peak, matmul_tflops),
        "train_seconds": round(train_seconds, 2), "reference_seconds": round(timings["reference_seconds"], 3),
        "tokenization_matches": matches, "trl_version": importlib.metadata.version("trl"), "devices": where, "dtypes": {"training": dtype},
        **_memory(device_type),
    }
    if timings["reference_seconds"]:
        with_reference = seconds + timings["reference_seconds"] * steps * sizes["batch_size"] / len(pairs)
        both = _throughput(tokens, with_reference, 8 * n, peak, matmul_tflops)
        out.update(with_reference_tokens_per_s=both["tokens_per_s"], with_reference_mfu=both["mfu"], with_reference_mfu_vs_matmul=both["mfu_vs_matmul"])
    return out


def child_sampler(config: dict, result: Result) -> None:
    """Section c: generate_completions on the ~1B model, one large batch: greedy cold, greedy warm, sampled warm.

    Every call has the same shapes (prompts, batch, max_new_tokens), so the first one pays for
    whatever is done once per shape (on CUDA, transformers compiles the decoding step of a
    static-cache generate) and the later ones show the steady state.
    """
    device_type, sizes, shape = config["device_type"], config["sampler"], config["llama"]
    result.update(device=_device_info(device_type))
    setup = {}

    def build() -> dict:
        from irpo_pl.sampling import generate_completions

        tokenizer = word_tokenizer(shape["vocab_size"])
        model = build_llama(tokenizer, shape, device_type, max_positions=sizes["prompt_length"] + sizes["max_new_tokens"] + 8)
        model.eval()
        probe = PhaseProbe()
        probe.attach(model)
        rng = random.Random(0)
        # BOS + prompt_length - 1 random words each.
        prompts = [" ".join(f"{WORD_PREFIX}{rng.randrange(shape['vocab_size'] - 4)}" for _ in range(sizes["prompt_length"] - 1)) for _ in range(sizes["prompts"])]
        setup.update(model=model, tokenizer=tokenizer, prompts=prompts, generate=generate_completions, probe=probe)
        return {
            **parameter_counts(model), "sequences": sizes["prompts"] * sizes["num_samples"], "num_samples": sizes["num_samples"],
            **{k: sizes[k] for k in ("prompts", "prompt_length", "max_new_tokens", "batch_size")}, "cache": "static",
        }

    def draw(temperature: float) -> dict:
        if not setup:
            raise RuntimeError("the model was not built")
        probe = setup["probe"]
        probe.counts.clear()
        _reset_memory(device_type)
        _sync(device_type)
        start = time.perf_counter()
        completions = setup["generate"](
            setup["model"], setup["tokenizer"], setup["prompts"], sizes["num_samples"], temperature, sizes["max_new_tokens"],
            sizes["batch_size"], seed=0, cache="static", progress=False,
        )
        _sync(device_type)
        seconds = time.perf_counter() - start
        sequences = sum(len(c) for c in completions)
        generated = sequences * sizes["max_new_tokens"]
        counted = sum(len(text.split()) for c in completions for text in c)
        devices, dtypes, forwards = _phase_devices(probe.counts.get("-", {}))
        return {
            "temperature": temperature, "sequences": sequences, "generated_tokens": generated, "counted_tokens": counted,
            "seconds_timed": _significant(seconds), "tokens_per_s": round(generated / seconds, 1),
            "seconds_per_step": round(seconds / sizes["max_new_tokens"], 4), "devices": devices, "dtypes": dtypes,
            "eager_forwards": forwards, **_memory(device_type),
        }

    result.guarded("model", build)
    cold = result.guarded("greedy_first_call", draw, 0.0)
    warm = result.guarded("greedy", draw, 0.0)
    result.guarded("sampled", draw, 1.0)
    if cold.get("seconds_timed") and warm.get("seconds_timed"):
        result.update(first_call_overhead_s=round(cold["seconds_timed"] - warm["seconds_timed"], 2))


CHILDREN = {"loop": child_loop, "train": child_train, "trl": child_trl, "sampler": child_sampler}


def run_child(kind: str, config: dict, result_path: Path) -> int:
    result = Result(result_path)
    result.update(started=True)
    CHILDREN[kind](config, result)
    result.update(finished=True)
    return 0


# ---- the parent: sections as child processes, then the report ---------------------------------


def package_versions() -> dict:
    versions = {}
    for name in REPORTED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def missing_modules(modules: list[tuple[str, str]]) -> list[str]:
    return [dist for module, dist in modules if importlib.util.find_spec(module) is None]


def child_environment() -> dict:
    path = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return {
        **os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1",
    }


def _echo_line(kind: str, line: str, verbose: bool) -> bool:
    if verbose:
        return True
    stripped = line.strip()
    return kind == "loop" and (stripped.startswith("iteration ") or stripped.startswith("irpo_pl:") or stripped.startswith("run directory"))


def spawn(kind: str, config: dict, workdir: Path, timeout: float, verbose: bool) -> dict:
    """Run one child; its result dict, with "error" set on a non-zero exit, a timeout, or no result at all."""
    result_path, log_path = workdir / f"{kind}.json", workdir / f"{kind}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--result", str(result_path), "--child-config", json.dumps(config)]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=child_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True,  # its own process group: a timeout ends it and whatever it started
        )

        def pump() -> None:
            for line in process.stdout:
                log.write(line)
                if _echo_line(kind, line, verbose):
                    print(f"    | {line.rstrip()[:300]}", file=sys.stderr, flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        reader.join(timeout=10)
    seconds = time.perf_counter() - start
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    result["wall_seconds"] = round(seconds, 1)
    if timed_out:
        result["error"] = f"timed out after {timeout:.0f} s (--timeout-per-section / --deadline)"
    elif process.returncode != 0:
        result["error"] = f"exit code {process.returncode}: " + _tail(log_path)
    elif not result.get("finished"):
        result["error"] = "the child wrote no complete result: " + _tail(log_path)
    else:
        result.setdefault("error", None)
    return result


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " / ".join(line.strip() for line in text[-lines:])[-2000:]


def loop_command(sizes: dict, run_dir: Path, extra: list[str]) -> list[str]:
    """The `fit` arguments of section a: configs/toy.yaml with GPU-scale overrides."""
    import yaml

    toy = yaml.safe_load((REPO / "configs" / "toy.yaml").read_text())
    task_args = {**toy["data"]["init_args"]["task"]["args"], **sizes["task"]}
    warm = sizes["warm_start"]
    return [
        "fit", "--config", str(REPO / "configs" / "toy.yaml"), "--run_dir", str(run_dir), "--overwrite", "true",
        "--trainer.accelerator", sizes["accelerator"], "--trainer.devices", "1", "--trainer.precision", sizes["precision"],
        "--trainer.enable_progress_bar", "false",
        "--model.policy.toy", json.dumps(sizes["model"]), "--model.cpu_streams", "1", "--model.lr", str(sizes["lr"]),
        # Every training question keeps its chain: these figures measure speed, on a warm start of the whole set.
        "--data.task.args", json.dumps(task_args), "--data.task", '{"gold_chains": null}',
        "--warm_start.steps", str(warm["steps"]), "--warm_start.batch_size", str(warm["batch_size"]), "--warm_start.lr", str(warm["lr"]),
        "--iterations", str(sizes["iterations"]), "--data.sampling.temperatures", json.dumps([1.0] * sizes["iterations"]),
        "--data.sampling.questions_per_iteration", str(sizes["questions_per_iteration"]),
        "--data.sampling.num_samples", str(sizes["num_samples"]), "--data.sampling.max_new_tokens", str(sizes["max_new_tokens"]),
        "--data.sampling.batch_size", str(sizes["sampling_batch_size"]), "--data.batch_size", str(sizes["batch_size"]),
        "--data.eval.batch_size", str(sizes["eval_batch_size"]), "--checkpoint_every", str(sizes["checkpoint_every"]),
        *extra,
    ]


def _same_device(device: str, expected: str) -> bool:
    return bool(device) and all(part.split(":")[0] == expected for part in str(device).split("+"))


DEVICE_PATTERN = re.compile(r"^(cpu|cuda|mps|xpu|hpu|xla|meta|npu)(:\d+)?$")


def _reported_devices(reported) -> list[str]:
    """Every string in a reported "devices" value (a string, or a dict or list of them, nested) that names a torch device."""
    if isinstance(reported, dict):
        return [d for value in reported.values() for d in _reported_devices(value)]
    if isinstance(reported, (list, tuple)):
        return [d for value in reported for d in _reported_devices(value)]
    return [str(reported)] if DEVICE_PATTERN.match(str(reported)) else []


def summarize_loop(child: dict, run_dir: Path, expected: str, command: list[str], log_path: Path, iterations: int) -> dict:
    """Section a's report: summary.json's rows with the probe's devices, and the checks."""
    probe = child.get("probe") or {}
    summary_path = run_dir / "summary.json"
    rows = json.loads(summary_path.read_text())["iterations"] if summary_path.exists() else []
    out_rows, off_device = [], []
    for row in rows:
        iteration = row.get("iteration")
        devices, dtypes, forwards = _phase_devices(probe.get(str(iteration), {}))
        kind = row.get("kind")
        expected_phases = EXPECTED_PHASES.get(kind, PAIR_PHASES)
        reported = row.get("devices")
        # A phase the probe did not see (the package renamed its function, say) counts when summary.json names its device.
        reported_phases = set(reported) if isinstance(reported, dict) else set()
        missing = [phase for phase in expected_phases if phase not in devices and phase not in reported_phases]
        wrong = [f"{phase} on {device}" for phase, device in devices.items() if not _same_device(device, expected)]
        if reported is not None and not all(_same_device(d, expected) for d in _reported_devices(reported)):
            wrong.append(f"summary.json says {reported}")
        if missing or wrong:
            off_device.append(f"iteration {iteration}: " + ", ".join(wrong + [f"{phase} not seen" for phase in missing]))
        model_dir = run_dir / f"iteration_{iteration}" / "model"
        model_config = model_dir / "config.json"
        saved_dtype = None
        if model_config.exists():
            saved = json.loads(model_config.read_text())
            saved_dtype = saved.get("dtype") or saved.get("torch_dtype")
        out_rows.append({
            "iteration": iteration, "kind": kind, "test_accuracy": row.get("test_accuracy"), "sample_accuracy": row.get("sample_accuracy"),
            **{key: row[key] for key in ("num_pairs", "num_rows", "steps", "questions", "test_questions") if key in row},
            "seconds": {k: round(v, 2) for k, v in (row.get("seconds") or {}).items()},
            "devices": devices, "dtypes": dtypes, "forwards": forwards, "devices_reported": reported,
            "model_saved": model_config.exists() and any(model_dir.glob("*.safetensors")), "model_dtype": saved_dtype,
        })
    # Forward passes the probe could not place in an iteration or a phase (there should be none).
    stray = {iteration: phases for iteration, phases in probe.items() if iteration == "-" or "other" in phases}
    log_lines = []
    if log_path.exists():
        log_lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip().startswith("iteration ") and " | " in line][:10]
    checks = {
        "cli_exit_ok": bool(child.get("cli_ok")) and child.get("error") is None,
        "all_iterations": [r["iteration"] for r in out_rows] == list(range(iterations + 1)),
        "models_saved": bool(out_rows) and all(r["model_saved"] for r in out_rows),
        "tensorboard_events": any((run_dir / "tensorboard").rglob("events.out.tfevents.*")) if (run_dir / "tensorboard").exists() else False,
        "phases_on_device": bool(out_rows) and not off_device,
    }
    if not checks["cli_exit_ok"]:
        # The other checks fail as a consequence; the log's last lines say why it stopped.
        errors = [child.get("error") or f"{child.get('cli_error') or 'the CLI failed'}: {_tail(log_path, 6)}"]
    else:
        errors = [f"check failed: {name}" for name, ok in checks.items() if not ok] + off_device
    return {
        "error": "; ".join(e for e in errors if e) or None, "ok": not errors, "seconds": child.get("wall_seconds"),
        "iterations": out_rows, "accuracy": [r["test_accuracy"] for r in out_rows], "checks": checks, "off_device": off_device,
        "unplaced_forwards": stray or None, "max_memory_allocated_gb": child.get("max_memory_allocated_gb"),
        "log_lines": log_lines, "command": command,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="the same code paths at tiny sizes on a CPU")
    parser.add_argument("--sections", default="a,b,c,d", help="comma-separated: a (loop), b (train), c (sampler), d (memory)")
    parser.add_argument("--timeout-per-section", type=float, default=None, help="seconds for each child process (default 240, smoke 600)")
    parser.add_argument("--deadline", type=float, default=None, help="seconds for the whole check (default 470, smoke 1200)")
    parser.add_argument("--loop-arg", action="append", default=[], help="an extra `fit` override for section a (repeatable)")
    parser.add_argument("--workdir", type=Path, default=None, help="where run directories and logs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep --workdir's temporary folder")
    parser.add_argument("--verbose", action="store_true", help="echo everything the children print to stderr")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args.child, json.loads(args.child_config), args.result)

    start = time.perf_counter()
    sections = []
    for token in args.sections.split(","):
        token = token.strip()
        name = SECTION_NAMES.get(token, token)
        if name not in SECTION_NAMES.values():
            parser.error(f"--sections: unknown section {token!r}; use a, b, c, d (or loop, train, sampler, memory)")
        sections.append(name)
    smoke = args.cpu_smoke
    sizes = CPU_SIZES if smoke else GPU_SIZES
    timeout = args.timeout_per_section or (600.0 if smoke else 240.0)
    deadline = args.deadline or (1200.0 if smoke else 470.0)
    expected = "cpu" if smoke else "cuda"

    import torch  # not initialised on the GPU here: is_available asks the driver without creating a context

    cuda = torch.cuda.is_available()
    versions = package_versions()
    missing = missing_modules(REQUIRED) + missing_modules(OPTIONAL)
    report: dict = {
        "gpu_check": 1, "cpu_smoke": smoke, "sections": sections, "device": {"type": expected, "name": None, "peak_bf16_tflops": None},
        "packages": versions, "missing": missing, "all_phases_on_device": None,
    }
    say(start, f"{'CPU smoke' if smoke else 'GPU check'}: sections {','.join(sections)}; {timeout:.0f} s per child, {deadline:.0f} s in all; "
               f"torch {versions['torch']}, lightning {versions['lightning']}, transformers {versions['transformers']}"
               + (f"; missing: {', '.join(missing)}" if missing else ""))

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    base = {"device_type": expected, **sizes}

    def precheck(needs: list[tuple[str, str]]) -> str | None:
        if not smoke and not cuda:
            return "no CUDA device (torch.cuda.is_available() is False); on a CPU use --cpu-smoke"
        lacking = missing_modules(needs)
        if lacking:
            return f"missing packages: {', '.join(lacking)} (carry their wheels: see the top of benchmarks/gpu_check.py)"
        return None

    def launch(kind: str, config: dict, label: str) -> dict:
        left = deadline - (time.perf_counter() - start)
        if left < 20:
            say(start, f"{label}: skipped, {left:.0f} s left of --deadline")
            return {"error": f"skipped: {left:.0f} s left of the {deadline:.0f} s --deadline"}
        limit = min(timeout, left)
        say(start, f"{label}: starting (at most {limit:.0f} s)")
        return spawn(kind, config, workdir, limit, args.verbose)

    def note_device(child: dict) -> None:
        device = child.get("device")
        if isinstance(device, dict) and device.get("name") and report["device"]["name"] is None:
            report["device"] = device

    placements: list[bool] = []

    if "loop" in sections:
        problem = precheck(REQUIRED)
        run_dir = workdir / "loop_run"
        command = loop_command(sizes["loop"], run_dir, args.loop_arg)
        if problem:
            loop = {"error": problem, "ok": False, "command": command}
        else:
            child = launch("loop", {**base, "cli_args": command}, "a loop")
            note_device(child)
            loop = summarize_loop(child, run_dir, expected, command, workdir / "loop.log", sizes["loop"]["iterations"])
            placements.append(loop["checks"]["phases_on_device"])
        report["loop"] = loop
        accuracy = " -> ".join("?" if a is None else f"{a:.1%}" for a in loop.get("accuracy", []))
        say(start, f"a loop: {'ok' if loop.get('ok') else 'FAILED'} in {loop.get('seconds')} s; test accuracy per iteration {accuracy or '-'}"
                   + (f"; error: {loop['error'][:300]}" if loop.get("error") else f"; every phase on {expected}"))

    if "train" in sections:
        train: dict = {}
        problem = precheck(REQUIRED)
        if problem:
            train = {"error": problem, "matmul": {"error": problem}, "ours": {"error": problem}, "trl": {"error": problem}}
        else:
            child = launch("train", base, "b train (matmul, ours)")
            note_device(child)
            for key in ("matmul", "ours"):
                train[key] = child.get(key) or {"error": child.get("error") or "did not run"}
            train["seconds"] = child.get("wall_seconds")
            train["error"] = child.get("error")
            matmul = train["matmul"].get("tflops")
            ours = train["ours"]
            say(start, f"b train: matmul {matmul} TFLOP/s; ours " + (
                f"{ours['tokens_per_s']:,.0f} tokens/s, {ours['tflops']} TFLOP/s, MFU {ours['mfu']} ({ours['mfu_vs_matmul']} of the matmul), "
                f"reference pre-pass {ours.get('reference_seconds')} s, peak {ours.get('max_memory_allocated_gb')} GB"
                if ours.get("tokens_per_s") else f"error: {str(ours.get('error'))[:300]}"))
            if ours.get("devices"):
                placements.append(all(_same_device(d, expected) for d in ours["devices"].values()) and {"reference", "training"} <= set(ours["devices"]))
            if importlib.util.find_spec("trl") is None:
                train["trl"] = {"error": "trl is not installed (carry its wheel: see the top of benchmarks/gpu_check.py)"}
            else:
                trl_child = launch("trl", {**base, "matmul_tflops": matmul}, "b train (TRL)")
                note_device(trl_child)
                train["trl"] = trl_child.get("trl") or {"error": trl_child.get("error") or "did not run"}
                if trl_child.get("error") and not train["trl"].get("error"):
                    train["trl"]["error"] = trl_child["error"]
            trl = train["trl"]
            if trl.get("tokens_per_s"):
                placements.append(all(_same_device(d, expected) for d in trl["devices"].values()))
                if ours.get("tokens_per_s"):
                    train["speedup"] = round(ours["tokens_per_s"] / trl["tokens_per_s"], 3)
            say(start, "b train: TRL " + (f"{trl['tokens_per_s']:,.0f} tokens/s, MFU {trl['mfu']}, speedup {train.get('speedup')}"
                                          if trl.get("tokens_per_s") else f"error: {str(trl.get('error'))[:300]}"))
        report["train"] = train

    if "sampler" in sections:
        problem = precheck(REQUIRED)
        if problem:
            sampler = {"error": problem}
        else:
            child = launch("sampler", base, "c sampler")
            note_device(child)
            keys = ("model", "greedy_first_call", "greedy", "sampled")
            sampler = {key: child.get(key) or {"error": child.get("error") or "did not run"} for key in keys}
            sampler.update(first_call_overhead_s=child.get("first_call_overhead_s"), seconds=child.get("wall_seconds"), error=child.get("error"))
            for key in keys[1:]:
                if sampler[key].get("devices"):
                    placements.append(all(_same_device(d, expected) for d in sampler[key]["devices"].values()) and "sampling" in sampler[key]["devices"])
            say(start, "c sampler: " + "; ".join(
                f"{key} {sampler[key]['tokens_per_s']:,.0f} tokens/s ({sampler[key]['sequences']} sequences x {sampler['model'].get('max_new_tokens')} "
                f"tokens in {sampler[key]['seconds_timed']} s)" if sampler[key].get("tokens_per_s") else f"{key} error: {str(sampler[key].get('error'))[:200]}"
                for key in keys[1:]))
        report["sampler"] = sampler

    if "memory" in sections:
        problem = precheck(REQUIRED)
        left = deadline - (time.perf_counter() - start)
        if problem or left < 20:
            report["memory"] = {"error": problem or f"skipped: {left:.0f} s left of the {deadline:.0f} s --deadline"}
        else:
            say(start, f"d memory: starting (at most {min(timeout, left):.0f} s)")
            command = [sys.executable, str(REPO / "benchmarks" / "train_memory.py"), "--json", *MEMORY_ARGS["cpu" if smoke else "gpu"]]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=min(timeout, left), env=child_environment(), cwd=REPO)
                report["memory"] = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"error": done.stderr[-2000:]}
            except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as error:
                report["memory"] = {"error": _error_text(error)}
            settings = report["memory"].get("settings", {})
            say(start, "d memory: " + ("; ".join(f"{name} {figures.get('peak_cuda_mb', figures.get('peak_rss_mb'))} MB peak" for name, figures in settings.items())
                                       or f"error: {str(report['memory'].get('error'))[:300]}"))

    report["all_phases_on_device"] = bool(placements) and all(placements)
    report["workdir"] = str(workdir) if (args.keep or args.workdir) else None
    report["seconds"] = round(time.perf_counter() - start, 1)
    if not (args.keep or args.workdir):
        shutil.rmtree(workdir, ignore_errors=True)
    say(start, f"done in {report['seconds']} s; every phase on {expected}: {report['all_phases_on_device']}")
    print(json.dumps(report, default=str), flush=True)
    failed = "loop" in sections and not report["loop"].get("ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
