import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from irpo_pl.data import PairPacker, tokenize_preference
from irpo_pl.datamodule import IRPODataModule
from irpo_pl.logprobs import segment_logps
from irpo_pl.module import IRPOModule
from irpo_pl.objectives import IRPO


def module_around(policy, tokenizer, **options) -> IRPOModule:
    module = IRPOModule(**options)
    module.use_policy(policy, tokenizer)
    return module


def _pair_batch(toy_task, tokenizer):
    rows = [
        {"prompt": toy_task.prompt(row), "chosen": row["answer"], "rejected": row["answer"].replace("####", "+ ####")}
        for row in toy_task.load_split("train")[:6]
    ]
    tokenized, dropped = tokenize_preference(tokenizer, rows, max_length=256)
    assert dropped == 0
    return tokenized


def test_precomputed_and_model_reference_give_the_same_loss(toy_policy, toy_task):
    policy, tokenizer = toy_policy
    rows = _pair_batch(toy_task, tokenizer)
    collate = PairPacker(tokenizer.pad_token_id)

    with_model = module_around(copy.deepcopy(policy), tokenizer, reference="model")
    with_model.begin_phase(IRPO(), lr=1e-4, warmup_ratio=0.1)
    loss_model = with_model._pair_step(collate(rows))["loss"]

    with torch.no_grad():
        batch = collate(rows)
        chosen, rejected = segment_logps(policy.eval(), batch, num_segments=2).unbind(1)
    precomputed_rows = [{**r, "reference_chosen_logps": c, "reference_rejected_logps": j} for r, c, j in zip(rows, chosen.tolist(), rejected.tolist())]
    with_logps = module_around(copy.deepcopy(policy), tokenizer)
    loss_precomputed = with_logps._pair_step(collate(precomputed_rows))["loss"]

    assert loss_precomputed.item() == pytest.approx(loss_model.item(), rel=1e-5)
    # At the start of an iteration the policy is its own reference: every reward is 0, DPO is log 2.
    parts = with_logps._pair_step(collate(precomputed_rows))
    assert parts["dpo"].item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-4)


def test_reference_model_is_frozen(toy_policy):
    policy, tokenizer = toy_policy
    module = module_around(policy, tokenizer, reference="model")
    module.begin_phase(IRPO(), lr=1e-4, warmup_ratio=0.1)
    assert not module.reference.training
    assert not any(p.requires_grad for p in module.reference.parameters())
    assert all(p.requires_grad for p in module.policy.parameters())


def test_non_finite_loss_stops_with_the_step(toy_policy, toy_task):
    policy, tokenizer = toy_policy
    rows = _pair_batch(toy_task, tokenizer)
    bad = [{**r, "reference_chosen_logps": float("nan"), "reference_rejected_logps": 0.0} for r in rows]
    module = module_around(policy, tokenizer)
    with pytest.raises(FloatingPointError, match="at step 0"):
        module.training_step(PairPacker(tokenizer.pad_token_id)(bad), 0)


@pytest.mark.slow
def test_logged_step_values_are_means_over_all_processes(tmp_path, toy_policy, toy_task):
    policy, tokenizer = toy_policy
    rows = _pair_batch(toy_task, tokenizer)
    with torch.no_grad():
        chosen = segment_logps(copy.deepcopy(policy).eval(), PairPacker(tokenizer.pad_token_id)(rows), num_segments=2)[:, 0]

    # Two processes of 3 rows each: the one step's global batch is all 6 rows, whatever their order.
    data = IRPODataModule.from_rows(copy.deepcopy(rows), batch_size=3, objective=IRPO(), out_dir=tmp_path)
    trainer = L.Trainer(
        strategy="ddp_spawn", devices=2, accelerator="cpu", max_epochs=1, logger=TensorBoardLogger(tmp_path, name="logs"),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )
    trainer.fit(module_around(policy, tokenizer), datamodule=data)

    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.*")).parent))
    events.Reload()
    [logged] = events.Scalars("train/logps_chosen")
    assert logged.step == 0
    assert logged.value == pytest.approx(chosen.mean().item(), rel=1e-5)
    assert logged.value != pytest.approx(chosen[0::2].mean().item(), rel=1e-3) and logged.value != pytest.approx(chosen[1::2].mean().item(), rel=1e-3)
