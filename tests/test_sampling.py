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
    draws = []
    for _ in range(2):
        torch.manual_seed(123)
        draws.append(generate_completions(model, tokenizer, prompts, 4, 1.0, 8, 16, progress=False))
    assert draws[0] == draws[1]


def test_batched_greedy_equals_one_prompt_at_a_time(toy_policy, toy_task):
    """Left padding and length sorting must not change what greedy decoding produces."""
    model, tokenizer = toy_policy
    prompts = [toy_task.prompt(row) for row in toy_task.load_split("test")[:6]]
    batched = generate_completions(model, tokenizer, prompts, 1, 0.0, 8, 64, progress=False)
    single = [generate_completions(model, tokenizer, [p], 1, 0.0, 8, 1, progress=False)[0] for p in prompts]
    assert batched == single
