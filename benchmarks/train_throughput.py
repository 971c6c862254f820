"""Preference-training throughput: irpo_pl's training step against TRL's DPOTrainer with its NLL term.

Both sides train the same tiny Llama (hidden 256, intermediate 688, 4 layers,
4 heads, vocab 512, same initial weights) on the same 512 preference pairs
(prompts of 28-36 tokens, completions of 48-64), batch 16, one epoch, fp32 on
CPU, no activation checkpointing, with precomputed reference log-probs, and
each side's reference pre-pass counted in its time. Tokens are counted as
prompt + chosen + rejected, each once. Each run is its own process; the sides
alternate; the figures are medians.

irpo_pl's side is what `fit` runs: IRPODataModule (pre-pass) and IRPOModule in
a Lightning Trainer with a TensorBoard logger, in fit's default two row streams
(train.cpu_streams). TRL's side is DPOTrainer with
loss_type ["sigmoid", "sft"] (DPO + NLL on the chosen) and
precompute_ref_log_probs (needs `pip install 'irpo_pl[bench]'`).

    python benchmarks/train_throughput.py [--runs 3] [--threads 2] [--reference precomputed|model] [--cpu_streams 2|1] [--json]

The last line of output is one JSON object (speedup = our tokens/s over TRL's).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = {"hidden_size": 256, "intermediate_size": 688, "num_layers": 4, "num_heads": 4}
WORDS = [f"w{i}" for i in range(508)]  # with the 4 special tokens: a vocabulary of 512
BETA, LEARNING_RATE = 0.1, 1e-5


def make_pairs(num_pairs: int, seed: int = 0) -> list[dict]:
    """Token ids of random preference pairs; the prompt starts with BOS (1), completions end with EOS (2)."""
    rng = random.Random(seed)
    first_word = 4  # after <pad> <s> </s> <unk>

    def words(n: int) -> list[int]:
        return [rng.randrange(first_word, first_word + len(WORDS)) for _ in range(n)]

    return [
        {"prompt_ids": [1] + words(rng.randint(27, 35)), "chosen_ids": words(rng.randint(47, 63)) + [2], "rejected_ids": words(rng.randint(47, 63)) + [2]}
        for _ in range(num_pairs)
    ]


def build_model_and_tokenizer():
    import torch

    from irpo_pl.config import ToyModelConfig
    from irpo_pl.models import build_tiny_llama, build_word_tokenizer

    tokenizer = build_word_tokenizer(WORDS)
    assert len(tokenizer) == 512, len(tokenizer)
    torch.manual_seed(0)
    return build_tiny_llama(tokenizer, ToyModelConfig(**SHAPE), max_positions=256), tokenizer


def run_ours(pairs: list[dict], batch_size: int, reference: str, cpu_streams: int) -> dict:
    import copy

    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from irpo_pl.allocator import keep_freed_memory
    from irpo_pl.datamodule import DataPhase, IRPODataModule
    from irpo_pl.module import IRPOModule
    from irpo_pl.objectives import IRPO

    # As `fit` does when it runs row streams (streams.py).
    keep_freed_memory()
    policy, tokenizer = build_model_and_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        objective = IRPO(beta=BETA, alpha=1.0)
        data = IRPODataModule(batch_size=batch_size)
        data.begin_phase(DataPhase(Path(folder), [], objective, batch_size, seed=0, precompute_reference=reference == "precomputed", rows=copy.deepcopy(pairs)))
        module = IRPOModule(objective=objective, lr=LEARNING_RATE, reference=reference, cpu_streams=cpu_streams)
        module.use_policy(policy, tokenizer)
        module.begin_phase(objective, LEARNING_RATE, module.warmup_ratio)
        trainer = L.Trainer(
            max_epochs=1, logger=TensorBoardLogger(folder), enable_checkpointing=False, enable_model_summary=False,
            enable_progress_bar=False, log_every_n_steps=1, accelerator="cpu", devices=1,
        )
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "reference_seconds": data.stats.seconds.get("reference", 0.0), "steps": trainer.global_step}


def trl_rows(pairs: list[dict], tokenizer) -> list[dict]:
    """The same pairs as text, as TRL takes them; its tokenizer gives back the same ids (checked where it runs)."""
    return [
        {
            "prompt": tokenizer.decode(p["prompt_ids"], skip_special_tokens=True),
            "chosen": " " + tokenizer.decode(p["chosen_ids"]),
            "rejected": " " + tokenizer.decode(p["rejected_ids"]),
        }
        for p in pairs
    ]


def timed_dpo_trainer(dpo_trainer: type, timings: dict) -> type:
    """TRL's DPOTrainer that adds the time of its reference pre-pass to timings["reference_seconds"]."""

    class TimedDPOTrainer(dpo_trainer):
        def _precompute_ref_logps(self, *args, **kwargs):
            start = time.perf_counter()
            result = super()._precompute_ref_logps(*args, **kwargs)
            timings["reference_seconds"] += time.perf_counter() - start
            return result

    return TimedDPOTrainer


