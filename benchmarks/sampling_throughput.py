"""Generated tokens/s of irpo_pl's sampler against one `model.generate` call per question.

Same model (the toy Llama of configs/toy.yaml with random weights, so sequences
run long), same questions, same N, max_new_tokens and threads. Each side's
tokens are counted the same way, from the text it generated.

    python benchmarks/sampling_throughput.py [--questions 64] [--num_samples 8] [--max_new_tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from irpo_pl.cli import parse
from irpo_pl.models import encode_prompt, load_policy
from irpo_pl.sampling import generate_completions
from irpo_pl.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--num_samples", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print only the final JSON line's figures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = parse(["fit", "--config", "configs/toy.yaml"]).fit
    task_config = config.data.init_args.task
    task = get_task(task_config.name, **task_config.args)
    model, tokenizer = load_policy(config.model.init_args.policy, task.vocabulary(), 512)
    prompts = [task.prompt(row) for row in task.load_split("test")[: args.questions]]

    def count(texts: list[str]) -> int:
        return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)

    start = time.perf_counter()
    plain_texts = []
    with torch.inference_mode():
        model.eval()
        for prompt in prompts:
            ids = torch.tensor([encode_prompt(tokenizer, prompt)])
            output = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                num_return_sequences=args.num_samples, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            )
            plain_texts += tokenizer.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True)
    plain_seconds = time.perf_counter() - start

    start = time.perf_counter()
    ours = generate_completions(model, tokenizer, prompts, args.num_samples, 1.0, args.max_new_tokens, args.batch_size, progress=False)
    ours_seconds = time.perf_counter() - start

    plain_rate, ours_rate = count(plain_texts) / plain_seconds, count([c for cs in ours for c in cs]) / ours_seconds
    result = {
        "questions": args.questions, "num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens,
        "threads": args.threads, "plain_tokens_per_s": round(plain_rate), "ours_tokens_per_s": round(ours_rate),
        "speedup": round(ours_rate / plain_rate, 2),
    }
    if not args.json:
        print(f"plain loop, one generate per question: {plain_rate:,.0f} tokens/s ({plain_seconds:.1f} s)")
        print(f"irpo_pl sampler, batched:              {ours_rate:,.0f} tokens/s ({ours_seconds:.1f} s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
