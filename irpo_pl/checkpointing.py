"""Activation checkpointing of the decoder blocks: keep each block's input, recompute its inside in backward.

A training step normally keeps every intermediate activation of every block until
the backward pass (attention inputs, MLP hidden states, norms: roughly 20-35 x
tokens x hidden floats per block for a Llama). With checkpointing, a block keeps
only what it was called with; its backward first runs its forward again. Memory
for activations drops to about one block's worth plus one hidden state per block,
for roughly one extra forward pass of compute.

How it is done, and why:

- Per decoder block, the blocks being the modules whose class name is in
  `model._no_split_modules` (the same rule as `distributed.shard`, so the unit of
  recompute is the unit of sharding).
- The block's `forward` is replaced on the instance by one that calls the class's
  own forward through non-reentrant `torch.utils.checkpoint`. Module hooks run in
  `__call__`, outside `forward`, so FSDP2's hooks (all-gather before the block,
  reshard after it, and its backward hooks) stay outside the checkpoint and never
  run again in the recompute; during the recompute the block's parameters are the
  ones FSDP2's pre-backward hook gathered. Because `fully_shard` only changes the
  block's class (to a subclass, `FSDP<Block>`) and adds hooks, and leaves the
  instance's `forward` alone, `enable_activation_checkpointing` may be called
  before or after `distributed.shard`: the result is the same either way.
- It checkpoints only when grad is enabled and the block is in training mode:
  the reference pre-pass and evaluation (`torch.no_grad`, eval mode) and sampling
  (`generate` runs under no_grad/inference mode, with a KV cache) run the block
  as usual, at full speed. A KV cache inside a checkpointed call would be written
  twice (forward and recompute), so that is refused with a clear error.
- Non-reentrant checkpointing takes keyword arguments and tensors that do not
  require grad (the 4-D prefix-sharing mask, position ids, rotary embeddings,
  a frozen embedding's output under LoRA), so both pair layouts and adapters work
  without `enable_input_require_grads` hooks.
- The CPU (and CUDA) random state of the forward is restored for the recompute
  (`preserve_rng_state`), so dropout (LoRA's, attention's) draws the same masks
  twice and the gradients stay exact.

Why not Hugging Face's `gradient_checkpointing_enable`: in transformers 5.x it does
the same per block (wrapping `forward`, skipping no-grad passes), but the 4.56
minimum this project supports wraps `__call__` (FSDP2's hooks would run again in
the recompute) and checkpoints no-grad passes of a model in training mode; it also
adds an input-grad hook to the embeddings. The instance wrapper here behaves the
same on every version and on models whose blocks are not HF's
`GradientCheckpointingLayer`. The two must not be combined (a block would be
checkpointed twice); `enable_activation_checkpointing` refuses a model that has
HF's switched on.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint

# Keyword arguments through which decoder blocks of different architectures receive a KV cache.
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated decoder blocks: modules whose class name is in `model._no_split_modules`.

    Works through wrappers that forward attribute access to the wrapped model (a peft
    `PeftModel` does). Raises ValueError when there are none, naming the model.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if _original_class(m).__name__ in names]
    if not blocks:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__} (no _no_split_modules naming its block class)")
    return blocks


def _original_class(module: nn.Module) -> type:
    """The module's class before `fully_shard`, which swaps it for a subclass FSDP<Class> (FSDPModule first)."""
    mro = type(module).__mro__
    return mro[mro.index(FSDPModule) + 1] if isinstance(module, FSDPModule) else mro[0]


def enable_activation_checkpointing(model: nn.Module, preserve_rng_state: bool = True) -> int:
    """Checkpoint every decoder block of `model` in its training forward; returns how many blocks.

    Active only while grad is enabled and the block is in training mode, so no-grad
    passes (reference log-probs, sampling, evaluation) are unaffected. Call it once
    after loading the model, before or after `distributed.shard` and before or after
    `adapters.add_lora`; calling it again changes nothing. The wrapper lives on the
    block instances: `state_dict`, `save_pretrained` and parameter names are
    unchanged, and `copy.deepcopy` of the model (a frozen reference copy) copies it
    bound to the copy's blocks.
    """
    # transformers 5 renamed the flag (the old name warns); 4.x has only the old one.
    hf_on = getattr(model, "is_activation_checkpointing", None)
    if hf_on is None:
        hf_on = getattr(model, "is_gradient_checkpointing", False)
    if hf_on:
        raise ValueError(
            f"{type(model).__name__} already has Hugging Face gradient checkpointing on; "
            "call model.gradient_checkpointing_disable() first, or use that instead of this"
        )
    blocks = decoder_blocks(model)
    for block in blocks:
        # A bound method (not a closure): deepcopy rebinds it to the copied block.
        block.forward = types.MethodType(_checkpointed_forward, block)
        block._irpo_preserve_rng_state = preserve_rng_state
    return len(blocks)


def is_activation_checkpointing_enabled(model: nn.Module) -> bool:
    """Whether `enable_activation_checkpointing` has wrapped this model's blocks."""
    return any(getattr(block.forward, "__func__", None) is _checkpointed_forward for block in decoder_blocks(model))


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    forward = type(self).forward
    if not (self.training and torch.is_grad_enabled()):
        return forward(self, *args, **kwargs)
    cached = [name for name in _CACHE_ARGUMENTS if kwargs.get(name) is not None]
    if cached:
        raise ValueError(
            f"{type(self).__name__} got a KV cache ({cached[0]}=...) in a checkpointed training forward, where the "
            "recompute would write it twice; call the model with use_cache=False when training"
        )
    return checkpoint(forward, self, *args, use_reentrant=False, preserve_rng_state=self._irpo_preserve_rng_state, **kwargs)
