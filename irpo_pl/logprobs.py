"""Per-sequence log-probabilities of completion tokens."""

from __future__ import annotations

import torch


def gather_completion_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(token | previous tokens), counting only completion tokens.

    `logits` [B, T, V] from a causal LM over `input_ids` [B, T]; `completion_mask` [B, T]
    is 1 at completion tokens and 0 at prompt and padding tokens, wherever the padding
    sits. Only the masked positions are normalised (logsumexp there), so the full
    [B, T, V] log-softmax is never materialised.
    """
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].bool()
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(targets)[mask]
    selected = logits[:, :-1][mask].float()
    token_logps = selected.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1) - selected.logsumexp(-1)
    return torch.zeros(input_ids.shape[0], device=logits.device, dtype=token_logps.dtype).index_add_(0, rows, token_logps)


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Run `model` and return each row's summed completion log-prob, shape [B]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return gather_completion_logps(logits, input_ids, completion_mask)
