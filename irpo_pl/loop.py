"""The outer loop: warm start, then sample -> pair -> train -> evaluate, iteration after iteration.

Each phase gets a fresh Trainer (re-used fit loops stop at once) and a fresh
IRPOModule around the same policy, so M_{t+1} starts from M_t's weights.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from irpo_pl.config import RunConfig, validate
from irpo_pl.datamodule import IRPODataModule
from irpo_pl.evaluation import evaluate
from irpo_pl.models import load_policy
from irpo_pl.module import IRPOModule
from irpo_pl.tasks import get_task

log = logging.getLogger(__name__)


def run(config: RunConfig, trainer_options: dict | None = None) -> Path:
    """Run every phase of `config`; returns the run directory."""
    validate(config)
    trainer_options = dict(trainer_options or {})
    run_dir = Path(config.run_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(config.seed, verbose=False)

    task = get_task(config.task.name, **config.task.args)
    train_examples = task.load_split("train")
    test_examples = task.load_split("test")[: config.eval.max_questions]
    vocabulary = task.vocabulary() if hasattr(task, "vocabulary") else None
    max_positions = config.pairs.max_length + config.sampling.max_new_tokens
    policy, tokenizer = load_policy(config.model, vocabulary, max_positions)
    print(f"irpo_pl: {type(policy).__name__} with {sum(p.numel() for p in policy.parameters()):,} parameters; "
          f"task {config.task.name}: {len(train_examples)} train, {len(test_examples)} test questions; run dir {run_dir}")
    eval_logger = TensorBoardLogger(run_dir, name="tensorboard", version="eval")
    summary: list[dict] = []

    def finish_iteration(iteration: int, kind: str, row: dict) -> None:
        start = time.perf_counter()
        metrics = evaluate(policy, tokenizer, task, test_examples, config.sampling.max_new_tokens, config.eval.batch_size)
        row["seconds"]["eval"] = time.perf_counter() - start
        row.update(iteration=iteration, kind=kind, test_accuracy=metrics["accuracy"])
        eval_logger.log_metrics({"eval/accuracy": metrics["accuracy"]}, step=iteration)
        eval_logger.save()
        save_dir = run_dir / f"iteration_{iteration}" / "model"
        policy.save_pretrained(save_dir)
        tokenizer.save_pretrained(save_dir)
        summary.append(row)
        _write_json(run_dir / "summary.json", {"iterations": summary})
        print(_phase_line(row))

    if config.warm_start.steps > 0:
        warm = config.warm_start
        data = IRPODataModule(
            task, tokenizer, train_examples, "sft", run_dir / "iteration_0", warm.batch_size, config.sampling, config.pairs, seed=config.seed
        )
        module = IRPOModule(policy, lr=warm.lr, warmup_ratio=warm.warmup_ratio)
        seconds = _fit(module, data, run_dir, 0, trainer_options, max_steps=warm.steps, max_epochs=-1)
        finish_iteration(0, "warm_start", {"num_rows": data.stats.rows, "steps": warm.steps, "seconds": seconds})
    else:
        finish_iteration(0, "base", {"seconds": {}})

    train = config.train
    for iteration in range(1, config.iterations + 1):
        L.seed_everything(config.seed * 1000 + iteration, verbose=False)
        questions = _questions_for(iteration, train_examples, config.sampling.questions_per_iteration)
        data = IRPODataModule(
            task, tokenizer, questions, train.method, run_dir / f"iteration_{iteration}", train.batch_size,
            config.sampling, config.pairs, temperature=config.sampling.temperatures[iteration - 1],
            precompute_reference=train.reference == "precomputed", seed=config.seed * 1000 + iteration,
        )
        reference = copy.deepcopy(policy) if train.reference == "model" and train.method in ("irpo", "dpo") else None
        alpha = 0.0 if train.method == "dpo" else train.alpha
        module = IRPOModule(policy, train.beta, alpha, train.nll_normalization, train.lr, train.warmup_ratio, train.weight_decay, reference)
        seconds = _fit(module, data, run_dir, iteration, trainer_options, max_steps=train.max_steps, max_epochs=train.epochs)
        stats = asdict(data.stats)
        seconds.update(stats.pop("seconds"))
        row = {"method": train.method, "num_pairs" if train.method in ("irpo", "dpo") else "num_rows": stats.pop("rows"), **stats, "seconds": seconds}
        finish_iteration(iteration, train.method, row)

    print(_table(summary))
    print(f"run directory: {run_dir.resolve()}")
    return run_dir


def _fit(module, data, run_dir: Path, iteration: int, trainer_options: dict, max_steps: int, max_epochs: int) -> dict:
    """One Lightning fit with a fresh Trainer; returns its wall times."""
    options = {"enable_checkpointing": False, "enable_model_summary": False, "log_every_n_steps": 1, **trainer_options}
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=max_epochs,
        logger=TensorBoardLogger(run_dir, name="tensorboard", version=f"iteration_{iteration}"),
        **options,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    total = time.perf_counter() - start
    data_seconds = sum(data.stats.seconds.values())
    return {"training": total - data_seconds, "steps": trainer.global_step}


def _questions_for(iteration: int, examples: list[dict], per_iteration: int | None) -> list[dict]:
    """A fresh slice of the training questions each iteration, wrapping around the end."""
    if per_iteration is None or per_iteration >= len(examples):
        return examples
    start = (iteration - 1) * per_iteration
    return [examples[(start + i) % len(examples)] for i in range(per_iteration)]


def _phase_line(row: dict) -> str:
    seconds = ", ".join(f"{k} {v:.0f}s" for k, v in row["seconds"].items() if k != "steps")
    parts = [f"iteration {row['iteration']} ({row['kind']})"]
    if "num_pairs" in row:
        parts.append(
            f"{row['num_pairs']} pairs from {row['questions']} questions "
            f"(dropped: {row['dropped_all_correct']} all correct, {row['dropped_all_wrong']} all wrong, {row['dropped_too_long']} pairs too long)"
        )
    if row.get("sample_accuracy") is not None:
        parts.append(f"sample accuracy {row['sample_accuracy']:.1%}")
    parts.append(f"test accuracy {row['test_accuracy']:.1%}")
    return " | ".join(parts + [seconds])


def _table(summary: list[dict]) -> str:
    lines = ["", "iteration  kind        pairs   test accuracy", "---------  ----------  ------  -------------"]
    for row in summary:
        lines.append(f"{row['iteration']:>9}  {row['kind']:<10}  {row.get('num_pairs', ''):>6}  {row['test_accuracy']:>13.1%}")
    return "\n".join(lines)


def _write_json(path: Path, value) -> None:
    """Write through a temporary file and rename, so a crash leaves the old file or the new one, never half."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2))
    os.replace(partial, path)
