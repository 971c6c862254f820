"""The run's data: the task's questions, and each phase's training rows sampled, scored and paired from the current policy.

A phase's rows are built when its Trainer first asks for the training dataloader, which
Lightning does after it has moved (and sharded) the model onto its device: so sampling
and the reference pre-pass run where training runs, with the policy as it is then, M_t.
The data module samples N completions per question, scores them with the task, builds
the rows the objective trains on (pairs, gold solutions, or the model's own correct
samples), saves samples and rows in the phase's folder as `datasets` datasets, and,
when the objective needs them and `model.reference` is precomputed, adds M_t's log-probs
of every pair, so the frozen reference never has to sit in memory.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import datasets
import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from torch.utils.data import DataLoader

from irpo_pl.config import EvalConfig, PairConfig, SamplingConfig, TaskConfig
from irpo_pl.data import SFTCollator, length_grouped_order, tokenize_preference, tokenize_sft
from irpo_pl.distributed import barrier, is_main_process, rank_and_world, reshard
from irpo_pl.evaluation import EvalBatch, eval_batches, eval_loader, scores
from irpo_pl.layouts import pair_layout_of
from irpo_pl.logprobs import score_pairs
from irpo_pl.models import encode_prompt, format_prompt
from irpo_pl.objectives import Objective
from irpo_pl.pairing import build_pairs, cap_pairs
from irpo_pl.run_dir import replace_dir
from irpo_pl.sampling import generate_batch, generate_completions
from irpo_pl.sampling_vllm import generate_completions_vllm
from irpo_pl.streams import usable_streams
from irpo_pl.tasks import Task, get_task


@dataclass
class PhaseStats:
    """What a phase's data step did, for the log line and summary.json."""

    questions: int = 0
    samples: int = 0
    sample_accuracy: float | None = None
    rows: int = 0
    dropped_all_correct: int = 0
    dropped_all_wrong: int = 0
    dropped_too_long: int = 0
    dropped_over_cap: int = 0
    """Pairs left out of a seeded random subsample of pairs.max_pairs."""
    seconds: dict = field(default_factory=dict)
    devices: dict = field(default_factory=dict)
    """Where each step ran (sampling, reference), as the log line and summary.json say."""


@dataclass
class DataPhase:
    """What one phase trains on; the loop hands one to the data module before each fit."""

    out_dir: Path
    """The phase's folder: samples/, pairs/ or sft_rows/ go there."""
    questions: list[dict]
    objective: Objective
    batch_size: int
    seed: int
    temperature: float = 1.0
    precompute_reference: bool = True
    rows: list[dict] | None = None
    """Tokenized rows to train on as they are, instead of sampling (fixed, offline pairs)."""


