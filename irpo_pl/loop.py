"""The outer loop: warm start, then sample -> pair -> train -> evaluate, iteration after iteration.

Each phase gets a fresh Trainer (re-used fit loops stop at once) and a fresh
IRPOModule around the same policy, so M_{t+1} starts from M_t's weights. A run
directory that already holds finished iterations is resumed after the last one.
"""

from __future__ import annotations

import copy
import html
import shutil
import time
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path

import lightning as L
from datasets import load_from_disk
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from irpo_pl.config import RunConfig, validate
from irpo_pl.datamodule import IRPODataModule
from irpo_pl.distributed import barrier, full_state_dict, is_main_process, resolve_strategy
from irpo_pl.evaluation import evaluate
from irpo_pl.models import encode_prompt, format_prompt, load_policy
from irpo_pl.module import IRPOModule
from irpo_pl.run_dir import open_run_dir, save_model, write_json
from irpo_pl.sampling_vllm import require_vllm
from irpo_pl.tasks import get_task


def run(config: RunConfig, trainer_options: dict | None = None) -> Path:
    """Run (or resume) every phase of `config`; returns the run directory."""
    validate(config)
    if config.sampling.backend == "vllm":
        require_vllm()  # fail now, not after the warm start
    trainer_options = dict(trainer_options or {})
    run_dir = Path(config.run_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    main_process = is_main_process()
    summary = open_run_dir(run_dir, config, main_process)
    _check_schedule_unchanged(summary, config)
    _launch_other_processes(trainer_options)
    L.seed_everything(config.seed, verbose=False)

    task = get_task(config.task.name, **config.task.args)
    vocabulary = task.vocabulary() if hasattr(task, "vocabulary") else None
    # A resumed run continues from the last finished iteration's saved model.
    resume_from = run_dir / f"iteration_{summary[-1]['iteration']}" / "model" if summary else None
    model_config = replace(config.model, name_or_path=str(resume_from), gguf_file=None) if resume_from else config.model
    policy, tokenizer = load_policy(model_config, vocabulary, config.pairs.max_length + config.sampling.max_new_tokens)
    if resume_from:
        say(f"irpo_pl: resuming {run_dir} after iteration {summary[-1]['iteration']} ({resume_from})")
    train_examples = _usable(task, tokenizer, task.load_split("train"), "train", config.pairs.max_length)
    test_examples = _usable(task, tokenizer, task.load_split("test"), "test", config.pairs.max_length)[: config.eval.max_questions]
    needs_gold = [name for name, used in (("warm_start.steps > 0", config.warm_start.steps > 0), ("train.method sft", config.train.method == "sft")) if used]
    if needs_gold and task.gold_solution(train_examples[0]) is None:
        raise ValueError(f"{' and '.join(needs_gold)} train on gold solutions, and task {config.task.name} has none")
    say(
        f"irpo_pl: {type(policy).__name__} with {sum(p.numel() for p in policy.parameters()):,} parameters; "
        f"task {config.task.name}: {len(train_examples)} train, {len(test_examples)} test questions; run dir {run_dir}"
    )
    eval_logger = TensorBoardLogger(run_dir, name="tensorboard", version="eval")

    def finish_iteration(iteration: int, kind: str, row: dict) -> None:
        start = time.perf_counter()
        metrics = evaluate(
            policy, tokenizer, task, test_examples, config.sampling.max_new_tokens, config.eval.batch_size,
            config.eval.maj_k, config.eval.maj_temperature,
        )
        row["seconds"]["eval"] = time.perf_counter() - start
        row.update(iteration=iteration, kind=kind, test_accuracy=metrics["accuracy"], test_questions=len(test_examples))
        scalars = {"eval/accuracy": metrics["accuracy"]}
        if config.eval.maj_k:
            row[f"test_maj@{config.eval.maj_k}"] = scalars[f"eval/maj@{config.eval.maj_k}"] = metrics[f"maj@{config.eval.maj_k}"]
        eval_logger.log_metrics(scalars, step=iteration)
        eval_logger.save()
        state = full_state_dict(policy)  # every process takes part in gathering a sharded model
        summary.append(row)
        if main_process:
            save_model(policy, tokenizer, run_dir / f"iteration_{iteration}" / "model", state)
            write_json(run_dir / "summary.json", {"iterations": summary})
            # Only now is the iteration safe on disk; its resumable checkpoints can go.
            shutil.rmtree(run_dir / f"iteration_{iteration}" / "checkpoints", ignore_errors=True)
        barrier()
        say(_phase_line(row))

    if not summary:
        if config.warm_start.steps > 0:
            warm = config.warm_start
            data = IRPODataModule(
                task, tokenizer, train_examples, "sft", run_dir / "iteration_0", warm.batch_size, config.sampling, config.pairs, seed=config.seed
            )
            module = IRPOModule(policy, lr=warm.lr, warmup_ratio=warm.warmup_ratio, cpu_streams=config.train.cpu_streams)
            steps, seconds = _fit(module, data, run_dir, 0, trainer_options, warm.steps, -1, config.train.checkpoint_every)
            finish_iteration(0, "warm_start", {"num_rows": data.stats.rows, "steps": steps, "seconds": seconds})
        else:
            finish_iteration(0, "base", {"seconds": {}})

    train = config.train
    for iteration in range(summary[-1]["iteration"] + 1, config.iterations + 1):
        seed = config.seed * 1000 + iteration
        L.seed_everything(seed, verbose=False)
        temperature = config.sampling.temperatures[iteration - 1]
        data = IRPODataModule(
            task, tokenizer, _questions_for(iteration, train_examples, config.sampling.questions_per_iteration),
            train.method, run_dir / f"iteration_{iteration}", train.batch_size, config.sampling, config.pairs,
            temperature=temperature, precompute_reference=train.reference == "precomputed", seed=seed,
        )
        reference = copy.deepcopy(policy) if train.reference == "model" and train.method in ("irpo", "dpo") else None
        alpha = 0.0 if train.method == "dpo" else train.alpha
        module = IRPOModule(
            policy, train.beta, alpha, train.nll_normalization, train.lr, train.warmup_ratio, train.weight_decay, reference,
            cpu_streams=train.cpu_streams,
        )
        steps, seconds = _fit(module, data, run_dir, iteration, trainer_options, train.max_steps, train.epochs, train.checkpoint_every)
        if main_process:
            _show_pairs(eval_logger, data.out_dir / "pairs", iteration, config.eval.show_pairs)
        stats = asdict(data.stats)
        seconds.update(stats.pop("seconds"))
        rows_key = "num_pairs" if train.method in ("irpo", "dpo") else "num_rows"
        row = {rows_key: stats.pop("rows"), "steps": steps, "temperature": temperature, **stats, "seconds": seconds}
        finish_iteration(iteration, train.method, row)

    say(_table(summary))
    say(f"run directory: {run_dir.resolve()}")
    return run_dir


def say(message: str) -> None:
    """Print once, from the main process."""
    if is_main_process():
        print(message, flush=True)


def _launch_other_processes(trainer_options: dict) -> None:
    """Start the other processes of a multi-device run now, so each runs the whole loop from the start.

    Lightning's launcher would start them at the first fit, and re-runs this same
    command in each; afterwards every Trainer sees them and launches nothing. Under
    torchrun or SLURM the processes exist already and this does nothing.
    """
    trainer = L.Trainer(**{**resolve_strategy(trainer_options), "logger": False, "enable_checkpointing": False})
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.world_size > 1 and environment is not None and not environment.creates_processes_externally:
        trainer.strategy.launcher.launch(lambda: None)


def _fit(module, data, run_dir: Path, iteration: int, trainer_options: dict, max_steps: int, max_epochs: int, checkpoint_every: int) -> tuple[int, dict]:
    """One Lightning fit with a fresh Trainer, resumed from the phase's last checkpoint if there is one.

    Returns the optimizer steps taken and the wall time of training proper.
    """
    checkpoints = run_dir / f"iteration_{iteration}" / "checkpoints"
    options = {"enable_model_summary": False, "log_every_n_steps": 1, **resolve_strategy(trainer_options)}
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=max_epochs,
        logger=TensorBoardLogger(run_dir, name="tensorboard", version=f"iteration_{iteration}"),
        callbacks=[ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=checkpoint_every, save_top_k=0, save_last=True)],
        **options,
    )
    last = checkpoints / "last.ckpt"
    if last.exists():
        say(f"irpo_pl: iteration {iteration}: resuming training from {last}")
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=last if last.exists() else None, weights_only=True)
    total = time.perf_counter() - start
    return trainer.global_step, {"training": total - sum(data.stats.seconds.values())}


