import copy

import lightning as L
import pytest
import torch

from irpo_pl.data import PairPacker, tokenize_preference
from irpo_pl.datamodule import IRPODataModule
from irpo_pl.logprobs import segment_logps
from irpo_pl.module import IRPOModule
from irpo_pl.objectives import IRPO
from irpo_pl.streams import interleave_back, run_streams, split_rows, usable_streams


@pytest.fixture
def two_threads():
    """Streams need a thread each; CI may run with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _pairs_with_reference(toy_task, policy, tokenizer, count=7):
    """`count` tokenized pairs (an odd count: the streams get unequal shares) with the policy's own log-probs as reference."""
    rows = [
        {"prompt": toy_task.prompt(row), "chosen": row["answer"], "rejected": row["answer"].replace("####", "+ ####")}
        for row in toy_task.load_split("train")[:count]
    ]
    tokenized, _ = tokenize_preference(tokenizer, rows, max_length=256)
    with torch.no_grad():
        logps = segment_logps(policy.eval(), PairPacker(tokenizer.pad_token_id)(tokenized), num_segments=2).tolist()
    policy.train()
    return [{**row, "reference_chosen_logps": c, "reference_rejected_logps": r} for row, (c, r) in zip(tokenized, logps)]


def _step(policy, batch, streams):
    """One training step's loss and gradients, the way Lightning runs it: training_step, then the module's backward."""
    module = IRPOModule()
    module.use_policy(policy, None)
    module.streams_in_use = streams
    outputs = module._pair_step(batch)
    used = module._stream_outputs is not None
    module.backward(outputs["loss"])
    return outputs, {name: p.grad.clone() for name, p in policy.named_parameters()}, used


def test_split_rows_and_interleave_back_restore_the_row_order():
    batch = {"input_ids": torch.arange(10).view(5, 2), "lengths": torch.arange(5)}
    parts = split_rows(batch, 2)
    assert parts[0]["lengths"].tolist() == [0, 2, 4] and parts[1]["lengths"].tolist() == [1, 3]
    assert torch.equal(interleave_back([part["input_ids"] for part in parts]), batch["input_ids"])


def test_two_streams_give_the_loss_and_gradients_of_one(toy_policy, toy_task, two_threads):
    policy, tokenizer = toy_policy
    batch = PairPacker(tokenizer.pad_token_id)(_pairs_with_reference(toy_task, policy, tokenizer))

    one, one_grads, used_one = _step(copy.deepcopy(policy), batch, streams=1)
    two, two_grads, used_two = _step(copy.deepcopy(policy), batch, streams=2)

    assert not used_one and used_two
    for tag in ("loss", "logps_chosen", "logps_rejected", "rewards_margin"):
        torch.testing.assert_close(two[tag], one[tag], rtol=1e-5, atol=1e-6)
    for name, grad in one_grads.items():
        torch.testing.assert_close(two_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_two_streams_are_deterministic(toy_policy, toy_task, two_threads):
    policy, tokenizer = toy_policy
    batch = PairPacker(tokenizer.pad_token_id)(_pairs_with_reference(toy_task, policy, tokenizer))
    first = _step(copy.deepcopy(policy), batch, streams=2)[1]
    second = _step(copy.deepcopy(policy), batch, streams=2)[1]
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_streams_keep_the_callers_gradient_mode_and_thread_count(two_threads):
    with torch.no_grad():
        assert run_streams(lambda _: torch.is_grad_enabled(), [0, 1, 2], streams=2) == [False, False, False]
    assert run_streams(lambda _: (torch.is_grad_enabled(), torch.get_num_threads()), [0, 1], streams=2) == [(True, 1), (True, 1)]
    assert torch.get_num_threads() == 2


def test_streams_only_on_one_cpu_process_in_full_precision(two_threads):
    def trainer(**options):
        return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, **options)

    assert usable_streams(2, trainer()) == 2
    assert usable_streams(4, trainer()) == 2  # more would make the gradient sum depend on timing
    assert usable_streams(1, trainer()) == 1
    assert usable_streams(2, trainer(precision="bf16-mixed")) == 1
    torch.set_num_threads(1)
    assert usable_streams(2, trainer()) == 1


@pytest.mark.parametrize("cpu_streams", [1, 2])
def test_reference_pre_pass_in_streams_matches_one_stream(toy_policy, toy_task, tmp_path, two_threads, cpu_streams):
    policy, tokenizer = toy_policy
    expected = _pairs_with_reference(toy_task, policy, tokenizer, count=9)
    rows = [{key: row[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in expected]
    data = IRPODataModule.from_rows(rows, batch_size=2, objective=IRPO(), out_dir=tmp_path)
    module = IRPOModule(cpu_streams=cpu_streams)
    module.use_policy(policy, tokenizer)
    L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(module, datamodule=data)
    assert module.streams_in_use == cpu_streams
    for row, reference in zip(data.rows, expected):
        assert row["reference_chosen_logps"] == pytest.approx(reference["reference_chosen_logps"], rel=1e-5)
        assert row["reference_rejected_logps"] == pytest.approx(reference["reference_rejected_logps"], rel=1e-5)
