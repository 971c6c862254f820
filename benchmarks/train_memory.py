"""Peak memory of one training step: activation checkpointing off and on, and LoRA adapters.

One step is what a training step of IRPOModule does: the policy's forward on a batch
of prefix-shared pair rows (data.PairPacker, logprobs.segment_logps), irpo_loss with
precomputed reference log-probs, backward, a fused AdamW step over the parameters
that train. The model is a Llama built from a config (default: hidden 768,
intermediate 2048, 12 layers, 12 heads, vocab 32,000, tied embeddings: 110M
parameters, float32), the batch 4 pairs of a 128-token prompt and two 256-token
completions (639 tokens a row), so activations weigh as much as the weights.

Settings, each run in a fresh process of its own:

    off         full fine-tuning, every activation kept for the backward
    on          full fine-tuning, checkpointing.enable_activation_checkpointing
    lora        adapters.add_lora (r 16, alpha 32, on q/k/v/o and gate/up/down), no checkpointing
    lora+ckpt   the same adapter, with checkpointing

On CPU it reports the process's peak RSS (ru_maxrss) and its increase over the RSS
right after the model was built (what training added: optimizer state, gradients,
activations; the optimizer state is allocated before the step measured, as in any
step after a run's first); on CUDA, torch.cuda.max_memory_allocated and its increase over
the memory allocated after building.

RSS counts what glibc's heap holds, not only live tensors, and the two differ: a
LoRA step interleaves small long-lived tensors (each adapter's r-wide activations)
with big short-lived ones, and the heap cannot give back the holes between them.
So `--allocator` picks how the processes allocate:

    mmap  (default) every block of 64 KiB or more is mapped on its own and unmapped when
          freed (GLIBC_TUNABLES=glibc.malloc.mmap_threshold=65536), so RSS follows the
          live tensors: what the step needs
    kept  glibc keeps freed memory (allocator.keep_freed_memory), as IRPOModule sets it in
          training runs: what a CPU training process shows

    OMP_NUM_THREADS=1 python benchmarks/train_memory.py [--allocator mmap|kept] [--threads 1] [--device cpu|cuda]
        [--dtype float32|bfloat16] [--settings off,on,lora,lora+ckpt] [--steps 1] [--json]

About 3-4 minutes on one core of the 2-core CPU machine (each step 25-50 s). The last
line of output is one JSON object with every setting's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = ("off", "on", "lora", "lora+ckpt")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def pair_batch(args: argparse.Namespace, device) -> dict:
    """`args.pairs` random pairs of exactly the configured lengths (no padding), with reference log-probs."""
    import torch

    from irpo_pl.data import PairPacker

    generator = torch.Generator().manual_seed(0)

    def words(n: int) -> list[int]:
        return torch.randint(4, args.vocab, (n,), generator=generator).tolist()

    rows = [
        # Reference values do not change the step's memory or time; these are plausible sums of log-probs.
        {"prompt_ids": [1, *words(args.prompt - 1)], "chosen_ids": [*words(args.completion - 1), 2],
         "rejected_ids": [*words(args.completion - 1), 2], "reference_chosen_logps": -2.0 * args.completion,
         "reference_rejected_logps": -2.1 * args.completion}
        for _ in range(args.pairs)
    ]
    return {key: value.to(device) for key, value in PairPacker(pad_id=0)(rows).items()}


def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from irpo_pl.allocator import keep_freed_memory
    from irpo_pl.logprobs import segment_logps
    from irpo_pl.losses import irpo_loss

    keep_freed_memory()  # does nothing where GLIBC_TUNABLES is set (--allocator mmap)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=args.prompt + 2 * args.completion,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=getattr(torch, args.dtype))
    if args.setting.startswith("lora"):
        from irpo_pl.adapters import LoraSettings, add_lora

        add_lora(model, LoraSettings(r=args.lora_r, alpha=2 * args.lora_r, target_modules=LORA_TARGETS), seed=0)
    if args.setting in ("on", "lora+ckpt"):
        from irpo_pl.checkpointing import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    model.train()
    batch = pair_batch(args, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0, fused=True)
    built_rss, built_peak_rss = current_rss_mb(), peak_rss_mb()
    if cuda:
        torch.cuda.synchronize()
        built_allocated = torch.cuda.memory_allocated() / 2**20
    # A step in a run holds the optimizer state from the steps before it while its activations
    # are alive, but a first step would allocate that state only after its backward freed them.
    # A step on zero gradients allocates it (and changes no weight), so the step measured is a steady one.
    for parameter in trainable:
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        chosen, rejected = segment_logps(model, batch, num_segments=2).unbind(1)
        reference_chosen, reference_rejected = batch["reference_logps"].values.to(chosen.dtype).unbind(1)
        loss = irpo_loss(chosen, rejected, reference_chosen, reference_rejected, batch["chosen_lengths"], beta=0.1, alpha=1.0)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    if not torch.isfinite(loss):
        sys.exit(f"{args.setting}: the loss is {loss.item()}")

    result = {
        "setting": args.setting,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in trainable),
        "tokens": int(batch["input_ids"].numel()),
        "step_s": round(min(seconds), 2),
        "optimizer_state_mb": round(sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)) / 2**20),
        "built_rss_mb": round(built_rss), "built_peak_rss_mb": round(built_peak_rss),
        "peak_rss_mb": round(peak_rss_mb()), "rss_over_built_mb": round(peak_rss_mb() - built_rss),
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        result.update(built_cuda_mb=round(built_allocated), peak_cuda_mb=round(peak), cuda_over_built_mb=round(peak - built_allocated))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--allocator", default="mmap", choices=("mmap", "kept"), help="glibc's handling of freed memory (see above)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of each run (CPU)")
    parser.add_argument("--steps", type=int, default=1, help="steps per run (the first allocates the optimizer state; the fastest is reported)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--completion", type=int, default=256, help="tokens of each completion")
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank (alpha = 2 r)")
    parser.add_argument("--json", action="store_true", help="print only the final JSON line")
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args()
    if args.setting:
        return child(args)

    settings = args.settings.split(",")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    passed = [argument for argument in sys.argv[1:] if argument not in ("--json",)]
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    if args.allocator == "mmap":
        environment["GLIBC_TUNABLES"] = "glibc.malloc.mmap_threshold=65536"
    repository = Path(__file__).resolve().parents[1]
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repository), environment.get("PYTHONPATH")]))
    results = {}
    for setting in settings:
        finished = subprocess.run([sys.executable, __file__, *passed, "--setting", setting], env=environment, capture_output=True, text=True)
        if finished.returncode != 0:
            sys.exit(f"setting {setting} failed:\n{finished.stderr[-3000:]}")
        results[setting] = json.loads(finished.stdout.strip().splitlines()[-1])
        if not args.json:
            print(f"{setting} done in {results[setting]['step_s']} s a step", file=sys.stderr, flush=True)

    first = next(iter(results.values()))
    summary = {
        "device": args.device, "dtype": args.dtype, "allocator": args.allocator, "threads": args.threads, "parameters": first["parameters"], "pairs": args.pairs,
        "row_tokens": first["tokens"] // args.pairs, "layers": args.layers, "hidden": args.hidden, "lora_r": args.lora_r,
        "settings": {name: {k: v for k, v in r.items() if k not in ("setting", "parameters", "tokens")} for name, r in results.items()},
    }
    if not args.json:
        print(table(summary))
    print(json.dumps(summary))


def table(summary: dict) -> str:
    cuda = summary["device"].startswith("cuda")
    head = f"{summary['parameters']:,}-parameter Llama ({summary['layers']} layers, hidden {summary['hidden']}), {summary['dtype']} on {summary['device']} (allocator {summary['allocator']}), " \
           f"{summary['pairs']} pairs of {summary['row_tokens']} tokens a row"
    columns = ["setting", "trainable", "peak RSS MB", "over built MB", "step s"] + (["peak CUDA MB", "CUDA over built MB"] if cuda else [])
    lines = [head, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, r in summary["settings"].items():
        cells = [name, f"{r['trainable']:,}", f"{r['peak_rss_mb']:,}", f"{r['rss_over_built_mb']:,}", f"{r['step_s']:.1f}"]
        if cuda:
            cells += [f"{r['peak_cuda_mb']:,}", f"{r['cuda_over_built_mb']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