class IRPODataModule(L.LightningDataModule):
    """The task's questions; each phase's training rows; the evaluation batches of the test split."""

    def __init__(
        self,
        task: TaskConfig = TaskConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        pairs: PairConfig = PairConfig(),
        eval: EvalConfig = EvalConfig(),
        batch_size: PositiveInt = 32,
    ) -> None:
        """
        Args:
            task: The reasoning task: its questions, prompt and reward.
            sampling: How each iteration samples completions from the current policy.
            pairs: How scored samples become preference pairs.
            eval: How the model is evaluated after each iteration.
            batch_size: Rows (pairs, or single completions) per optimizer step and per process: the global batch is this times the number of processes.
        """
        super().__init__()
        # The defaults are shared instances: read, never changed.
        self.task_config, self.sampling, self.pairs, self.eval = task, sampling, pairs, eval
        self.batch_size = batch_size
        self.train_questions: list[dict] = []
        self.chain_questions: list[dict] = []
        """The training questions whose gold chain of thought may be trained on (all that have one, or data.task.gold_chains of them)."""
        self.sampled_questions: list[dict] = []
        """The training questions the iterations sample from: all, or the answer-only ones when data.task.gold_chains is set."""
        self._chain_ids: set[int] = set()
        self.selection_questions: list[dict] = []
        self.test_questions: list[dict] = []
        self.vote_seed = 0
        self.phase: DataPhase | None = None
        self.rows: list[dict] | None = None
        self.stats = PhaseStats()
        self.position = BatchPosition()  # how far into the epoch training is, for checkpoints

    @classmethod
    def from_rows(cls, rows: list[dict], batch_size: int, objective: Objective, out_dir: Path, seed: int = 0) -> IRPODataModule:
        """A data module that trains on fixed, already tokenized rows (offline pairs, say) instead of sampling."""
        data = cls(batch_size=batch_size)
        data.begin_phase(DataPhase(Path(out_dir), [], objective, batch_size, seed, rows=rows))
        return data

    @cached_property
    def task(self) -> Task:
        return get_task(self.task_config.name, **self.task_config.args)

    # ---- the questions, checked once before any expensive work -------------------------------

    def vocabulary(self) -> list[str] | None:
        """The task's fixed vocabulary, for a word-level tokenizer (model.policy.name_or_path: toy), if it has one."""
        return self.task.vocabulary() if hasattr(self.task, "vocabulary") else None

    def prepare_questions(self, tokenizer, needs_gold: list[str], seed: int = 0) -> None:
        """Load and check the splits; drop (and count) questions whose prompt leaves no room for an answer.

        `needs_gold` names the settings that train on gold solutions, which the task must then have;
        `seed` seeds the maj@k votes, the same after every iteration (and for `test`).
        """
        self.vote_seed = seed
        self.train_questions = _usable(self.task, tokenizer, self.task.load_split("train"), "train", self.pairs.max_length)
        held_out = self.eval.selection_questions
        if held_out:
            if held_out >= len(self.train_questions):
                raise ValueError(f"data.eval.selection_questions is {held_out}, but the task has only {len(self.train_questions)} usable training questions")
            chosen = set(random.Random(seed).sample(range(len(self.train_questions)), held_out))
            self.selection_questions = [q for i, q in enumerate(self.train_questions) if i in chosen]
            self.train_questions = [q for i, q in enumerate(self.train_questions) if i not in chosen]
        self.test_questions = _usable(self.task, tokenizer, self.task.load_split("test"), "test", self.pairs.max_length)[: self.eval.max_questions]
        self._split_by_gold_chain()
        _warn_if_gold_is_cut(self.task, tokenizer, self.train_questions + self.test_questions, self.sampling.max_new_tokens)
        if needs_gold and not self.chain_questions:
            why = "data.task.gold_chains is 0" if self.task_config.gold_chains == 0 else f"task {self.task_config.name} has none"
            raise ValueError(f"{' and '.join(needs_gold)} train on gold solutions, and {why}")

    def _split_by_gold_chain(self) -> None:
        """Which training questions keep their gold chain of thought, and which ones the iterations sample.

        With data.task.gold_chains N, the first N questions that have a chain are the seed set
        and every other one is answer-only: only its gold answer is used, to score samples.
        """
        with_chain = [q for q in self.train_questions if self.task.gold_solution(q) is not None]
        limit = self.task_config.gold_chains
        if limit is None:
            self.chain_questions, self.sampled_questions = with_chain, self.train_questions
            # The paper's retrain after checkpoint selection trains on the held-out questions too, chains included.
            self._chain_ids = {id(q) for q in self.chain_questions + self.selection_questions}
            return
        if limit > len(with_chain):
            raise ValueError(f"data.task.gold_chains is {limit}, but only {len(with_chain)} usable training questions of task {self.task_config.name} have a gold chain")
        self.chain_questions = with_chain[:limit]
        kept = {id(q) for q in self.chain_questions}
        self.sampled_questions = [q for q in self.train_questions if id(q) not in kept]
        if not self.sampled_questions:
            raise ValueError(f"data.task.gold_chains is {limit}: every usable training question keeps its chain, and none is left for the iterations to sample")
        # Questions are the split's own row dicts, so identity tells a seed-set question from an answer-only one.
        self._chain_ids = {id(q) for q in self.chain_questions}

    def gold_chain(self, example: dict) -> str | None:
        """The question's gold solution if it may be trained on (data.task.gold_chains), else None."""
        return self.task.gold_solution(example) if id(example) in self._chain_ids else None

    def questions_for(self, iteration: int, trains_on: str = "pairs") -> list[dict]:
        """A fresh slice each iteration, wrapping around the end, of the questions an objective that `trains_on` these rows uses.

        Gold solutions come from the questions with a gold chain; samples from `sampled_questions`.
        """
        pool = self.chain_questions if trains_on == "gold" else self.sampled_questions
        per_iteration = self.sampling.questions_per_iteration
        if per_iteration is None or per_iteration >= len(pool):
            return pool
        start = (iteration - 1) * per_iteration
        return [pool[(start + i) % len(pool)] for i in range(per_iteration)]

    def begin_phase(self, phase: DataPhase) -> None:
        for index, row in enumerate(phase.rows or []):
            for key in ("chosen_ids", "rejected_ids", "completion_ids"):
                if key in row and not row[key]:
                    # The packers feed a completion's tokens but its last as inputs: an empty one has no target.
                    raise ValueError(f"rows[{index}]: {key} is empty; a completion has at least its EOS token")
        self.phase, self.rows = phase, phase.rows
        self.stats = PhaseStats(questions=len(phase.questions))
        self.position = BatchPosition()

    # ---- a phase's training rows --------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        module = self.trainer.lightning_module
        if self.rows is None:
            self.rows = self._rows_for_objective(module.policy, module.tokenizer)
        if self._needs_reference_logps():
            start = time.perf_counter()
            self._add_reference_logps(module.policy)
            self.stats.seconds["reference"] = time.perf_counter() - start
            self.stats.devices["reference"] = _device_of(module.policy)
        reshard(module.policy)
        self.stats.rows = len(self.rows)
        if not self.rows:
            answer_only = self.task_config.gold_chains is not None and self.phase.objective.trains_on != "gold"
            raise RuntimeError(f"{self.phase.out_dir.name}: nothing to train on. {_why_empty(self.stats, answer_only)}")
        pad_id = module.tokenizer.pad_token_id
        if self.phase.objective.trains_on == "pairs":
            layout = pair_layout_of(module.policy)  # the layout decided when the policy was loaded
            collate, lengths = layout.collator(pad_id), [layout.row_tokens(row) for row in self.rows]
        else:
            collate, lengths = SFTCollator(pad_id), [_row_length(row) for row in self.rows]
        # The order is fixed here, not by a shuffling sampler, so that batches are length-grouped
        # and a distributed sampler's interleaved shares stay length-grouped too.
        order = length_grouped_order(lengths, self.phase.batch_size, self.phase.seed)
        return ResumableDataLoader(
            [self.rows[i] for i in order], batch_size=self.phase.batch_size, shuffle=False, collate_fn=collate, position=self.position,
        )

    def _needs_reference_logps(self) -> bool:
        return (
            self.phase.precompute_reference and self.phase.objective.needs_reference
            and bool(self.rows) and "reference_chosen_logps" not in self.rows[0]
        )

    def _rows_for_objective(self, policy, tokenizer) -> list[dict]:
        """Sample, score and pair (or take the gold solutions), save the text rows, return them tokenized."""
        trains_on = self.phase.objective.trains_on
        questions = self.phase.questions
        prompts = [self.task.prompt(example) for example in questions]
        if trains_on == "gold":
            solutions = [self.gold_chain(e) for e in questions]
            text_rows = [{"prompt": p, "completion": gold} for p, gold in zip(prompts, solutions) if gold is not None]
        else:
            samples, rewards = self._sample_and_score(policy, tokenizer, prompts)
            text_rows = self._correct_samples(prompts, samples, rewards) if trains_on == "samples" else self._pairs(prompts, samples, rewards)
        save_dataset(text_rows, self.phase.out_dir / ("pairs" if trains_on == "pairs" else "sft_rows"))
        if trains_on == "pairs":
            # No longer than the model scores exactly in its layout (a position table, a rope scaling switch).
            rows, self.stats.dropped_too_long = tokenize_preference(
                tokenizer, text_rows, pair_layout_of(policy).max_length(self.pairs.max_length), self.pairs.rejected_tokens_after_divergence
            )
        else:
            rows, self.stats.dropped_too_long = tokenize_sft(tokenizer, text_rows, self.pairs.max_length)
        return rows

    def _sample_and_score(self, policy, tokenizer, prompts: list[str]) -> tuple[list[list[str]], list[list[float]]]:
        """The phase's scored samples: drawn now, or read back if an earlier attempt finished drawing them."""
        start = time.perf_counter()
        saved = self.phase.out_dir / "samples"
        if saved.exists():
            samples, rewards = _read_samples(saved, len(prompts), self.sampling.num_samples)
            if is_main_process():
                print(f"irpo_pl: reusing the {len(prompts) * self.sampling.num_samples} samples in {saved}")
        else:
            formatted = [format_prompt(tokenizer, p) for p in prompts]
            if self.sampling.backend == "vllm":
                # Every prompt is under pairs.max_length tokens (prepare_questions drops longer ones).
                engine_args = {"max_model_len": self.pairs.max_length + self.sampling.max_new_tokens, **self.sampling.vllm_args}
                draw = partial(generate_completions_vllm, engine_args=engine_args)
            else:
                draw = partial(generate_completions, compile_decoding=self.sampling.compile)
            samples = draw(
                policy, tokenizer, formatted, self.sampling.num_samples, self.phase.temperature,
                self.sampling.max_new_tokens, self.sampling.batch_size, seed=self.phase.seed, cache=self.sampling.cache,
            )
            rewards = [[self.task.reward(c, e) for c in completions] for completions, e in zip(samples, self.phase.questions)]
            save_dataset(
                [
                    {"question_index": i, "prompt": prompts[i], "completion": c, "reward": r}
                    for i, (completions, row_rewards) in enumerate(zip(samples, rewards))
                    for c, r in zip(completions, row_rewards)
                ],
                saved,
            )
        flat = [r for row in rewards for r in row]
        self.stats.samples, self.stats.sample_accuracy = len(flat), sum(flat) / len(flat)
        self.stats.seconds["sampling"] = time.perf_counter() - start
        self.stats.devices["sampling"] = _device_of(policy)
        return samples, rewards

    def _correct_samples(self, prompts, samples, rewards) -> list[dict]:
        """One row per distinct correct sample of each question."""
        rows = []
        for prompt, completions, row_rewards in zip(prompts, samples, rewards):
            winners = dict.fromkeys(c for c, r in zip(completions, row_rewards) if r > 0)
            rows.extend({"prompt": prompt, "completion": c} for c in winners)
            self.stats.dropped_all_wrong += not winners
        return rows

    def _pairs(self, prompts, samples, rewards) -> list[dict]:
        gold = [self.gold_chain(e) for e in self.phase.questions] if self.pairs.gold_in_winners else None
        pairs, pair_stats = build_pairs(prompts, samples, rewards, self.pairs.pairs_per_question, gold)
        self.stats.dropped_all_correct = pair_stats.dropped_all_correct
        self.stats.dropped_all_wrong = pair_stats.dropped_all_wrong
        pairs, self.stats.dropped_over_cap = cap_pairs(pairs, self.pairs.max_pairs, self.phase.seed)
        return pairs

    def _add_reference_logps(self, policy) -> None:
        """M_t's log-probs of every pair, computed once and saved (reference_logps/), so that a resumed phase reads them back.

        A resumed fit may already hold the checkpoint's weights when it asks for this loader
        (Lightning restores them before setting up the strategy on one device): those are not M_t.
        """
        saved = self.phase.out_dir / "reference_logps"
        if saved.exists():
            logps = datasets.load_from_disk(str(saved))
            if len(logps) != len(self.rows):
                raise ValueError(f"{saved} holds {len(logps)} rows, not the {len(self.rows)} pairs of {self.phase.out_dir}; delete it to compute them again")
            for row, chosen, rejected in zip(self.rows, logps["chosen"], logps["rejected"]):
                row["reference_chosen_logps"], row["reference_rejected_logps"] = chosen, rejected
            return
        if self.trainer.ckpt_path is not None:
            raise RuntimeError(f"{self.phase.out_dir} has a training checkpoint but no {saved.name}/: delete its checkpoints/ to train it again")
        self._compute_reference_logps(policy)
        save_dataset([{"chosen": row["reference_chosen_logps"], "rejected": row["reference_rejected_logps"]} for row in self.rows], saved)
        barrier()

    def _compute_reference_logps(self, policy) -> None:
        # On one CPU process, whole batches go to row streams (streams.py), each batch on one core.
        # (Bigger batches than training's measured slower on CPU.)
        streams = usable_streams(self.trainer.lightning_module.cpu_streams, self.trainer)
        logps = score_pairs(policy, self.rows, self.phase.batch_size, self.trainer.lightning_module.tokenizer.pad_token_id, streams)
        for row, (chosen, rejected) in zip(self.rows, logps.tolist()):
            row["reference_chosen_logps"], row["reference_rejected_logps"] = chosen, rejected

    # A checkpoint holds how far into the epoch training got, and a resumed run skips that far.
    # These datamodule hooks, not the loader's own state (which Lightning restores only when it
    # builds the loader after the checkpoint, never the case here: configure_optimizers asks for
    # estimated_stepping_batches first), are what Lightning saves and restores every time.
    def state_dict(self) -> dict:
        return {"batches_served": self.position.served}

    def load_state_dict(self, state: dict) -> None:
        self.position.skip = state["batches_served"]

    # ---- evaluation ---------------------------------------------------------------------------

    def test_dataloader(self) -> list[DataLoader]:
        """Greedy batches, then (with eval.maj_k) the maj@k vote's batches, of the test questions."""
        tokenizer = self.trainer.lightning_module.tokenizer
        questions, size = self.test_questions, self.eval.batch_size
        loaders = [eval_loader(eval_batches(self.task, tokenizer, questions, "greedy", 1, 0.0, size, self.vote_seed))]
        if self.eval.maj_k:
            loaders.append(eval_loader(eval_batches(self.task, tokenizer, questions, "vote", self.eval.maj_k, self.eval.maj_temperature, size, self.vote_seed)))
        return loaders

    def val_dataloader(self) -> DataLoader:
        """Greedy batches of the held-out training questions, for checkpoint selection (data.eval.selection_questions)."""
        tokenizer = self.trainer.lightning_module.tokenizer
        return eval_loader(eval_batches(self.task, tokenizer, self.selection_questions, "greedy", 1, 0.0, self.eval.batch_size, self.vote_seed))

    def score_eval_batch(self, policy, tokenizer, batch: EvalBatch) -> tuple[torch.Tensor, list[str]]:
        """Generate the batch's completions; per question whether it is right, and the first completion of each."""
        _, world = rank_and_world()
        completions = generate_batch(
            policy, tokenizer, batch.prompt_ids, batch.indices, batch.num_samples, batch.temperature,
            self.sampling.max_new_tokens, batch.seed, self.sampling.cache, synced=world > 1, compile_decoding=self.sampling.compile,
        )
        return torch.tensor(scores(self.task, batch, completions), dtype=torch.float64), [samples[0] for samples in completions]


def _device_of(model) -> str:
    return str(next(model.parameters()).device)


def _usable(task, tokenizer, examples: list[dict], split: str, max_length: int) -> list[dict]:
    """The questions whose prompt leaves room for an answer; the rest are dropped and counted, never truncated."""
    if not examples:
        raise ValueError(f"task {task.name}: the {split} split is empty")
    kept = [e for e in examples if len(encode_prompt(tokenizer, format_prompt(tokenizer, task.prompt(e)))) < max_length]
    if len(kept) < len(examples) and is_main_process():
        print(f"irpo_pl: dropped {len(examples) - len(kept)} of {len(examples)} {split} questions whose prompt is over pairs.max_length={max_length} tokens")
    if not kept:
        raise ValueError(f"task {task.name}: every {split} prompt is longer than pairs.max_length={max_length}")
    return kept


def _warn_if_gold_is_cut(task, tokenizer, examples: list[dict], max_new_tokens: int) -> None:
    """Say so when gold solutions are longer than a sample may be: answers that long are cut before their end."""
    solutions = [solution for solution in map(task.gold_solution, examples) if solution is not None]
    if not solutions:
        return
    lengths = [len(ids) for ids in tokenizer(solutions, add_special_tokens=False)["input_ids"]]
    cut = sum(length > max_new_tokens for length in lengths)
    if cut:
        print(
            f"irpo_pl: {cut} of {len(solutions)} gold solutions of task {task.name} are longer than sampling.max_new_tokens="
            f"{max_new_tokens} tokens (the longest has {max(lengths)}); samples and greedy answers that long are cut before "
            "their answer, so raise sampling.max_new_tokens"
        )


