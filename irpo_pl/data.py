"""Turning text rows into training batches: tokenization and collation with completion-only masks."""

from __future__ import annotations

import torch

from irpo_pl.logprobs import CHOSEN, REJECTED
from irpo_pl.models import encode_completion, encode_prompt, format_prompt


def cut_after_divergence(chosen: list[int], rejected: list[int], keep: int) -> list[int]:
    """`rejected` up to `keep` tokens past its common prefix with `chosen`."""
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    return rejected[: shared + keep]


def tokenize_preference(tokenizer, rows: list[dict], max_length: int, rejected_tokens_after_divergence: int | None = None) -> tuple[list[dict], int]:
    """Token ids of (prompt, chosen, rejected) rows; rows whose longer side exceeds max_length are dropped.

    With `rejected_tokens_after_divergence`, each rejected completion is cut that many tokens past where it
    leaves its chosen one (`cut_after_divergence`). Returns the kept rows and how many were dropped.
    """
    kept, dropped = [], 0
    for row in rows:
        prompt = encode_prompt(tokenizer, format_prompt(tokenizer, row["prompt"]))
        chosen = encode_completion(tokenizer, row["chosen"])
        rejected = encode_completion(tokenizer, row["rejected"])
        if rejected_tokens_after_divergence is not None:
            rejected = cut_after_divergence(chosen, rejected, rejected_tokens_after_divergence)
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


class PairPacker:
    """One row per pair: the prompt once, then the chosen branch, then the rejected branch.

    The prompt's last token opens each branch (at its own position), so each branch
    predicts its first completion token from the whole prompt while the prompt's
    other tokens are run once for both. A completion's last token (EOS) is only a
    target, never an input: nothing follows it. So a row is prompt + chosen +
    rejected - 1 tokens instead of 2 * prompt + chosen + rejected. `segment_ids`
    (0 shared, 1 chosen, 2 rejected, -1 padding) become the attention mask in
    logprobs.segment_logps; `position_ids` restart each branch where the prompt
    ends, so the model sees what it would see for prompt + completion alone.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) - 1 for r in rows)
        batch = {
            "input_ids": torch.full((len(rows), width), self.pad_id, dtype=torch.long),
            "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
            "segment_ids": torch.full((len(rows), width), -1, dtype=torch.long),
            "target_ids": torch.zeros((len(rows), width), dtype=torch.long),
            "target_segments": torch.zeros((len(rows), width), dtype=torch.long),
        }
        for index, row in enumerate(rows):
            prompt = row["prompt_ids"]
            ids, positions, segments = list(prompt[:-1]), list(range(len(prompt) - 1)), [0] * (len(prompt) - 1)
            targets, target_segments = [0] * len(ids), [0] * len(ids)
            for segment, completion in ((CHOSEN, row["chosen_ids"]), (REJECTED, row["rejected_ids"])):
                ids += [prompt[-1], *completion[:-1]]
                positions += range(len(prompt) - 1, len(prompt) - 1 + len(completion))
                segments += [segment] * len(completion)
                targets += completion
                target_segments += [segment] * len(completion)
            for key, values in zip(batch, (ids, positions, segments, targets, target_segments)):
                batch[key][index, : len(values)] = torch.tensor(values)
        return {**batch, **pair_fields(rows)}


class SeparatePairCollator:
    """Two rows per pair, each the prompt then one completion: tensors of shape [B, 2, T].

    [b, 0] is pair b's prompt + chosen, [b, 1] its prompt + rejected, right-padded to
    the batch's longest with a 0/1 `attention_mask`, so the model sees exactly what it
    sees for prompt + completion alone, whatever its attention, positions or layers.
    Pairs stay whole along dim 0, so streams.split_rows splits a batch into pairs;
    logprobs.segment_logps runs the rows as [2B, T]. As in PairPacker, a completion's
    last token is a target, never an input, and targets are labelled CHOSEN or REJECTED.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) - 1 for r in rows)
        shape = (len(rows), 2, width)
        batch = {
            "input_ids": torch.full(shape, self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros(shape, dtype=torch.long),
            "target_ids": torch.zeros(shape, dtype=torch.long),
            "target_segments": torch.zeros(shape, dtype=torch.long),
        }
        for index, row in enumerate(rows):
            prompt = row["prompt_ids"]
            for side, (segment, completion) in enumerate(((CHOSEN, row["chosen_ids"]), (REJECTED, row["rejected_ids"]))):
                length = len(prompt) + len(completion) - 1
                batch["input_ids"][index, side, :length] = torch.tensor(prompt + completion[:-1])
                batch["attention_mask"][index, side, :length] = 1
                batch["target_ids"][index, side, len(prompt) - 1 : length] = torch.tensor(completion)
                batch["target_segments"][index, side, len(prompt) - 1 : length] = segment
        return {**batch, **pair_fields(rows)}


def pair_fields(rows: list[dict]) -> dict[str, torch.Tensor]:
    """What every pair batch carries beside its tokens: completion lengths, and reference log-probs where the rows have them."""
    fields = {
        "chosen_lengths": torch.tensor([len(r["chosen_ids"]) for r in rows]),
        "rejected_lengths": torch.tensor([len(r["rejected_ids"]) for r in rows]),
    }
    if "reference_chosen_logps" in rows[0]:
        fields["reference_logps"] = reference_logps(rows)
    return fields


class FullPrecision:
    """Per-row values that keep float64 through Lightning's precision plugins.

    Those cast every floating tensor of a batch to the training precision: under bf16-true a
    reference log-prob of -300 would be rounded by up to 1 nat, and the DPO margin with it.
    A batch holds this object instead of the tensor; Lightning moves it to the device (`to`)
    without casting it, and the row streams slice it like a tensor.
    """

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values

    def to(self, device, *args, **kwargs) -> FullPrecision:
        return FullPrecision(self.values.to(device, non_blocking=kwargs.get("non_blocking", False)))

    def __getitem__(self, index) -> FullPrecision:
        return FullPrecision(self.values[index])

    def __len__(self) -> int:
        return len(self.values)


def reference_logps(rows: list[dict]) -> FullPrecision:
    """The rows' precomputed reference log-probs, [B, 2] (chosen, rejected), in float64."""
    return FullPrecision(torch.tensor([[r["reference_chosen_logps"], r["reference_rejected_logps"]] for r in rows], dtype=torch.float64))


class SFTCollator:
    """Right-padded prompt + completion rows, padded only to the batch's longest, with completion-only targets.

    As in PairPacker, the completion's last token is a target but not an input.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["prompt_ids"]) + len(r["completion_ids"]) - 1 for r in rows)
        batch = {
            "input_ids": torch.full((len(rows), width), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
            "target_ids": torch.zeros((len(rows), width), dtype=torch.long),
            "target_segments": torch.zeros((len(rows), width), dtype=torch.long),
        }
        for index, row in enumerate(rows):
            prompt, completion = row["prompt_ids"], row["completion_ids"]
            length = len(prompt) + len(completion) - 1
            batch["input_ids"][index, :length] = torch.tensor(prompt + completion[:-1])
            batch["attention_mask"][index, :length] = 1
            # The token at position i predicts the one at i + 1: the last prompt token predicts the first completion token.
            batch["target_ids"][index, len(prompt) - 1 : length] = torch.tensor(completion)
            batch["target_segments"][index, len(prompt) - 1 : length] = 1
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
