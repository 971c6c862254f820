"""Drawing completions from the current policy: batched `generate` with a KV cache.

Two things make a draw reproducible anywhere. Sampling uses the Gumbel-max trick
with one random stream per sequence, seeded by (seed, question, sample), so a
sequence's draw does not depend on its batch-mates or on the number of processes.
And under torch.distributed each process generates whole batches of the same
partition a single process would use, then all processes exchange results, so
N processes produce exactly what one does, in 1/N of the time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from irpo_pl.distributed import rank_and_world
from irpo_pl.models import encode_prompt


def sequence_seed(seed: int, question: int, sample: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{question}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededGumbelSampling(LogitsProcessor):
    """Turns greedy decoding into sampling at `temperature`, one seeded generator per row.

    argmax(logits / T + g), with g drawn from a standard Gumbel distribution, is a
    draw from softmax(logits / T) (the Gumbel-max trick).
    """

    def __init__(self, temperature: float, seeds: list[int]) -> None:
        self.temperature = temperature
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-300, 1.0)))
        return scores.float() / self.temperature + gumbel.to(device=scores.device, dtype=torch.float32)


def partition(prompt_lengths: list[int], num_samples: int, batch_size: int) -> list[list[int]]:
    """The question indices of each generation batch: sorted by prompt length, `batch_size // num_samples` questions each.

    Every process cuts the same partition and runs whole batches of it, so a question is
    generated beside the same batch-mates whatever the number of processes.
    """
    order = sorted(range(len(prompt_lengths)), key=lambda i: prompt_lengths[i])
    per_batch = max(1, batch_size // num_samples)
    return [order[start : start + per_batch] for start in range(0, len(order), per_batch)]


def share_of_batches(batches: list, rank: int, world: int) -> list:
    """This process's batches, padded with None (a filler round) to the same count on every process.

    A sharded model needs every process in every forward pass, so all run the same number of batches.
    """
    mine = batches[rank::world]
    rounds = -(-len(batches) // world)
    return mine + [None] * (rounds - len(mine))


# no_grad, not inference_mode: an FSDP2 model keeps the buffers it gathers here, and training cannot reuse inference tensors.
@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: list[list[int]],
    question_indices: list[int],
    num_samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int = 0,
    cache: str = "static",
    synced: bool = False,
) -> list[list[str]]:
    """`num_samples` completions of each prompt in one `generate` call; temperature 0 means greedy.

    A sequence's random stream is seeded by (seed, its question's index, its sample number), so its
    draw depends neither on its batch-mates nor on the process that runs it. `synced` keeps every
    process in step until all have finished (a sharded model must be run by all of them together).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Each prompt repeated num_samples times: generate() refuses num_return_sequences with greedy search.
    batch = _left_pad([ids for ids in prompt_ids for _ in range(num_samples)], tokenizer.pad_token_id, device)
    processors = LogitsProcessorList()
    if temperature > 0:
        processors.append(SeededGumbelSampling(temperature, [sequence_seed(seed, i, s) for i in question_indices for s in range(num_samples)]))
    with _decoding_attention(model, device):
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            logits_processor=processors,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            cache_implementation=cache,
            synced_gpus=synced,
        )
    model.train(was_training)
    texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [[text.strip() for text in texts[row * num_samples : (row + 1) * num_samples]] for row in range(len(prompt_ids))]


def generate_completions(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    num_samples: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int = 0,
    cache: str = "static",
    desc: str = "sampling",
    progress: bool = True,
) -> list[list[str]]:
    """`num_samples` completions for each prompt, in the prompts' order; temperature 0 means greedy.

    Prompts are sorted by length so each batch pads little. `batch_size` counts
    sequences (prompts x samples). Each batch stops as soon as all its sequences
    have emitted EOS. A "static" KV cache (preallocated, no concatenation per step)
    generates about twice as fast as "dynamic" on small models. Under
    torch.distributed every process must call this; each runs its share of the
    batches and all of them receive every result.
    """
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    batches = partition([len(ids) for ids in encoded], num_samples, batch_size)
    rank, world = rank_and_world()
    results: dict[int, list[str]] = {}
    with tqdm(total=len(prompts) * num_samples, desc=desc, unit="seq", disable=not progress or rank != 0, leave=False) as bar:
        for round_index, indices in enumerate(share_of_batches(batches, rank, world)):
            # A filler round repeats the first batch only to keep in step with the other processes.
            completions = generate_batch(
                model, tokenizer, [encoded[i] for i in indices or batches[0]], indices or batches[0], num_samples, temperature,
                max_new_tokens, seed, cache, synced=world > 1,
            )
            if indices is not None:
                results.update(zip(indices, completions))
            bar.update(num_samples * sum(len(b) for b in batches[round_index * world : (round_index + 1) * world]))
    if world > 1:
        gathered: list[dict] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, results)
        results = {index: texts for part in gathered for index, texts in part.items()}
    return [results[i] for i in range(len(prompts))]


@contextmanager
def _decoding_attention(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Eager attention while decoding on CPU, where SDPA's kernel, built for long queries, is slower.

    With one new token per step, eager decoded 14% faster in benchmarks/sampling_throughput.py.
    Training and scoring keep the model's own attention, restored here even on error.
    """
    attention = getattr(model.config, "_attn_implementation", None)
    switch = device.type == "cpu" and attention == "sdpa" and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(attention)


def _left_pad(sequences: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Left padding, so every sequence's next token is generated at the same position."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence)
        attention_mask[row, width - len(sequence) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