def _why_empty(stats: PhaseStats, answer_only: bool) -> str:
    accuracy = "" if stats.sample_accuracy is None else f" (sample accuracy {stats.sample_accuracy:.1%})"
    # Answer-only questions have no gold chain to add to the winners.
    gold = (
        "a longer warm start on the seed set (data.task.gold_chains)" if answer_only else "pairs.gold_in_winners"
    )
    return (
        f"Of {stats.questions} questions{accuracy}, {stats.dropped_all_correct} had every sample right and "
        f"{stats.dropped_all_wrong} every sample wrong, so none has both a winner and a loser; "
        f"{stats.dropped_too_long} rows were longer than pairs.max_length. Harder or easier questions, "
        f"more samples (sampling.num_samples), another temperature, or {gold} may help."
    )


def _read_samples(path: Path, num_questions: int, num_samples: int) -> tuple[list[list[str]], list[list[float]]]:
    rows = datasets.load_from_disk(str(path))
    if len(rows) != num_questions * num_samples:
        raise ValueError(f"{path} holds {len(rows)} samples, not {num_questions} questions x {num_samples}; delete it to sample again")
    samples: list[list[str]] = [[] for _ in range(num_questions)]
    rewards: list[list[float]] = [[] for _ in range(num_questions)]
    for row in rows:
        samples[row["question_index"]].append(row["completion"])
        rewards[row["question_index"]].append(row["reward"])
    return samples, rewards


