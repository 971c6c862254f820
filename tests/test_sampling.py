import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer

from irpo_pl.models import encode_prompt
from irpo_pl.sampling import (
    SeededGumbelSampling,
    generate_completions,
    gumbel_,
    partition,
    sequence_seed,
    splitmix64_,
    step_keys,
    token_offsets,
    uniform_,
)

MASK64 = (1 << 64) - 1


def splitmix64_reference(state: int, n: int) -> list[int]:
    """The first n outputs of splitmix64 from `state`, on Python integers (Vigna's splitmix64.c), unsigned."""
    outputs = []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        outputs.append(z ^ (z >> 31))
    return outputs


def hashed_bits(seeds: list[int], step: int, vocab_size: int) -> torch.Tensor:
    """The [len(seeds), vocab_size] int64 random bits of one decoding step, composed as the processor composes them."""
    bits = step_keys(torch.tensor(seeds), step)[:, None] + token_offsets(vocab_size, torch.device("cpu"))
    return splitmix64_(bits, torch.empty_like(bits))


def uniforms(seeds: list[int], step: int, vocab_size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    bits = hashed_bits(seeds, step, vocab_size)
    return uniform_(bits, torch.empty(bits.shape, dtype=dtype))


def widths(rows: int, width: int) -> torch.Tensor:
    """Stand-in input_ids: the processor reads only their width."""
    return torch.zeros((rows, width), dtype=torch.long)


def test_samples_come_back_in_prompt_order_with_n_each(toy_policy, toy_task):
    model, tokenizer = toy_policy
    prompts = [toy_task.prompt(row) for row in toy_task.load_split("test")[:5]]
    torch.manual_seed(0)
    out = generate_completions(model, tokenizer, prompts, num_samples=3, temperature=1.0, max_new_tokens=6, batch_size=4, progress=False)
    assert len(out) == 5 and all(len(samples) == 3 for samples in out)
    assert all(len(sample.split()) <= 6 for samples in out for sample in samples)


def test_same_seed_same_samples(toy_policy, toy_task):
    model, tokenizer = toy_policy
    prompts = [toy_task.prompt(row) for row in toy_task.load_split("test")[:4]]
    draws = [generate_completions(model, tokenizer, prompts, 4, 1.0, 8, 16, seed=123, progress=False) for _ in range(2)]
    assert draws[0] == draws[1]
    assert generate_completions(model, tokenizer, prompts, 4, 1.0, 8, 16, seed=124, progress=False) != draws[0]


def test_a_sequence_draw_does_not_depend_on_its_batch(toy_policy, toy_task):
    """Per-sequence seeds: the same question gets the same samples alone or in any batch."""
    model, tokenizer = toy_policy
    prompts = [toy_task.prompt(row) for row in toy_task.load_split("test")[:6]]
    together = generate_completions(model, tokenizer, prompts, 3, 1.0, 8, 64, seed=5, progress=False)
    in_pairs = generate_completions(model, tokenizer, prompts, 3, 1.0, 8, 6, seed=5, progress=False)
    assert together == in_pairs


def test_batched_greedy_equals_one_prompt_at_a_time(toy_policy, toy_task):
    """Left padding and length sorting must not change what greedy decoding produces."""
    model, tokenizer = toy_policy
    prompts = [toy_task.prompt(row) for row in toy_task.load_split("test")[:6]]
    batched = generate_completions(model, tokenizer, prompts, 1, 0.0, 8, 64, progress=False)
    single = [generate_completions(model, tokenizer, [p], 1, 0.0, 8, 1, progress=False)[0] for p in prompts]
    assert batched == single


def test_step_keys_are_the_splitmix64_stream_of_the_seed():
    """Vigna's published check values: splitmix64 from 1234567 begins with these five outputs (wrapping and logical shifts right)."""
    expected = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431, 16408922859458223821]
    assert [step_keys(torch.tensor([1234567]), step).item() & MASK64 for step in range(5)] == expected


def test_noise_is_the_gumbel_of_the_hash_of_seed_step_and_token():
    """Token v at step t of seed s: output v + 1 of splitmix64 from output t + 1 of splitmix64 from s, top 53 bits, Gumbel."""
    seeds, step, vocab_size, prompt_width = [0, 1, 2**62 + 12345, 2**63 - 1, sequence_seed(7, 3, 2)], 4, 37, 6
    noise = SeededGumbelSampling(1.0, seeds, prompt_width)(widths(len(seeds), prompt_width + step), torch.zeros(len(seeds), vocab_size))
    expected = []
    for seed in seeds:
        key = splitmix64_reference(seed, step + 1)[-1]
        w = [min(((bits >> 11) + 0.5) / 2**53, 1 - 2**-53) for bits in splitmix64_reference(key, vocab_size)]
        expected.append([-math.log(-math.log1p(-x)) for x in w])
    torch.testing.assert_close(noise, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_uniforms_are_uniform_in_the_open_interval(dtype):
    """10^6 uniforms of adjacent seeds and tokens (the hash, not blake2b, must tell them apart): KS and chi-square at p = 0.001."""
    w = uniforms(list(range(1000)), 0, 1000, dtype).flatten().double()
    n = w.numel()
    assert 0 < w.min() and w.max() < 1
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    assert torch.maximum(ranks / n - w.sort().values, w.sort().values - (ranks - 1) / n).max() < 1.95 / math.sqrt(n)
    counts = torch.histc(w, bins=100, min=0, max=1)
    assert ((counts - n / 100) ** 2 / (n / 100)).sum() < 148.2  # 99 degrees of freedom


def test_every_bit_of_the_hash_is_a_fair_coin():
    """Each of the 64 bits is set in half of 10^6 draws of adjacent seeds and tokens, to 5 standard errors."""
    bits = hashed_bits(list(range(1000)), 0, 1000)
    n = bits.numel()
    ones = torch.stack([((bits >> b) & 1).sum() for b in range(64)])
    assert ((ones - n / 2).abs() < 5 * math.sqrt(n) / 2).all(), ones


def test_neighbouring_seeds_steps_and_tokens_draw_uncorrelated_uniforms():
    now, next_step = uniforms(list(range(1001)), 0, 1001), uniforms(list(range(1001)), 1, 1001)
    pairs = {"seed": (now[:-1], now[1:]), "step": (now, next_step), "token": (now[:, :-1], now[:, 1:])}
    for name, (x, y) in pairs.items():
        r = torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1]
        assert abs(r) < 5 / math.sqrt(x.numel()), (name, r)


def test_gumbel_tail_reaches_the_smallest_uniform():
    """The largest draw comes from the smallest uniform, 2^-54, in float64 and in float32 (MPS) alike; the largest stays finite."""
    for dtype in (torch.float64, torch.float32):
        extremes = uniform_(torch.tensor([0, -1]), torch.empty(2, dtype=dtype))
        assert extremes[0] == 2.0**-54 and extremes[1] < 1
        top, bottom = gumbel_(extremes).tolist()
        assert top == pytest.approx(54 * math.log(2), rel=1e-6) and math.isfinite(bottom)


def processor_counts(logits: torch.Tensor, temperature: float, seeds: int, steps: int) -> torch.Tensor:
    processor = SeededGumbelSampling(temperature, list(range(seeds)), prompt_width=1)
    rows = logits.expand(seeds, -1)
    counts = torch.zeros(logits.shape[-1])
    for step in range(steps):
        counts += torch.bincount(processor(widths(seeds, 1 + step), rows).argmax(-1), minlength=logits.shape[-1])
    return counts


def float32_counts(logits: torch.Tensor, temperature: float, seeds: int, steps: int) -> torch.Tensor:
    """The Gumbel-max draws of the MPS path: uniforms and Gumbel in float32."""
    counts = torch.zeros(logits.shape[-1])
    for step in range(steps):
        gumbel = gumbel_(uniforms(list(range(seeds)), step, logits.shape[-1], torch.float32))
        counts += torch.bincount((logits / temperature + gumbel).argmax(-1), minlength=logits.shape[-1])
    return counts


@pytest.mark.parametrize("draw", [processor_counts, float32_counts])
def test_gumbel_max_draws_follow_the_softmax(draw):
    """200,000 draws (2,000 seeds x 100 steps) land on each token as softmax(logits / T) says.

    Each token's frequency to 5 standard errors, and a chi-square test at p = 0.001.
    """
    logits, temperature = torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0, -3.0]), 0.7
    counts = draw(logits, temperature, 2000, 100)
    n, p = counts.sum(), torch.softmax(logits / temperature, -1)
    assert n == 200_000
    assert ((counts / n - p).abs() < 5 * (p * (1 - p) / n).sqrt()).all(), (counts / n, p)
    assert ((counts - n * p) ** 2 / (n * p)).sum() < 20.5  # 5 degrees of freedom


def test_a_row_noise_is_identical_alone_or_in_a_batch_of_64():
    """Same bits whether the row is hashed alone, or with 63 others across two chunks of rows."""
    vocab_size = 5003  # 52 rows to a chunk on CPU
    seeds = [sequence_seed(0, question, sample) for question in range(16) for sample in range(4)]
    logits = torch.randn(64, vocab_size)
    batched = SeededGumbelSampling(0.8, seeds, prompt_width=4)(widths(64, 9), logits)
    for row, seed in enumerate(seeds):
        alone = SeededGumbelSampling(0.8, [seed], prompt_width=4)(widths(1, 9), logits[row : row + 1])
        assert torch.equal(alone[0], batched[row]), row


def test_the_step_is_the_width_past_the_prompt_whatever_the_padding():
    seeds, logits = [11, 12], torch.zeros(2, 50)
    narrow, wide = SeededGumbelSampling(1.0, seeds, prompt_width=3), SeededGumbelSampling(1.0, seeds, prompt_width=10)
    assert torch.equal(narrow(widths(2, 3 + 2), logits), wide(widths(2, 10 + 2), logits))
    assert not torch.equal(narrow(widths(2, 5), logits), narrow(widths(2, 6), logits))
    # Nothing counted between calls: step 2 again draws what step 2 drew.
    assert torch.equal(narrow(widths(2, 5), logits), wide(widths(2, 12), logits))


class TensorsMade(TorchDispatchMode):
    """Records (device type, number of elements) of every tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else [out]
        self.tensors += [(t.device.type, t.numel()) for t in outputs if isinstance(t, torch.Tensor)]
        return out


def test_the_noise_is_made_on_the_logits_device():
    """With the logits on the meta device (standing in for an accelerator), every tensor of vocabulary size is made there."""
    vocab_size = 1000
    processor = SeededGumbelSampling(0.8, list(range(8)), prompt_width=3)
    logits = torch.zeros(8, vocab_size, device="meta")
    with TensorsMade() as made:
        for width in (3, 4):
            out = processor(torch.zeros(8, width, dtype=torch.long, device="meta"), logits)
    assert out.device.type == "meta" and out.dtype == torch.float32 and out.shape == logits.shape
    large = [device for device, numel in made.tensors if numel >= vocab_size]
    assert large and set(large) == {"meta"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_sampled_in_float32(dtype):
    logits = torch.randn(4, 300).to(dtype)
    processor = SeededGumbelSampling(0.7, [1, 2, 3, 4], prompt_width=2)
    out = processor(widths(4, 5), logits)
    assert out.dtype == torch.float32 and torch.equal(out, processor(widths(4, 5), logits.float()))


def _generate_in_process_group(rank: int, init_file: str, model_dir: str, prompts: list[str], results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
        results[rank] = generate_completions(model, tokenizer, prompts, 1, 1.0, 24, 1, seed=3, progress=False)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_synced_processes_sample_what_one_process_samples(toy_policy, toy_task, tmp_path):
    """Under synced_gpus a process whose batch has finished keeps running forward passes (transformers
    skips the logits processors there) until the other's has too; the samples stay those of one process."""
    model, tokenizer = toy_policy
    prompts = [toy_task.prompt(row) for row in toy_task.load_split("test")[:16]]
    one = generate_completions(model, tokenizer, prompts, 1, 1.0, 24, 1, seed=3, progress=False)
    # One sequence a batch, the two processes taking alternate batches: the test means something only if
    # in some round one sequence stopped at least two tokens before the other (one token may be its EOS).
    batches = partition([len(encode_prompt(tokenizer, prompt)) for prompt in prompts], 1, 1)
    lengths = [len(tokenizer(one[batch[0]][0], add_special_tokens=False)["input_ids"]) for batch in batches]
    assert any(abs(a - b) >= 2 for a, b in zip(lengths[0::2], lengths[1::2])), lengths

    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_generate_in_process_group, args=(str(tmp_path / "init"), str(tmp_path / "model"), prompts, results), nprocs=2)
        assert results[0] == results[1] == one