def run_trl(pairs: list[dict], batch_size: int, reference: str) -> dict:
    import datasets
    from trl import DPOConfig, DPOTrainer

    policy, tokenizer = build_model_and_tokenizer()
    rows = trl_rows(pairs, tokenizer)
    timings = {"reference_seconds": 0.0}
    TimedDPOTrainer = timed_dpo_trainer(DPOTrainer, timings)

    with tempfile.TemporaryDirectory() as folder:
        config = DPOConfig(
            output_dir=folder, per_device_train_batch_size=batch_size, num_train_epochs=1, learning_rate=LEARNING_RATE,
            beta=BETA, loss_type=["sigmoid", "sft"], precompute_ref_log_probs=reference == "precomputed",
            precompute_ref_batch_size=batch_size, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
            report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, max_length=None, dataloader_num_workers=0,
        )
        trainer = TimedDPOTrainer(model=policy, args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
        check = trainer.train_dataset[0]
        assert check["prompt_ids"] == pairs[0]["prompt_ids"] and check["chosen_ids"] == pairs[0]["chosen_ids"], "TRL tokenized differently"
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
    return {"seconds": train_seconds + timings["reference_seconds"], "steps": trainer.state.global_step, **timings}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    pairs = make_pairs(args.pairs)
    if args.side == "ours":
        result = run_ours(pairs, args.batch_size, args.reference, args.cpu_streams)
    else:
        result = run_trl(pairs, args.batch_size, args.reference)
    tokens = sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    result.update(
        tokens=tokens, pairs_per_s=len(pairs) / result["seconds"], tokens_per_s=tokens / result["seconds"],
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs of each side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--reference", choices=("precomputed", "model"), default="precomputed")
    parser.add_argument("--cpu_streams", type=int, default=2, help="irpo_pl's train.cpu_streams (1: off)")
    parser.add_argument("--sides", default="ours,trl", help="comma-separated: ours, trl")
    parser.add_argument("--json", action="store_true", help="print only the final JSON line")
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args()
    if args.side:
        return child(args)

    sides = args.sides.split(",")
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for run in range(args.runs):
        for side in sides:
            command = [sys.executable, __file__, "--side", side, "--threads", str(args.threads), "--pairs", str(args.pairs),
                       "--batch_size", str(args.batch_size), "--reference", args.reference, "--cpu_streams", str(args.cpu_streams)]
            finished = subprocess.run(command, env=environment, capture_output=True, text=True)
            if finished.returncode != 0:
                sys.exit(f"{side} run {run + 1} failed:\n{finished.stderr[-3000:]}")
            result = json.loads(finished.stdout.strip().splitlines()[-1])
            results[side].append(result)
            if not args.json:
                print(f"run {run + 1} {side:>4}: {result['tokens_per_s']:7,.0f} tokens/s  {result['seconds']:6.1f} s "
                      f"(reference pre-pass {result['reference_seconds']:.1f} s)  peak RSS {result['peak_rss_mb']:,.0f} MB", flush=True)

    summary: dict = {"pairs": args.pairs, "batch_size": args.batch_size, "threads": args.threads, "runs": args.runs, "reference": args.reference, "cpu_streams": args.cpu_streams}
    for side, runs in results.items():
        for key in ("tokens_per_s", "pairs_per_s", "seconds", "reference_seconds", "peak_rss_mb"):
            summary[f"{side}_{key}"] = round(statistics.median(r[key] for r in runs), 2)
    if "ours" in results and "trl" in results:
        summary["speedup"] = round(summary["ours_tokens_per_s"] / summary["trl_tokens_per_s"], 3)
        summary["peak_rss_ratio"] = round(summary["ours_peak_rss_mb"] / summary["trl_peak_rss_mb"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