def _row_length(row: dict) -> int:
    """Tokens in the row's packed form (PairPacker or SFTCollator)."""
    return len(row["prompt_ids"]) + sum(len(row.get(key, ())) for key in ("chosen_ids", "rejected_ids", "completion_ids"))


def save_dataset(rows: list[dict], path: Path) -> None:
    """Write a `datasets` dataset beside its place, then move it in, so a reader never sees half of one (main process only)."""
    if not is_main_process():
        return
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    datasets.Dataset.from_list(rows).save_to_disk(str(partial))
    replace_dir(partial, path)



@dataclass
class BatchPosition:
    """How many batches of the epoch a loader has handed out, and how many its next pass skips."""

    served: int = 0
    skip: int = 0


class ResumableDataLoader(DataLoader):
    """A DataLoader that a run resumed mid-epoch continues where the checkpoint left it.

    It counts the batches it hands out in `position`, which the datamodule saves in checkpoints; on
    resume its next pass skips that many. A plain DataLoader starts the epoch over, and the resumed
    run trained on other batches than an uninterrupted one. Its length stays that of the whole epoch,
    so the learning-rate schedule is the same too. `position` is a constructor argument so that it
    survives Lightning rebuilding the loader with a distributed sampler.
    """

    def __init__(self, *args, position: BatchPosition, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.position = position

    def __iter__(self):
        # A generator: none of this runs before the first batch is asked for, after any checkpoint is restored.
        skip, self.position.skip = self.position.skip, 0
        batches = super().__iter__()
        for _ in range(skip):
            next(batches, None)
        self.position.served = skip
        for batch in batches:
            self.position.served += 1
            yield batch

    # Lightning's own resumable-loader protocol, so that it does not warn that this loader cannot resume.
    def state_dict(self) -> dict:
        return {"batches_served": self.position.served}

    def load_state_dict(self, state: dict) -> None:
        self.position.skip = state["batches_served"]
