"""Test accuracy: greedy, and majority vote over k samples (maj@k)."""

from __future__ import annotations

from irpo_pl.models import format_prompt
from irpo_pl.sampling import generate_completions
from irpo_pl.tasks import Task


def evaluate(model, tokenizer, task: Task, examples: list[dict], max_new_tokens: int, batch_size: int, maj_k: int = 0, temperature: float = 1.0) -> dict:
    """Greedy accuracy on `examples`, and maj@k at `temperature` when maj_k > 0."""
    prompts = [format_prompt(tokenizer, task.prompt(example)) for example in examples]
    greedy = generate_completions(model, tokenizer, prompts, 1, 0.0, max_new_tokens, batch_size, desc="eval greedy")
    rewards = [task.reward(completions[0], example) for completions, example in zip(greedy, examples)]
    metrics = {"accuracy": sum(rewards) / len(examples), "completions": [c[0] for c in greedy], "rewards": rewards}
    if maj_k > 0:
        voted = generate_completions(model, tokenizer, prompts, maj_k, temperature, max_new_tokens, batch_size, desc=f"eval maj@{maj_k}")
        correct = [task.vote_is_correct(completions, example) for completions, example in zip(voted, examples)]
        metrics[f"maj@{maj_k}"] = sum(correct) / len(examples)
    return metrics
