"""Per-sequence log-probabilities of completion tokens, computed only where they are needed.

Two batch layouts hold preference pairs (irpo_pl.data makes them; irpo_pl.layouts
chooses one per model):

- prefix-shared rows (`data.PairPacker`): one row per pair, the prompt once and both
  completions after it, with `segment_ids` that become a custom attention mask here;
- separate rows (`data.SeparatePairCollator`): tensors of shape [B, 2, T], chosen and
  rejected each after its own copy of the prompt, right-padded, with a 2-D mask.

`segment_logps` scores either; `score_pairs` scores tokenized rows the way the
training step does, for the layout decided for that model.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch

# Target segments: 0 is no target (prompt, padding, a branch's last token), then one id per completion.
CHOSEN, REJECTED = 1, 2
# Attention implementations that take a custom 4-D mask (flex_attention as a BlockMask).
CUSTOM_MASK_ATTENTION = ("sdpa", "eager", "flex_attention")


def token_logps(logits: torch.Tensor, target_ids: torch.Tensor, target_segments: torch.Tensor) -> torch.Tensor:
    """log p(target) at every position whose segment is > 0, in row-major order, shape [N].

    `logits` [B, T, V] predict `target_ids` [B, T] at the same position (already shifted).
    Only those positions are normalised (logsumexp there), so the full [B, T, V]
    log-softmax is never materialised.
    """
    mask = target_segments > 0
    selected = logits[mask].float()
    return selected.gather(-1, target_ids[mask].unsqueeze(-1)).squeeze(-1) - selected.logsumexp(-1)


def sum_logps_by_segment(logits: torch.Tensor, target_ids: torch.Tensor, target_segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Per row and segment, the sum of log p(target) over the positions of that segment, shape [B, num_segments].

    `target_segments` [B, T] says which completion each target belongs to (1..num_segments)
    or 0 for none.
    """
    mask = target_segments > 0
    rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1).expand_as(target_segments)[mask]
    slots = rows * num_segments + target_segments[mask] - 1
    values = token_logps(logits, target_ids, target_segments)
    totals = torch.zeros(logits.shape[0] * num_segments, device=logits.device, dtype=values.dtype)
    return totals.index_add_(0, slots, values).view(-1, num_segments)


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


def prefix_sharing_block_mask(segment_ids: torch.Tensor):
    """`prefix_sharing_mask` as a flex-attention BlockMask, for models run with attn_implementation="flex_attention".

    Transformers hands a 4-D BlockMask to every layer unchanged, as it does a 4-D tensor,
    and its flex kernel then skips the blocks where a branch meets the other one.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(batch, head, query, key):
        same_branch = segment_ids[batch, query] == segment_ids[batch, key]
        return (key <= query) & (same_branch | (segment_ids[batch, key] == 0))

    rows, length = segment_ids.shape
    return create_block_mask(mask_mod, rows, None, length, length, device=segment_ids.device)


def _shared_prefix_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict:
    """The mask in the form the model's attention implementation takes, and the branches' restarted positions."""
    attention = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if attention not in CUSTOM_MASK_ATTENTION:
        raise ValueError(
            f"prefix-shared pair batches need a custom attention mask, which {attention!r} attention cannot take; "
            "use the separate pair layout (train.pair_layout: separate) or load the model with attn_implementation='sdpa'"
        )
    if attention == "flex_attention":
        mask = prefix_sharing_block_mask(batch["segment_ids"])
    else:
        mask = prefix_sharing_mask(batch["segment_ids"])
        if attention == "eager":
            # Eager attention adds its mask to the scores; SDPA takes the boolean mask as it is.
            mask = torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill_(~mask, torch.finfo(model.dtype).min)
    return {"attention_mask": mask, "position_ids": batch["position_ids"]}


def _logits_and_targets(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass over a 2-D batch; logits only from the first column that has a target in any row (`logits_to_keep`)."""
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "segment_ids" in batch:
        inputs.update(_shared_prefix_inputs(model, batch))
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    target_ids, target_segments = batch["target_ids"], batch["target_segments"]
    columns_with_targets = (target_segments > 0).any(0).nonzero()
    first = int(columns_with_targets[0]) if len(columns_with_targets) else 0
    if first and _takes_logits_to_keep(type(model)):
        inputs["logits_to_keep"] = target_ids.shape[1] - first
        target_ids, target_segments = target_ids[:, first:], target_segments[:, first:]
    return model(**inputs).logits, target_ids, target_segments


