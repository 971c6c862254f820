"""Turning text rows into training batches: tokenization and collation with completion-only masks."""

from __future__ import annotations

import torch

from irpo_pl.models import encode_completion, encode_prompt, format_prompt


def tokenize_preference(tokenizer, rows: list[dict], max_length: int) -> tuple[list[dict], int]:
    """Token ids of (prompt, chosen, rejected) rows; rows whose longer side exceeds max_length are dropped.

    Returns the kept rows and how many were dropped.
    """
    kept, dropped = [], 0
    for row in rows:
        prompt = encode_prompt(tokenizer, format_prompt(tokenizer, row["prompt"]))
        chosen = encode_completion(tokenizer, row["chosen"])
        rejected = encode_completion(tokenizer, row["rejected"])
        if len(prompt) + max(len(chosen), len(rejected)) > max_length:
            dropped += 1
            continue
        kept.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return kept, dropped


def tokenize_sft(tokenizer, rows: list[dict], max_length: int) -> tuple[list[dict], int]:
    """Token ids of (prompt, completion) rows; too-long rows are dropped and counted."""
    kept, dropped = [], 0
    for row in rows:
        prompt = encode_prompt(tokenizer, format_prompt(tokenizer, row["prompt"]))
        completion = encode_completion(tokenizer, row["completion"])
        if len(prompt) + len(completion) > max_length:
            dropped += 1
            continue
        kept.append({"prompt_ids": prompt, "completion_ids": completion})
    return kept, dropped


def pad_sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion rows, padded only to the longest row of the batch."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    completion_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        length = len(prompt) + len(completion)
        input_ids[row, :length] = torch.tensor(prompt + completion)
        attention_mask[row, :length] = 1
        completion_mask[row, len(prompt) : length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


class PreferenceCollator:
    """Chosen rows first, then rejected rows, in one batch so one forward pass scores both."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [r["prompt_ids"] for r in rows] * 2
        completions = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        batch = pad_sequences(prompts, completions, self.pad_id)
        batch["chosen_lengths"] = torch.tensor([len(r["chosen_ids"]) for r in rows])
        if "reference_chosen_logps" in rows[0]:
            batch["reference_chosen_logps"] = torch.tensor([r["reference_chosen_logps"] for r in rows])
            batch["reference_rejected_logps"] = torch.tensor([r["reference_rejected_logps"] for r in rows])
        return batch


class SFTCollator:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_sequences([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], self.pad_id)
        batch["lengths"] = torch.tensor([len(r["completion_ids"]) for r in rows])
        return batch


def length_grouped_order(lengths: list[int], batch_size: int, seed: int, group_batches: int = 16) -> list[int]:
    """A shuffled order in which consecutive `batch_size` rows have similar lengths.

    Rows are shuffled, cut into groups of `group_batches` batches, sorted by length
    inside each group, and the resulting batches shuffled again: batches stay random
    while padding shrinks. The same seed gives the same order.
    """
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(lengths), generator=generator).tolist()
    group = batch_size * group_batches
    batches = []
    for start in range(0, len(shuffled), group):
        members = sorted(shuffled[start : start + group], key=lambda i: lengths[i])
        batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    return [index for b in torch.randperm(len(batches), generator=generator).tolist() for index in batches[b]]
