import torch

from irpo_pl.sampling import generate_completions


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


def test_gumbel_sampling_follows_the_softmax():
    """Many draws from one row's processor land on each token about as often as softmax(logits / T) says."""
    from irpo_pl.sampling import SeededGumbelSampling

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    temperature = 0.7
    processor = SeededGumbelSampling(temperature, [0])
    counts = torch.zeros(4)
    for _ in range(20000):
        counts[processor(None, logits).argmax()] += 1
    assert torch.allclose(counts / counts.sum(), torch.softmax(logits[0] / temperature, -1), atol=0.015)


def test_batched_greedy_equals_one_prompt_at_a_time(toy_policy, toy_task):
    """Left padding and length sorting must not change what greedy decoding produces."""
    model, tokenizer = toy_policy
    prompts = [toy_task.prompt(row) for row in toy_task.load_split("test")[:6]]
    batched = generate_completions(model, tokenizer, prompts, 1, 0.0, 8, 64, progress=False)
    single = [generate_completions(model, tokenizer, [p], 1, 0.0, 8, 1, progress=False)[0] for p in prompts]
    assert batched == single
