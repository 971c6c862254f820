"""One phase's training data: sample from the current policy, score, pair, tokenize.

`IRPODataModule.setup` runs when the phase's Trainer starts, with the policy as it
is then: M_t. It samples N completions per question, scores them with the task,
builds the rows the method trains on, saves samples and rows in the phase's
folder as `datasets` datasets, and (reference mode "precomputed") adds M_t's
log-probs of every pair, so the frozen reference never has to sit in memory.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader

from irpo_pl.config import PairConfig, SamplingConfig
from irpo_pl.data import PairPacker, SFTCollator, length_grouped_order, tokenize_preference, tokenize_sft
from irpo_pl.distributed import is_main_process
from irpo_pl.logprobs import segment_logps
from irpo_pl.models import format_prompt
from irpo_pl.pairing import build_pairs
from irpo_pl.run_dir import replace_dir
from irpo_pl.sampling import generate_completions
from irpo_pl.sampling_vllm import generate_completions_vllm
from irpo_pl.streams import run_streams, usable_streams
from irpo_pl.tasks import Task


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
    seconds: dict = field(default_factory=dict)


class IRPODataModule(L.LightningDataModule):
    """Training rows for one phase of `method` (irpo/dpo: pairs; star: correct samples; sft: gold solutions)."""

    def __init__(
        self,
        task: Task,
        tokenizer,
        examples: list[dict],
        method: str,
        out_dir: Path,
        batch_size: int,
        sampling: SamplingConfig,
        pairs: PairConfig,
        temperature: float = 1.0,
        precompute_reference: bool = True,
        seed: int = 0,
        rows: list[dict] | None = None,
    ) -> None:
        """`rows`: tokenized rows to train on as they are, instead of sampling (fixed, offline pairs)."""
        super().__init__()
        self.task, self.tokenizer, self.examples, self.method = task, tokenizer, examples, method
        self.out_dir, self.batch_size, self.seed = Path(out_dir), batch_size, seed
        self.sampling, self.pairs, self.temperature = sampling, pairs, temperature
        self.precompute_reference = precompute_reference and method in ("irpo", "dpo")
        for index, row in enumerate(rows or []):
            for key in ("chosen_ids", "rejected_ids", "completion_ids"):
                if key in row and not row[key]:
                    # The packers feed a completion's tokens but its last as inputs: an empty one has no target.
                    raise ValueError(f"rows[{index}]: {key} is empty; a completion has at least its EOS token")
        self.rows = rows
        self.stats = PhaseStats(questions=len(examples))
        self.position = BatchPosition()  # how far into the epoch training is, for checkpoints

    def setup(self, stage: str) -> None:
        policy = self.trainer.lightning_module.policy
        if self.rows is None:
            self.rows = self._rows_for_method(policy)
        if self.precompute_reference and self.rows and "reference_chosen_logps" not in self.rows[0]:
            start = time.perf_counter()
            self._add_reference_logps(policy)
            self.stats.seconds["reference"] = time.perf_counter() - start
        self.stats.rows = len(self.rows)
        if not self.rows:
            raise RuntimeError(f"{self.out_dir.name}: nothing to train on. {_why_empty(self.stats)}")

    def _rows_for_method(self, policy) -> list[dict]:
        """Sample, score and pair (or take the gold solutions), save the text rows, return them tokenized."""
        prompts = [self.task.prompt(example) for example in self.examples]
        if self.method == "sft":
            text_rows = [{"prompt": p, "completion": self.task.gold_solution(e)} for p, e in zip(prompts, self.examples)]
        else:
            samples, rewards = self._sample_and_score(policy, prompts)
            text_rows = self._rows_from_samples(prompts, samples, rewards)
        _save_dataset(text_rows, self.out_dir / ("pairs" if self.method in ("irpo", "dpo") else "sft_rows"))
        tokenize = tokenize_preference if self.method in ("irpo", "dpo") else tokenize_sft
        rows, self.stats.dropped_too_long = tokenize(self.tokenizer, text_rows, self.pairs.max_length)
        return rows

    def _sample_and_score(self, policy, prompts: list[str]) -> tuple[list[list[str]], list[list[float]]]:
        """The phase's scored samples: drawn now, or read back if an earlier attempt finished drawing them."""
        start = time.perf_counter()
        saved = self.out_dir / "samples"
        if saved.exists():
            samples, rewards = _read_samples(saved, len(prompts), self.sampling.num_samples)
            if is_main_process():
                print(f"irpo_pl: reusing the {len(prompts) * self.sampling.num_samples} samples in {saved}")
        else:
            formatted = [format_prompt(self.tokenizer, p) for p in prompts]
            if self.sampling.backend == "vllm":
                # Every prompt is under pairs.max_length tokens (the loop drops longer ones).
                engine_args = {"max_model_len": self.pairs.max_length + self.sampling.max_new_tokens, **self.sampling.vllm_args}
                draw = partial(generate_completions_vllm, engine_args=engine_args)
            else:
                draw = generate_completions
            samples = draw(
                policy, self.tokenizer, formatted, self.sampling.num_samples, self.temperature,
                self.sampling.max_new_tokens, self.sampling.batch_size, seed=self.seed, cache=self.sampling.cache,
            )
            rewards = [[self.task.reward(c, e) for c in completions] for completions, e in zip(samples, self.examples)]
            _save_dataset(
                [
                    {"question_index": i, "prompt": prompts[i], "completion": c, "reward": r}
                    for i, (completions, scores) in enumerate(zip(samples, rewards))
                    for c, r in zip(completions, scores)
                ],
                saved,
            )
        flat = [r for row in rewards for r in row]
        self.stats.samples, self.stats.sample_accuracy = len(flat), sum(flat) / len(flat)
        self.stats.seconds["sampling"] = time.perf_counter() - start
        return samples, rewards

    def _rows_from_samples(self, prompts, samples, rewards) -> list[dict]:
        if self.method == "star":
            # STaR trains on the model's own correct samples, one row per distinct one.
            rows = []
            for prompt, completions, scores in zip(prompts, samples, rewards):
                winners = dict.fromkeys(c for c, r in zip(completions, scores) if r > 0)
                rows.extend({"prompt": prompt, "completion": c} for c in winners)
                self.stats.dropped_all_wrong += not winners
            return rows
        gold = [self.task.gold_solution(e) for e in self.examples] if self.pairs.gold_in_winners else None
        pairs, pair_stats = build_pairs(prompts, samples, rewards, self.pairs.pairs_per_question, gold)
        self.stats.dropped_all_correct = pair_stats.dropped_all_correct
        self.stats.dropped_all_wrong = pair_stats.dropped_all_wrong
        return pairs

    @torch.no_grad()  # not inference_mode: FSDP2 reuses the buffers it gathers here in training
    def _add_reference_logps(self, policy) -> None:
        was_training = policy.training
        policy.eval()
        device = next(policy.parameters()).device
        collate = PairPacker(self.tokenizer.pad_token_id)
        # Batches of similar lengths pad least. (Bigger batches than training's measured slower on CPU.)
        order = sorted(range(len(self.rows)), key=lambda i: _row_length(self.rows[i]))
        chunks = [[self.rows[i] for i in order[start : start + self.batch_size]] for start in range(0, len(order), self.batch_size)]

        def logps(chunk: list[dict]) -> list[list[float]]:
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            return segment_logps(policy, batch, num_segments=2).tolist()

        # On one CPU process, whole batches go to row streams (streams.py), each batch on one core.
        streams = usable_streams(self.trainer.lightning_module.cpu_streams, self.trainer)
        results = run_streams(logps, chunks, streams) if streams > 1 else map(logps, chunks)
        for chunk, chunk_logps in zip(chunks, results):
            for row, (chosen, rejected) in zip(chunk, chunk_logps):
                row["reference_chosen_logps"], row["reference_rejected_logps"] = chosen, rejected
        policy.train(was_training)

    def train_dataloader(self) -> DataLoader:
        collate = PairPacker if self.method in ("irpo", "dpo") else SFTCollator
        # The order is fixed here, not by a shuffling sampler, so that batches are length-grouped
        # and a distributed sampler's interleaved shares stay length-grouped too.
        order = length_grouped_order([_row_length(row) for row in self.rows], self.batch_size, self.seed)
        return ResumableDataLoader(
            [self.rows[i] for i in order], batch_size=self.batch_size, shuffle=False, collate_fn=collate(self.tokenizer.pad_token_id),
            position=self.position,
        )

    # A checkpoint holds how far into the epoch training got, and a resumed run skips that far.
    # These datamodule hooks, not the loader's own state (which Lightning restores only when it
    # builds the loader after the checkpoint, never the case here: configure_optimizers asks for
    # estimated_stepping_batches first), are what Lightning saves and restores every time.
    def state_dict(self) -> dict:
        return {"batches_served": self.position.served}

    def load_state_dict(self, state: dict) -> None:
        self.position.skip = state["batches_served"]


def _why_empty(stats: PhaseStats) -> str:
    accuracy = "" if stats.sample_accuracy is None else f" (sample accuracy {stats.sample_accuracy:.1%})"
    return (
        f"Of {stats.questions} questions{accuracy}, {stats.dropped_all_correct} had every sample right and "
        f"{stats.dropped_all_wrong} every sample wrong, so none has both a winner and a loser; "
        f"{stats.dropped_too_long} rows were longer than pairs.max_length. Harder or easier questions, "
        "more samples (sampling.num_samples), another temperature, or pairs.gold_in_winners may help."
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


def _save_dataset(rows: list[dict], path: Path) -> None:
    """Write a `datasets` dataset beside its place, then move it in, so a reader never sees half of one."""
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
