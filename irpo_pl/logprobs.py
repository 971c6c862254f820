"""Per-sequence log-probabilities of completion tokens, computed only where they are needed."""

from __future__ import annotations

import functools
import inspect

import torch

# Target segments: 0 is no target (prompt, padding, a branch's last token), then one id per completion.
CHOSEN, REJECTED = 1, 2


def sum_logps_by_segment(logits: torch.Tensor, target_ids: torch.Tensor, target_segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Per row and segment, the sum of log p(target) over the positions of that segment, shape [B, num_segments].

    `logits` [B, T, V] predict `target_ids` [B, T] at the same position (already shifted);
    `target_segments` [B, T] says which completion each target belongs to (1..num_segments)
    or 0 for none. Only those positions are normalised (logsumexp there), so the full
    [B, T, V] log-softmax is never materialised.
    """
    mask = target_segments > 0
    selected = logits[mask].float()
    token_logps = selected.gather(-1, target_ids[mask].unsqueeze(-1)).squeeze(-1) - selected.logsumexp(-1)
    rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1).expand_as(target_segments)[mask]
    slots = rows * num_segments + target_segments[mask] - 1
    totals = torch.zeros(logits.shape[0] * num_segments, device=logits.device, dtype=token_logps.dtype)
    return totals.index_add_(0, slots, token_logps).view(-1, num_segments)


def prefix_sharing_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """The boolean attention mask [B, 1, T, T] of packed (shared prompt, chosen branch, rejected branch) rows.

    A token sees the earlier tokens of its own branch and the shared prompt (segment 0),
    never the other branch. Padding (segment -1) sits at the end and sees itself, so no
    row of the mask is empty (an empty row would give NaN through the softmax).
    """
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same_branch = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    shared = (segment_ids == 0).unsqueeze(1)
    return (causal & (same_branch | shared)).unsqueeze(1)


def segment_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_segments: int) -> torch.Tensor:
    """Run `model` on a collated batch and return each row's summed log-prob per segment, [B, num_segments].

    A batch with `segment_ids` is prefix-shared (see data.PairPacker): its mask is built
    here and its positions come with it. Logits are computed only from the first
    position that has a target in any row (`logits_to_keep`), sparing the prompts.
    """
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "segment_ids" in batch:
        mask = prefix_sharing_mask(batch["segment_ids"])
        attention = getattr(model.config, "_attn_implementation", None) or "sdpa"
        if attention not in ("sdpa", "eager"):
            raise ValueError(f"prefix-shared pair batches need a custom attention mask, which {attention!r} attention cannot take; load the model with attn_implementation='sdpa'")
        if attention == "eager":
            # Eager attention adds its mask to the scores; SDPA takes the boolean mask as it is.
            mask = torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill_(~mask, torch.finfo(model.dtype).min)
        inputs.update(attention_mask=mask, position_ids=batch["position_ids"])
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    target_ids, target_segments = batch["target_ids"], batch["target_segments"]
    columns_with_targets = (target_segments > 0).any(0).nonzero()
    first = int(columns_with_targets[0]) if len(columns_with_targets) else 0
    if first and _takes_logits_to_keep(type(model)):
        inputs["logits_to_keep"] = target_ids.shape[1] - first
        target_ids, target_segments = target_ids[:, first:], target_segments[:, first:]
    logits = model(**inputs).logits
    return sum_logps_by_segment(logits, target_ids, target_segments, num_segments)


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    """Asked once per model class, not on every forward pass."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters
