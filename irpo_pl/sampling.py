"""Drawing completions from the current policy: batched `generate` with a KV cache."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from irpo_pl.models import encode_prompt


@torch.inference_mode()
def generate_completions(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    num_samples: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    cache: str = "static",
    desc: str = "sampling",
    progress: bool = True,
) -> list[list[str]]:
    """`num_samples` completions for each prompt; temperature 0 means greedy.

    Prompts are sorted by length so each batch pads little, then answers come back
    in the prompts' order. `batch_size` counts sequences (prompts x samples). Each
    batch stops as soon as all its sequences have emitted EOS. A "static" KV cache
    (preallocated, no concatenation per step) generates about twice as fast as
    "dynamic" on small models. Samples follow the global torch RNG, so the caller
    seeds it for reproducible draws.
    """
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    prompts_per_batch = max(1, batch_size // num_samples)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results: list[list[str]] = [[] for _ in prompts]
    with tqdm(total=len(prompts) * num_samples, desc=desc, unit="seq", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), prompts_per_batch):
            indices = order[start : start + prompts_per_batch]
            batch = _left_pad([encoded[i] for i in indices], tokenizer.pad_token_id, device)
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                cache_implementation=cache,
                **sampling,
            )
            texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for offset, index in enumerate(indices):
                results[index] = [text.strip() for text in texts[offset * num_samples : (offset + 1) * num_samples]]
            bar.update(len(indices) * num_samples)
    model.train(was_training)
    return results


def _left_pad(sequences: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Left padding, so every sequence's next token is generated at the same position."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence)
        attention_mask[row, width - len(sequence) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
