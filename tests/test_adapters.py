"""LoRA adapters: what trains, merged saves that load without peft, the iterations' semantics, and FSDP2."""

import copy
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from irpo_pl.adapters import (
    LoraSettings,
    add_lora,
    adapter_state_dict,
    merge_adapter_and_restart,
    merged_state_dict,
    require_peft,
    save_adapter,
    trainable_parameters,
)
from irpo_pl.checkpointing import enable_activation_checkpointing
from irpo_pl.config import ToyModelConfig
from irpo_pl.data import PairPacker
from irpo_pl.distributed import full_state_dict, shard
from irpo_pl.logprobs import segment_logps
from irpo_pl.losses import irpo_loss
from irpo_pl.models import build_tiny_llama, build_word_tokenizer

pytest.importorskip("peft", reason="LoRA needs peft: pip install -e '.[dev]' (or '.[lora]')")

VOCABULARY = [f"w{i}" for i in range(40)]
HIDDEN, INTERMEDIATE, LAYERS = 32, 64, 2
LLAMA_LINEARS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
                 "gate_proj": (HIDDEN, INTERMEDIATE), "up_proj": (HIDDEN, INTERMEDIATE), "down_proj": (INTERMEDIATE, HIDDEN)}


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(VOCABULARY)
    shape = ToyModelConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_layers=LAYERS, num_heads=2)
    return build_tiny_llama(tokenizer, shape, max_positions=128), tokenizer


def pair_batch(count: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A PairPacker batch of varied lengths, each completion ending in EOS (id 2)."""
    generator = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(4, 44, (int(torch.randint(low, high, (1,), generator=generator)),), generator=generator).tolist()

    rows = [{"prompt_ids": [1, *ids(2, 9)], "chosen_ids": [*ids(1, 12), 2], "rejected_ids": [*ids(1, 12), 2]} for _ in range(count)]
    return PairPacker(pad_id=0)(rows)


@torch.no_grad()
def scored(model, batch) -> torch.Tensor:
    """[P, 2] summed completion log-probs, as the reference pre-pass computes them (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    logps = segment_logps(model, batch, num_segments=2)
    model.train(was_training)
    return logps


def step_parts(model, batch, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    chosen, rejected = segment_logps(model, batch, num_segments=2).unbind(1)
    return irpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], batch["chosen_lengths"], beta=0.1, alpha=1.0)


def train(model, batch, steps: int, lr: float = 1e-2) -> list[dict]:
    """`steps` AdamW steps of IRPO with the reference precomputed from the model as it starts (M_t); returns each step's parts."""
    reference = scored(model, batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for _ in range(steps):
        parts = step_parts(model, batch, reference)
        parts["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(parts)
    return history


def reload(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    assert not any("lora" in name or "base_layer" in name for name, _ in model.named_parameters())
    return model


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "down_proj"]])
def test_only_the_adapter_trains_r_times_in_plus_out_per_layer(targets):
    model, _ = tiny_model()
    batch = pair_batch(3)
    before = scored(model, batch)
    total_before = sum(p.numel() for p in model.parameters())
    add_lora(model, LoraSettings(r=4, alpha=8, target_modules=targets), seed=0)

    names = LLAMA_LINEARS if targets == "all-linear" else targets
    expected = LAYERS * sum(4 * sum(LLAMA_LINEARS[name]) for name in names)
    trainable, total = trainable_parameters(model)
    assert trainable == expected and total == total_before + expected
    assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in model.named_parameters())
    assert torch.equal(scored(model, batch), before), "a fresh adapter (B = 0) changes nothing"


def test_training_changes_outputs_and_the_merged_save_reloads_with_the_same_logps(tmp_path):
    model, tokenizer = tiny_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = pair_batch(4)
    before = scored(model, batch)
    add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.1), seed=0)
    train(model, batch, steps=3)
    after = scored(model, batch)
    assert (after - before).abs().max() > 0.1
    for name, parameter in model.named_parameters():  # the frozen weights did not move
        plain = name.replace(".base_layer", "")
        if plain in base:
            assert torch.equal(parameter, base[plain]), name

    model.save_pretrained(tmp_path, state_dict=merged_state_dict(model))
    tokenizer.save_pretrained(tmp_path)
    reloaded = reload(tmp_path)
    assert torch.allclose(scored(reloaded, batch), after, rtol=0, atol=1e-5)


def test_gpt2_conv1d_layers_merge_transposed(tmp_path):
    """GPT-2 stores its projections as Conv1D, weight [in, out]: the update B A is transposed into them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=48, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    add_lora(model, LoraSettings(r=4, alpha=8), seed=0)
    assert model.transformer.h[0].attn.c_attn.fan_in_fan_out
    batch = pair_batch(3)
    train(model, batch, steps=2)
    model.save_pretrained(tmp_path, state_dict=merged_state_dict(model))
    assert torch.allclose(scored(reload(tmp_path), batch), scored(model, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, alpha=8, dropout=0.1)])
def test_first_step_dpo_term_is_log_2_with_the_reference_from_the_policy(lora):
    model, _ = tiny_model()
    if lora:
        add_lora(model, lora, seed=0)
    # Two steps: the first sees policy = reference (dropout too: it reaches the adapter only, whose B is zero), the second not.
    first, second = train(model, pair_batch(4), steps=2)
    assert first["dpo"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert abs(second["dpo"].item() - math.log(2)) > 1e-4


def test_two_iterations_each_starts_from_the_last_merged_model_and_a_resume_matches(tmp_path):
    settings = LoraSettings(r=4, alpha=8)
    policy, _ = tiny_model()
    add_lora(policy, settings, seed=1)
    batch_1, batch_2 = pair_batch(4, seed=1), pair_batch(4, seed=2)

    train(policy, batch_1, steps=3)  # iteration 1
    trained = scored(policy, batch_1)
    merge_adapter_and_restart(policy, seed=2)
    assert torch.allclose(scored(policy, batch_1), trained, rtol=0, atol=1e-5), "folding keeps the function"
    assert all(torch.count_nonzero(p) == 0 for n, p in policy.named_parameters() if "lora_B" in n)
    merged_1 = merged_state_dict(policy)
    plain_1 = {n.replace(".base_layer", ""): p for n, p in policy.state_dict().items() if "lora_" not in n}
    assert merged_1.keys() == plain_1.keys() and all(torch.equal(merged_1[k], plain_1[k]) for k in plain_1), "M_1 saved is M_1 in memory"
    policy.save_pretrained(tmp_path / "m1", state_dict=merged_1)  # (save_pretrained empties the dict it is given)

    # A run resumed after iteration 1 reloads M_1 and adds the adapter with the seed the fold used.
    resumed = add_lora(reload(tmp_path / "m1"), settings, seed=2)
    assert resumed.state_dict().keys() == policy.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), policy.state_dict().values()))

    history = train(policy, batch_2, steps=3)  # iteration 2: its reference is M_1
    assert history[0]["dpo"].item() == pytest.approx(math.log(2), abs=1e-6)
    train(resumed, batch_2, steps=3)
    assert torch.equal(scored(resumed, batch_2), scored(policy, batch_2)), "the resumed run trains to the same model"
    merge_adapter_and_restart(policy, seed=3)
    policy.save_pretrained(tmp_path / "m2", state_dict=merged_state_dict(policy))
    m1, m2 = reload(tmp_path / "m1"), reload(tmp_path / "m2")
    assert torch.allclose(scored(m2, batch_2), scored(policy, batch_2), rtol=0, atol=1e-5)
    assert (scored(m2, batch_2) - scored(m1, batch_2)).abs().max() > 0.1, "iteration 2 trained from M_1 onwards"


def test_the_adapter_alone_loads_with_peft_onto_the_model_it_updates(tmp_path):
    peft = require_peft()
    settings = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    policy, _ = tiny_model()
    policy.save_pretrained(tmp_path / "m0")
    add_lora(policy, settings, seed=0)
    batch = pair_batch(4)
    train(policy, batch, steps=3)
    save_adapter(adapter_state_dict(policy), settings, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "m0"))
    loaded = peft.PeftModel.from_pretrained(reload(tmp_path / "m0"), tmp_path / "adapter")
    assert torch.allclose(scored(loaded, batch), scored(policy, batch), rtol=0, atol=1e-5)


def test_checkpointing_composes_with_lora():
    plain, _ = tiny_model()
    add_lora(plain, LoraSettings(r=4, alpha=8, dropout=0.2), seed=0)
    with torch.no_grad():  # a non-zero B, so that every adapter parameter gets a gradient
        for name, parameter in plain.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed)
    batch = pair_batch(4)
    reference = scored(plain, batch) - 0.5
    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(7)  # the same dropout masks in both; the recompute draws them again
        losses.append(step_parts(model, batch, reference)["loss"])
        losses[-1].backward()
    assert torch.allclose(losses[0], losses[1], rtol=0, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert (p.grad is None) == (q.grad is None) == (not p.requires_grad), name
        if p.grad is not None:
            assert p.grad.abs().sum() > 0 and torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")  # peft's, before our refusal
def test_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="lora.r must be an integer >= 1"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match=r"lora.dropout must be in \[0, 1\)"):
        LoraSettings(dropout=1.0)
    model, _ = tiny_model()
    with pytest.raises(ValueError, match="tied embeddings"):
        add_lora(model, LoraSettings(target_modules=["lm_head"]), seed=0)
    model, _ = tiny_model()
    with pytest.raises(ValueError, match="only linear layers are supported"):
        add_lora(model, LoraSettings(target_modules=["embed_tokens"]), seed=0)
    model, _ = tiny_model()
    with pytest.raises(ValueError, match="lora.target_modules"):
        add_lora(model, LoraSettings(target_modules=["no_such_layer"]), seed=0)
    model, _ = tiny_model()
    add_lora(model, LoraSettings(), seed=0)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        add_lora(model, LoraSettings(), seed=0)
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_adapter_and_restart(tiny_model()[0], seed=0)
    monkeypatch.setitem(sys.modules, "peft", None)  # what an environment without peft gives
    with pytest.raises(ImportError, match=r"pip install 'irpo_pl\[lora\]'"):
        add_lora(tiny_model()[0], LoraSettings(), seed=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank: int, world: int, port: int) -> None:
    """A LoRA model sharded over 2 processes trains one step on half the pairs each, then merges as one process does."""
    import os

    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        settings = LoraSettings(r=4, alpha=8)
        single, tokenizer = tiny_model()
        add_lora(single, settings, seed=1)
        sharded = copy.deepcopy(single)
        batch = pair_batch(8)
        reference = scored(single, batch) - 0.3 * torch.arange(8).unsqueeze(1)

        def one_step(model, rows):
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            part = {k: v[rows] for k, v in batch.items()}
            step_parts(model, part, reference[rows])["loss"].backward()
            optimizer.step()

        one_step(single, slice(None))
        enable_activation_checkpointing(sharded)
        shard(sharded, init_device_mesh("cpu", (world,)))
        assert trainable_parameters(sharded) == trainable_parameters(single)
        one_step(sharded, slice(rank, None, world))

        def close(a: dict, b: dict) -> None:
            assert a.keys() == b.keys()
            for key in a:
                assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), (key, (a[key] - b[key]).abs().max())

        state = full_state_dict(sharded)  # a collective: every rank gathers; rank 0 gets it
        if rank == 0:
            close(merged_state_dict(sharded, state), merged_state_dict(single))
        adapter = adapter_state_dict(sharded)
        close(adapter, adapter_state_dict(single))

        # The fold on the shards, then the restart: the same as one process's.
        merge_adapter_and_restart(sharded, seed=2)
        merge_adapter_and_restart(single, seed=2)
        state = full_state_dict(sharded)
        if rank == 0:
            close(state, single.state_dict())
        # Sampling from the sharded LoRA model (generate registered by shard), each rank its own prompt.
        prompt = torch.tensor([[1, 5 + rank, 6]])
        out = sharded.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, synced_gpus=True, pad_token_id=tokenizer.pad_token_id)
        expected = single.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert torch.equal(out, expected), (out, expected)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_fsdp2_lora_trains_and_merges_like_one_process():
    mp.spawn(_fsdp_worker, args=(2, _free_port()), nprocs=2, join=True)


# ---- the whole loop with LoRA, through the CLI ---------------------------------------------------

LOOP = [
    "--config", str(Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"),
    "--data.task.args", '{"num_train": 300, "num_test": 24}', "--data.task", '{"gold_chains": null}',
    "--model.policy.toy", '{"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2}',
    "--warm_start.steps", "12", "--warm_start.batch_size", "8", "--iterations", "2",
    "--data.sampling.questions_per_iteration", "32", "--data.sampling.num_samples", "4", "--data.sampling.max_new_tokens", "32",
    "--data.batch_size", "4", "--checkpoint_every", "2", "--trainer.enable_progress_bar", "false",
    "--model.lora", '{"r": 4, "alpha": 8, "save_adapter": true}', "--model.activation_checkpointing", "true",
]


def _fit_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "irpo_pl", "fit", *LOOP, "--run_dir", str(run_dir)]


def _fit(run_dir: Path) -> str:
    done = subprocess.run(_fit_command(run_dir), capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_a_lora_run_trains_only_the_adapter_saves_plain_models_and_resumes_after_a_kill(tmp_path):
    from safetensors.torch import load_file

    killed = tmp_path / "killed"
    process = subprocess.Popen(_fit_command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoint = killed / "iteration_2" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended or stalled before iteration 2 had a checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    printed = _fit(killed)
    assert "resuming training from" in printed
    whole = tmp_path / "whole"
    printed = _fit(whole)

    # Only the adapter trains: r x (in + out) for each of the 7 projections of the 2 blocks.
    hidden, intermediate, r = 32, 64, 4
    per_block = r * (4 * (hidden + hidden) + 2 * (hidden + intermediate) + (intermediate + hidden))
    assert f"({2 * per_block:,} of them trainable: LoRA r=4)" in printed

    for run in (killed, whole):
        models = [load_file(run / f"iteration_{t}" / "model" / "model.safetensors") for t in range(3)]
        # Plain architecture names: what from_pretrained maps, no peft needed to load.
        assert not any("lora" in key or "base_layer" in key for key in models[2])
        assert any(not torch.equal(models[1][key], models[2][key]) for key in models[2]), "iteration 2 changed nothing"
        assert (run / "iteration_2" / "adapter" / "adapter_model.safetensors").exists()
    # The resumed run trained to the weights of the uninterrupted one, bit for bit.
    resumed, uninterrupted = (load_file(run / "iteration_2" / "model" / "model.safetensors") for run in (killed, whole))
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in uninterrupted)
    AutoModelForCausalLM.from_pretrained(whole / "iteration_2" / "model")
