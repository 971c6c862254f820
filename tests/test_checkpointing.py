"""Activation checkpointing: the same loss and gradients as without it, in one process and under 2-process FSDP2."""

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from irpo_pl.checkpointing import decoder_blocks, enable_activation_checkpointing, is_activation_checkpointing_enabled
from irpo_pl.config import ToyModelConfig
from irpo_pl.data import PairPacker, SFTCollator
from irpo_pl.distributed import shard
from irpo_pl.logprobs import segment_logps
from irpo_pl.losses import irpo_loss
from irpo_pl.models import build_tiny_llama, build_word_tokenizer
from irpo_pl.streams import interleave_back, run_streams, split_rows

VOCABULARY = [f"w{i}" for i in range(40)]


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(VOCABULARY)
    shape = ToyModelConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2)
    return build_tiny_llama(tokenizer, shape, max_positions=128), tokenizer


def pair_rows(count: int, seed: int = 1) -> list[dict]:
    """Tokenized pairs of varied lengths (so rows pad differently), each completion ending in EOS (id 2)."""
    generator = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(4, 44, (int(torch.randint(low, high, (1,), generator=generator)),), generator=generator).tolist()

    return [{"prompt_ids": [1, *ids(2, 9)], "chosen_ids": [*ids(1, 12), 2], "rejected_ids": [*ids(1, 12), 2]} for _ in range(count)]


def policy_logps(model, rows: list[dict], layout: str, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed completion log-probs in one of the two pair layouts.

    "shared": one row per pair, prompt once, 4-D mask and restarted positions (PairPacker).
    "separate": prompt + chosen and prompt + rejected as separate right-padded rows, 2-D mask (SFTCollator).
    """
    if layout == "shared":
        return segment_logps(model, PairPacker(pad_id)(rows), num_segments=2).unbind(1)
    sides = [{"prompt_ids": r["prompt_ids"], "completion_ids": r[key]} for key in ("chosen_ids", "rejected_ids") for r in rows]
    return segment_logps(model, SFTCollator(pad_id)(sides), num_segments=1)[:, 0].split(len(rows))


def reference_logps(model, rows: list[dict], layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logps = policy_logps(model, rows, layout)
    model.train(was_training)
    return logps


def training_step(model, rows: list[dict], layout: str, reference: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Forward and backward of IRPO's loss; returns the loss (the gradients are left in the model)."""
    model.train()
    chosen, rejected = policy_logps(model, rows, layout)
    lengths = torch.tensor([len(r["chosen_ids"]) for r in rows])
    loss = irpo_loss(chosen, rejected, *reference, lengths, beta=0.1, alpha=1.0)["loss"]
    loss.backward()
    return loss.detach()


def count_block_forwards(model) -> list[int]:
    """A counter of the MLP calls inside the decoder blocks: a recompute calls them again (the block's own hooks it does not).

    A pre-hook, because the recompute stops as soon as it has rebuilt the last saved tensor, before the MLP returns.
    """
    calls = [0]
    for block in decoder_blocks(model):
        block.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("layout", ["shared", "separate"])
def test_same_loss_and_gradients_with_and_without_checkpointing(layout):
    plain, _ = tiny_model()
    checkpointed = copy.deepcopy(plain)
    assert enable_activation_checkpointing(checkpointed) == 3
    rows = pair_rows(6)
    # The reference is precomputed from a slightly different model, so the DPO term's gradient is not at its symmetric point.
    reference = tuple(x - 0.3 * torch.arange(len(rows)) for x in reference_logps(plain, rows, layout))
    calls = count_block_forwards(checkpointed)
    loss_plain = training_step(plain, rows, layout, reference)
    loss_checkpointed = training_step(checkpointed, rows, layout, reference)
    assert calls[0] == 2 * 3, "every block runs twice, forward and recompute"
    assert torch.allclose(loss_plain, loss_checkpointed, rtol=0, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name


def test_row_streams_with_checkpointing_give_the_same_gradients():
    """IRPOModule's CPU row streams (streams.py): forwards in two threads, then each stream's backward, with recomputes, in its thread."""
    plain, _ = tiny_model()
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed)
    rows = pair_rows(6)
    batch = PairPacker(0)(rows)
    reference = tuple(x - 0.3 * torch.arange(len(rows)) for x in reference_logps(plain, rows, "shared"))
    training_step(plain, rows, "shared", reference)

    checkpointed.train()
    outputs = run_streams(lambda part: segment_logps(checkpointed, part, num_segments=2), split_rows(batch, 2), 2)
    chosen, rejected = interleave_back(outputs).unbind(1)
    loss = irpo_loss(chosen, rejected, *reference, batch["chosen_lengths"], beta=0.1, alpha=1.0)["loss"]
    gradients = torch.autograd.grad(loss, outputs)
    run_streams(lambda pair: pair[0].backward(pair[1]), list(zip(outputs, gradients)), 2)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name


def test_active_only_in_a_training_forward_with_grad():
    model, tokenizer = tiny_model()
    enable_activation_checkpointing(model)
    assert is_activation_checkpointing_enabled(model)
    calls = count_block_forwards(model)
    rows = pair_rows(2)

    reference_logps(model, rows, "shared")  # the reference pre-pass: eval mode, no grad
    assert calls[0] == 3
    calls[0] = 0
    with torch.no_grad():  # a no-grad pass of a model left in training mode
        model.train()
        policy_logps(model, rows, "shared")
    assert calls[0] == 3
    calls[0] = 0
    model.eval()  # eval mode with grad enabled: no recompute either
    policy_logps(model, rows, "shared")[0].sum().backward()
    assert calls[0] == 3

    # Sampling: generate with a KV cache, in training mode too, runs each block once per new token.
    for mode in (model.eval, model.train):
        mode()
        calls[0] = 0
        out = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] == 7 and calls[0] == 4 * 3


def test_idempotent_and_deepcopy_rebinds_to_the_copy():
    model, _ = tiny_model()
    enable_activation_checkpointing(model)
    enable_activation_checkpointing(model)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for p in copied.parameters():
            p.zero_()
    rows = pair_rows(2)
    # Had the copy's wrapper stayed bound to the original's blocks, the copy would compute with the original's weights.
    copied_logps, original_logps = (reference_logps(m, rows, "shared")[0] for m in (copied, model))
    assert not torch.allclose(copied_logps, original_logps)
    assert [n for n, _ in copied.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert model.state_dict().keys() == tiny_model()[0].state_dict().keys()


def test_refuses_a_kv_cache_in_a_checkpointed_forward_and_hf_checkpointing():
    model, _ = tiny_model()
    enable_activation_checkpointing(model)
    model.train()
    with pytest.raises(ValueError, match="use_cache=False"):
        model(input_ids=torch.tensor([[1, 5, 6]]), use_cache=True)
    other, _ = tiny_model()
    # transformers 5's name; 4.x calls it gradient_checkpointing_enable.
    (getattr(other, "activation_checkpointing_enable", None) or other.gradient_checkpointing_enable)()
    with pytest.raises(ValueError, match="already has Hugging Face gradient checkpointing"):
        enable_activation_checkpointing(other)


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="cannot find the decoder blocks of Linear"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank: int, world: int, port: int) -> None:
    """Each rank trains on its half of the pairs; the gathered gradients must equal one process's on all of them.

    Checkpointing enabled before sharding and after it, with both pair layouts.
    """
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        rows = pair_rows(8)
        for order, layout in [(o, l) for o in ("before_shard", "after_shard") for l in ("shared", "separate")]:
            single, _ = tiny_model()
            sharded = copy.deepcopy(single)
            reference = tuple(x - 0.3 * torch.arange(len(rows)) for x in reference_logps(single, rows, layout))
            loss_single = training_step(single, rows, layout, reference)  # no checkpointing: the plain reference

            mesh = init_device_mesh("cpu", (world,))
            if order == "before_shard":
                enable_activation_checkpointing(sharded)
                shard(sharded, mesh)
            else:
                shard(sharded, mesh)
                enable_activation_checkpointing(sharded)
            calls = count_block_forwards(sharded)
            mine = slice(rank, None, world)
            loss = training_step(sharded, rows[mine], layout, tuple(x[mine] for x in reference))
            assert calls[0] == 2 * 3, calls
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            assert torch.allclose(loss, loss_single, rtol=0, atol=1e-6), (loss, loss_single)
            for (name, p), q in zip(sharded.named_parameters(), single.parameters()):
                full = p.grad.full_tensor()  # a collective: every rank gathers
                assert torch.allclose(full, q.grad, rtol=1e-4, atol=1e-6), (order, layout, name, (full - q.grad).abs().max())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_fsdp2_gradients_equal_one_process_without_checkpointing():
    mp.spawn(_fsdp_worker, args=(2, _free_port()), nprocs=2, join=True)


@pytest.mark.slow
def test_memory_benchmark_runs_on_a_tiny_model():
    """benchmarks/train_memory.py end to end at a tiny size, so it cannot rot; its figures are not checked here."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    tiny = ["--hidden", "64", "--intermediate", "128", "--layers", "2", "--heads", "2", "--vocab", "256",
            "--pairs", "2", "--prompt", "16", "--completion", "32", "--lora_r", "4", "--json",
            "--settings", "off,lora+ckpt"]  # the plain step, and the one with both branches taken
    repository = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "benchmarks/train_memory.py", *tiny], cwd=repository, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(result["settings"]) == ["off", "lora+ckpt"]
    # r * (in + out) for q, k, v, o (64 + 64) and gate, up, down (64 + 128), in each of 2 layers
    assert result["settings"]["lora+ckpt"]["trainable"] == 2 * (4 * 4 * 128 + 3 * 4 * 192)
    assert result["settings"]["off"]["trainable"] == result["parameters"]
    for figures in result["settings"].values():
        assert figures["peak_rss_mb"] >= figures["built_rss_mb"] > 0 and figures["step_s"] > 0