def _show_pairs(logger: TensorBoardLogger, pairs_dir: Path, iteration: int, count: int) -> None:
    """A few of the iteration's pairs as TensorBoard text; <pre> keeps Markdown from reflowing them."""
    if count <= 0 or not pairs_dir.exists():
        return
    pairs = load_from_disk(str(pairs_dir))
    shown = pairs.select(range(0, len(pairs), max(1, len(pairs) // count))[:count])
    text = "\n\n".join(
        f"<pre>PROMPT:   {html.escape(p['prompt'])}\nCHOSEN:   {html.escape(p['chosen'])}\nREJECTED: {html.escape(p['rejected'])}</pre>"
        for p in shown
    )
    logger.experiment.add_text("pairs", text, global_step=iteration)


def _usable(task, tokenizer, examples: list[dict], split: str, max_length: int) -> list[dict]:
    """The questions whose prompt leaves room for an answer; the rest are dropped and counted, never truncated."""
    if not examples:
        raise ValueError(f"task {task.name}: the {split} split is empty")
    kept = [e for e in examples if len(encode_prompt(tokenizer, format_prompt(tokenizer, task.prompt(e)))) < max_length]
    if len(kept) < len(examples):
        say(f"irpo_pl: dropped {len(examples) - len(kept)} of {len(examples)} {split} questions whose prompt is over pairs.max_length={max_length} tokens")
    if not kept:
        raise ValueError(f"task {task.name}: every {split} prompt is longer than pairs.max_length={max_length}")
    return kept


def _check_schedule_unchanged(summary: list[dict], config: RunConfig) -> None:
    for row in summary:
        if "temperature" in row and row["temperature"] != config.sampling.temperatures[row["iteration"] - 1]:
            raise ValueError(
                f"sampling.temperatures[{row['iteration'] - 1}] is {config.sampling.temperatures[row['iteration'] - 1]}, "
                f"but iteration {row['iteration']} of this run directory sampled at {row['temperature']}"
            )


def _questions_for(iteration: int, examples: list[dict], per_iteration: int | None) -> list[dict]:
    """A fresh slice of the training questions each iteration, wrapping around the end."""
    if per_iteration is None or per_iteration >= len(examples):
        return examples
    start = (iteration - 1) * per_iteration
    return [examples[(start + i) % len(examples)] for i in range(per_iteration)]


def _phase_line(row: dict) -> str:
    seconds = ", ".join(f"{k} {v:.0f}s" for k, v in row["seconds"].items())
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
