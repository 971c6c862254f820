"""Drawing completions from the current policy: batched `generate` with a KV cache.

Two things make a draw reproducible anywhere. Sampling uses the Gumbel-max trick
with one random stream per sequence, seeded by (seed, question, sample): a hash of
that seed, the decoding step and the token, computed on the model's device for the
whole batch at once, so a sequence's draw does not depend on its batch-mates or on
the number of processes.
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


def _int64(value: int) -> int:
    """The int64 with the same 64 bits as an unsigned constant."""
    return value - (1 << 64) if value >= 1 << 63 else value


# splitmix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators", 2014; constants
# as in Vigna's splitmix64.c): the increment is 2^64 / golden ratio, then three xor-shifts and two
# multiplications, each multiplier paired with the shift before it.
_GAMMA = _int64(0x9E3779B97F4A7C15)
_MIX = ((30, _int64(0xBF58476D1CE4E5B9)), (27, _int64(0x94D049BB133111EB)), (31, None))


def splitmix64_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function applied in place to int64 `x` (returned); `scratch` is a buffer of x's shape.

    torch's int64 additions and multiplications wrap modulo 2^64, as the mix needs. Its right shifts
    are arithmetic (they copy the sign bit), so the copies are masked off to make them logical.
    Integer operations only: the same bits on every device.
    """
    for shift, multiplier in _MIX:
        torch.bitwise_right_shift(x, shift, out=scratch)
        scratch &= (1 << (64 - shift)) - 1
        x ^= scratch
        if multiplier is not None:
            x *= multiplier
    return x


def step_keys(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One 64-bit key per sequence for decoding step `step` (from 0): output step + 1 of splitmix64 seeded with the sequence's seed.

    Token v of that step then gets output v + 1 of splitmix64 seeded with the key, so every
    (seed, step, token) has its own counter-based draw and the whole step is one vectorised hash.
    """
    keys = seeds + _int64((step + 1) * _GAMMA % (1 << 64))
    return splitmix64_(keys, torch.empty_like(keys))


def token_offsets(vocab_size: int, device: torch.device) -> torch.Tensor:
    """(v + 1) * gamma for each token v: token v's splitmix64 state is its step's key plus this (see `step_keys`)."""
    return torch.arange(1, vocab_size + 1, dtype=torch.long, device=device) * _GAMMA


def uniform_(bits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Writes into `out` (float64, or float32) uniform draws in (0, 1) from the top 53 of int64 `bits`; `bits` is overwritten.

    w = (m + 1/2) / 2^53 for the 53-bit integer m. Near 0, where the Gumbel tail comes from (see
    `gumbel_`), w keeps its full relative precision even in float32: the smallest w is 2^-54 in
    either type. The rounding that can reach 1 is clamped to the largest value below 1.
    """
    bits >>= 11
    bits &= (1 << 53) - 1
    out.copy_(bits)
    out += 0.5
    out *= 2.0**-53
    return out.clamp_(max=1.0 - torch.finfo(out.dtype).eps / 2)


def gumbel_(w: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel draws -log(-log(1 - w)) from uniforms w in (0, 1), in place.

    1 - w is as uniform as w, and written with log1p it reads small w exactly: the largest draws
    (small w, the upper tail that decides which unlikely tokens win) reach 54 ln 2 = 37.4 from 53 bits.
    """
    return w.neg_().log1p_().neg_().log_().neg_()


def noise_dtype(device: torch.device) -> torch.dtype:
    """float64 for the uniforms and their Gumbel transform, except on MPS, which has no float64 (see `uniform_`)."""
    return torch.float32 if device.type == "mps" else torch.float64


# Elements per chunk of rows hashed at once: on CPU a chunk's buffers (24 bytes an element, 6 MB) stay
# in cache, 1.4-1.9x faster than whole-batch buffers for 512 x 128k; an accelerator wants few, large
# launches, with the buffers still bounded (400 MB).
_CHUNK_ELEMENTS = {"cpu": 1 << 18}
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 24


class SeededGumbelSampling(LogitsProcessor):
    """Turns greedy decoding into sampling at `temperature`, with a seeded, counter-based random stream per row.

    argmax(logits / T + g), with g drawn from a standard Gumbel distribution, is a draw from
    softmax(logits / T) (the Gumbel-max trick). g for (row, step, token) is a hash of the row's
    seed, the decoding step and the token index (`step_keys`, `splitmix64_`), computed with tensor
    operations on the logits' device for the whole batch at once, so a row's draws depend on
    nothing else: not its batch-mates, the batch size, the padding, the device or the process.
    The samples differ from those of the earlier design, one CPU `torch.Generator` per row: another
    random stream, the same distribution.

    The step is read from `input_ids`: its width minus `prompt_width`, the (left-padded) prompt's.
    A call counter would do in plain decoding; the width stays right if `generate` calls a
    processor several times per step (assisted decoding scores candidate prefixes of several
    lengths) or skips it (under `synced_gpus` a finished process runs forward passes without it),
    and if the processor is reused.
    """

    def __init__(self, temperature: float, seeds: list[int], prompt_width: int) -> None:
        self.temperature = temperature
        self.seeds = torch.tensor(seeds, dtype=torch.long)
        self.prompt_width = prompt_width
        self._workspace: tuple | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        rows, vocab_size = scores.shape
        seeds, columns, bits, scratch, noise = self._buffers(vocab_size, scores.device)
        keys = step_keys(seeds, input_ids.shape[1] - self.prompt_width)
        # logits / T + g, written into g's float32 copy; float32 whatever the logits' dtype (bf16 has 8 bits).
        out = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
        for start in range(0, rows, bits.shape[0]):
            n = min(bits.shape[0], rows - start)
            torch.add(keys[start : start + n, None], columns, out=bits[:n])
            gumbel = gumbel_(uniform_(splitmix64_(bits[:n], scratch[:n]), noise[:n]))
            out[start : start + n].copy_(gumbel).add_(scores[start : start + n].float(), alpha=1 / self.temperature)
        return out

    def _buffers(self, vocab_size: int, device: torch.device) -> tuple:
        """The seeds on `device`, the token offsets, and buffers for one chunk of rows: made once, reused every step."""
        if self._workspace is None or self._workspace[1].shape[0] != vocab_size or self._workspace[1].device != device:
            chunk = _CHUNK_ELEMENTS.get(device.type, _ACCELERATOR_CHUNK_ELEMENTS)
            chunk_rows = min(len(self.seeds), max(1, chunk // vocab_size))
            columns = token_offsets(vocab_size, device)
            bits = torch.empty((chunk_rows, vocab_size), dtype=torch.long, device=device)
            noise = torch.empty((chunk_rows, vocab_size), dtype=noise_dtype(device), device=device)
            self._workspace = (self.seeds.to(device), columns, bits, torch.empty_like(bits), noise)
        return self._workspace


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
    compile_decoding: bool = False,
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
        seeds = [sequence_seed(seed, i, s) for i in question_indices for s in range(num_samples)]
        processors.append(SeededGumbelSampling(temperature, seeds, batch["input_ids"].shape[1]))
    with _decoding_attention(model, device):
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            logits_processor=processors,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            cache_implementation=cache,
            # transformers compiles a static cache's decoding step on GPUs by itself, and again for every new
            # prompt width: a cost that only long runs of few shapes earn back.
            disable_compile=not compile_decoding,
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
    compile_decoding: bool = False,
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
                max_new_tokens, seed, cache, synced=world > 1, compile_decoding=compile_decoding,
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