def _flatten_pairs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A separate-rows batch [B, 2, T] as the [2B, T] rows the model runs: pair b's chosen at 2b, its rejected at 2b + 1."""
    return {key: batch[key].flatten(0, 1) for key in ("input_ids", "attention_mask", "target_ids", "target_segments")}


def segment_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_segments: int) -> torch.Tensor:
    """Run `model` on a collated batch and return each row's summed log-prob per segment, [B, num_segments].

    A batch with `segment_ids` is prefix-shared (data.PairPacker): its mask is built here
    and its positions come with it. A batch whose `input_ids` are [B, 2, T] holds
    separate rows (data.SeparatePairCollator): its B pairs run as 2B padded rows and
    each pair's two rows are added up. Any other batch is plain rows with a 2-D mask
    (data.SFTCollator). Either way row b of the result is pair (or row) b of the batch.
    """
    if batch["input_ids"].dim() == 3:
        pairs = batch["input_ids"].shape[0]
        per_row = sum_logps_by_segment(*_logits_and_targets(model, _flatten_pairs(batch)), num_segments)
        # Each row has targets of one segment only, so adding the two rows of a pair loses nothing.
        return per_row.view(pairs, 2, num_segments).sum(1)
    return sum_logps_by_segment(*_logits_and_targets(model, batch), num_segments)


def pair_token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per pair of a pair batch (either layout), the per-token log-probs of its chosen and rejected completions.

    What `segment_logps` adds up, token by token: irpo_pl.layouts compares layouts with it.
    """
    flat = _flatten_pairs(batch) if batch["input_ids"].dim() == 3 else batch
    logits, target_ids, target_segments = _logits_and_targets(model, flat)
    values = token_logps(logits, target_ids, target_segments)
    mask = target_segments > 0
    rows = torch.arange(len(target_segments), device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    pairs = rows // 2 if batch["input_ids"].dim() == 3 else rows
    segments = target_segments[mask]
    count = batch["input_ids"].shape[0]
    return [tuple(values[(pairs == p) & (segments == s)] for s in (CHOSEN, REJECTED)) for p in range(count)]


def plain_token_logps(model: torch.nn.Module, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> torch.Tensor:
    """log p of each completion token after the prompt, from one forward pass of prompt + completion alone (no padding, no mask)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1 : -1].float()
    targets = torch.tensor(list(completion_ids), device=device)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def score_pairs(model: torch.nn.Module, rows: Sequence[dict], batch_size: int, pad_id: int | None = None, streams: int = 1) -> torch.Tensor:
    """Summed completion log-probs (chosen, rejected) of each tokenized pair, shape [P, 2], in the rows' order.

    Computed exactly as the training step computes them for this model: the batches are
    those of the model's pair layout (irpo_pl.layouts.pair_layout_of, decided with its
    defaults if nobody decided before) and go through `segment_logps`. Rows are
    `{"prompt_ids", "chosen_ids", "rejected_ids"}` as data.tokenize_preference makes
    them; they run in batches of `batch_size` rows of similar lengths, without
    gradients, with the model in eval mode (its mode is restored) on its device.
    `pad_id` (default: the config's pad token, else 0) never reaches a scored position.
    `streams` > 1 runs whole batches at once in row streams (irpo_pl.streams), on a CPU.
    A row too long for the model to score exactly raises (never truncated): drop such
    rows first with `PairLayout.fits`.
    """
    # Imported here: irpo_pl.layouts measures layouts with this module's functions.
    from irpo_pl.layouts import pair_layout_of
    from irpo_pl.streams import run_streams

    layout = pair_layout_of(model)
    for index, row in enumerate(rows):
        if not layout.fits(row):
            raise ValueError(f"rows[{index}] is longer than {type(model).__name__} scores exactly: {layout.limit_reason}; drop it first (PairLayout.fits)")
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None) or 0
    collate = layout.collator(pad_id)
    device = next(model.parameters()).device
    # Batches of similar lengths pad least.
    order = sorted(range(len(rows)), key=lambda i: layout.row_tokens(rows[i]))
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    def score(chunk: list[int]) -> torch.Tensor:
        batch = {key: value.to(device) for key, value in collate([rows[i] for i in chunk]).items()}
        return segment_logps(model, batch, num_segments=2).cpu()

    scores = torch.zeros(len(rows), 2)
    was_training = model.training
    model.eval()
    try:
        # not inference_mode: FSDP2 reuses the buffers it gathers here in training
        with torch.no_grad():
            results = run_streams(score, chunks, streams) if streams > 1 else map(score, chunks)
            for chunk, result in zip(chunks, results):
                scores[chunk] = result.float()
    finally:
        model.train(was_training)
    return scores


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    """Asked once per model class, not on every forward pass."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters
