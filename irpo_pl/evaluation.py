"""Evaluation batches: test (or held-out) questions cut into generation batches that every process can share.

Lightning's test loop runs them (IRPOModule.test_step): greedy answers give the accuracy,
`maj_k` samples per question at `maj_temperature` give maj@k. The batches are the ones a
single process would generate, dealt round-robin to the processes, and a process with
fewer gets filler batches that keep it in step with the others (a sharded model needs
every process in every forward pass) and are not counted; so N processes count exactly
what one process counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch.utils.data import DataLoader, IterableDataset

from irpo_pl.distributed import rank_and_world
from irpo_pl.models import encode_prompt, format_prompt
from irpo_pl.sampling import partition, share_of_batches


@dataclass
class EvalBatch:
    """One generation batch of an evaluation: `num_samples` completions of each question at `temperature`."""

    kind: Literal["greedy", "vote"]
    indices: list[int]
    """The questions' positions in the evaluated split."""
    prompt_ids: list[list[int]]
    examples: list[dict]
    num_samples: int
    temperature: float
    seed: int
    filler: bool = False
    """Generated only to keep in step with the other processes; not counted."""


class EvalBatches(IterableDataset):
    """This process's share of a list of batches, with filler rounds; the rank is read when iteration starts."""

    def __init__(self, batches: list[EvalBatch]) -> None:
        self.batches = batches

    def __iter__(self):
        rank, world = rank_and_world()
        for batch in share_of_batches(self.batches, rank, world):
            yield batch if batch is not None else _filler(self.batches[0])


def eval_batches(
    task, tokenizer, examples: list[dict], kind: str, num_samples: int, temperature: float, batch_size: int, seed: int
) -> list[EvalBatch]:
    """The generation batches of `examples`, sorted by prompt length, `batch_size` sequences each."""
    prompt_ids = [encode_prompt(tokenizer, format_prompt(tokenizer, task.prompt(example))) for example in examples]
    return [
        EvalBatch(kind, indices, [prompt_ids[i] for i in indices], [examples[i] for i in indices], num_samples, temperature, seed)
        for indices in partition([len(ids) for ids in prompt_ids], num_samples, batch_size)
    ]


def eval_loader(batches: list[EvalBatch]) -> DataLoader:
    # batch_size None: each item already is a batch.
    return DataLoader(EvalBatches(batches), batch_size=None, collate_fn=_as_it_is)


def scores(task, batch: EvalBatch, completions: list[list[str]]) -> list[float]:
    """Per question: the greedy answer's reward, or whether the majority vote of its samples is right."""
    if batch.kind == "greedy":
        return [task.reward(samples[0], example) for samples, example in zip(completions, batch.examples)]
    return [float(task.vote_is_correct(samples, example)) for samples, example in zip(completions, batch.examples)]


def _filler(batch: EvalBatch) -> EvalBatch:
    return EvalBatch(**{**batch.__dict__, "filler": True})


def _as_it_is(batch):
    return batch
