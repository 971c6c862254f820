"""LoRA adapters through peft (`pip install 'irpo_pl[lora]'`): train a low-rank update, save merged models.

The adapter is injected into the transformers model itself (`peft.inject_adapter_in_model`),
with no `PeftModel` wrapper around it: the policy stays e.g. a `LlamaForCausalLM`, so
`generate`, `_no_split_modules` (and so `distributed.shard` and checkpointing), `config`,
`logits_to_keep` in `logprobs.segment_logps` and Lightning's checkpoints work unchanged.
Each targeted `nn.Linear` named `<name>` becomes a peft `lora.Linear` holding
`<name>.base_layer` (the frozen original) and `<name>.lora_A.default` / `lora_B.default`;
its output is base(x) + (alpha / r) * B(A(dropout(x))). Only A and B train.

Iterations: merge, then a fresh adapter. At the end of each iteration's training,
`merge_adapter_and_restart` folds the adapter into the base weights,
W <- W + (alpha / r) B A, and restarts it: A drawn anew from a seed, B = 0. The
model's function is then M_{t+1} exactly (a zero B adds exactly nothing), which is
what the next iteration samples from, precomputes its reference log-probs with, and
starts training from: M_{t+1} starts from M_t and the reference is M_t, as without
LoRA. Why this rather than one adapter trained across all iterations:

- Every saved model (`merged_state_dict`) is the in-memory model exactly, and it is
  all that a resumed run needs: reload it, `add_lora` with the same seed, and the run
  goes on as if never stopped. One adapter across iterations would instead have to be
  saved and reloaded with the original base weights as well.
- Each iteration gets a rank-r update of its own, so the total change over a run is
  not capped at rank r (the iterations' updates add up).
- Because the reference log-probs are precomputed from M_t before training, a fresh
  adapter costs nothing there; with a frozen reference copy (`train.reference: model`)
  a copy taken after the restart is M_t as well.

Under FSDP2, the fold works on the shards in place: each rank computes the (small
rank, weight-sized) update of one layer at a time from the gathered A and B and adds
its own rows, so no full state dict is gathered for it. Saving gathers one
(`distributed.full_state_dict`) and `merged_state_dict` turns it into the plain
architecture's weights on rank 0.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

ADAPTER = "default"  # peft's name for the one adapter we use
INSTALL_HINT = "pip install 'irpo_pl[lora]'"


@dataclass
class LoraSettings:
    """The adapter's shape (`model.lora` in a config); its update to a weight W [out, in] is (alpha / r) B A."""

    r: int = 16
    """Rank: A is [r, in], B is [out, r]; each targeted layer trains r * (in + out) parameters."""
    alpha: float = 32.0
    """Scale: the update is multiplied by alpha / r, so changing r keeps the update's size comparable."""
    dropout: float = 0.0
    """Dropout on the adapter's input, in training only (the base layer never sees it)."""
    target_modules: list[str] | str = "all-linear"
    """Layers that get an adapter: peft's "all-linear" (every nn.Linear but the output head), or module name
    suffixes such as [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] for Llama-like models."""
    save_adapter: bool = False
    """Also save each iteration's adapter alone (iteration_<t>/adapter, loadable with peft.PeftModel.from_pretrained
    on the previous iteration's model), beside the merged model."""

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.r, int) and self.r >= 1):
            problems.append(f"lora.r must be an integer >= 1, got {self.r!r}")
        if not self.alpha > 0:
            problems.append(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            problems.append(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            problems.append("lora.target_modules is empty")
        if problems:
            raise ValueError("; ".join(problems))


def require_peft():
    """The peft module, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("peft")
    except ImportError as error:
        raise ImportError(f"LoRA adapters (model.lora) need the peft package: {INSTALL_HINT}") from error


def add_lora(model: nn.Module, settings: LoraSettings, seed: int) -> nn.Module:
    """Give `model` a fresh LoRA adapter in place (B = 0, A drawn from `seed`); returns it. Only the adapter trains.

    The model's outputs do not change (B is zero). The draw of A depends on `seed` and
    the model's shape only, not on the process's random state, which is left as it was:
    a resumed run that calls this with the seed that `merge_adapter_and_restart` got in
    the uninterrupted run gets the same adapter. Call it on the unsharded model, before
    `distributed.shard` (sharding must see the adapter's parameters). A ValueError for
    unsupported or unknown target modules comes once peft has changed the model: load
    it again before retrying.
    """
    peft = require_peft()
    if isinstance(model, FSDPModule):
        raise ValueError("add_lora needs the model before distributed.shard: call it right after loading")
    if _lora_layers(model):
        raise ValueError(f"{type(model).__name__} already has LoRA layers")
    config = peft.LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=_copy(settings.target_modules), bias="none"
    )
    # peft draws A from the global generator; it is drawn again below from `seed`, and the global state restored.
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        try:
            peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        except ValueError as error:
            raise ValueError(f"lora.target_modules {settings.target_modules!r}: {error}") from error
    layers = _lora_layers(model)
    _check_supported(model, layers)
    with torch.no_grad():
        _restart(layers, seed)
    return model


def has_adapter(model: nn.Module) -> bool:
    return bool(_lora_layers(model))


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters that train, all parameters), whole-model counts also when sharded with FSDP2."""
    # remove_duplicate (the default) counts tied weights once, as save_pretrained stores them.
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


def merged_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The plain architecture's weights with the adapter folded in: what `save_pretrained(state_dict=...)` should write.

    `<name>.base_layer.weight` + (alpha / r) B A becomes `<name>.weight` (and
    `<name>.base_layer.bias` becomes `<name>.bias`); the adapter's own tensors are dropped;
    everything else is passed through. The result loads with
    `AutoModelForCausalLM.from_pretrained(path)`, no peft needed. A pure function of
    `state_dict` (the model only tells which layers carry an adapter, and their
    scaling); `state_dict` defaults to the model's own, and for a model sharded with
    FSDP2 must be the gathered one, `distributed.full_state_dict(model)`, which exists
    on rank 0 only: call this there. The sums are done in float32 and stored in each
    weight's dtype, on the device the state dict is on (CPU for a gathered one).
    """
    if state_dict is None:
        if isinstance(model, FSDPModule):
            raise ValueError("the model is sharded: pass merged_state_dict(model, distributed.full_state_dict(model)) on rank 0")
        state_dict = model.state_dict()
    merged = dict(state_dict)
    for name, layer in _lora_layers(model).items():
        weight_key, bias_key = f"{name}.base_layer.weight", f"{name}.base_layer.bias"
        a_key, b_key = f"{name}.lora_A.{ADAPTER}.weight", f"{name}.lora_B.{ADAPTER}.weight"
        missing = [key for key in (weight_key, a_key, b_key) if key not in state_dict]
        if missing:
            raise KeyError(f"the state dict has no {missing[0]}; on ranks other than 0 a gathered full state dict is empty")
        weight = state_dict[weight_key]
        delta = _delta(state_dict[b_key], state_dict[a_key], layer)
        for key in (weight_key, bias_key, a_key, b_key):
            merged.pop(key, None)
        merged[f"{name}.weight"] = (weight.float() + delta.to(weight.device)).to(weight.dtype)
        if bias_key in state_dict:
            merged[f"{name}.bias"] = state_dict[bias_key]
    return merged


@torch.no_grad()
def merge_adapter_and_restart(model: nn.Module, seed: int) -> None:
    """Fold the adapter into the base weights (W += (alpha / r) B A), then restart it: A from `seed`, B = 0.

    Afterwards the model computes what its merged save loads as, exactly (a zero B adds
    nothing), and the adapter is where `add_lora(model, settings, seed)` would put it.
    Call it at the end of each iteration's training, after saving the adapter alone if
    wanted (`adapter_state_dict`), with the seed of the iteration the restarted adapter
    will train. Works on a plain model and on one sharded with FSDP2, where it is a
    collective: every process calls it.
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers (add_lora first)")
    _reshard(model)
    for layer in layers.values():
        weight = layer.get_base_layer().weight
        delta = _delta(_full(layer.lora_B[ADAPTER].weight), _full(layer.lora_A[ADAPTER].weight), layer)
        # The same sum as merged_state_dict's, so a saved merge equals this model bit for bit.
        local = _local(weight)
        local.copy_((local.float() + _local_part(delta, weight)).to(local.dtype))
    _restart(layers, seed)


@torch.no_grad()
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors alone, whole, on CPU, named as peft's `PeftModel.save_pretrained` names them.

    Take it before `merge_adapter_and_restart` (which zeroes B). Under FSDP2 it is a
    collective (each adapter tensor is gathered; they are small) and every process gets it.
    """
    state = {}
    for name, layer in _lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            state[f"base_model.model.{name}.{part}.weight"] = _full(getattr(layer, part)[ADAPTER].weight).cpu().clone()
    return state


def save_adapter(adapter_state: dict[str, torch.Tensor], settings: LoraSettings, path: str | Path, base_model_name_or_path: str | None = None) -> None:
    """Write an adapter (from `adapter_state_dict`) as peft does: adapter_config.json and adapter_model.safetensors.

    `peft.PeftModel.from_pretrained(base, path)` loads it onto `base`. With
    merge-and-restart iterations, iteration t's adapter is an update of M_{t-1}: its
    base is the previous iteration's merged model, which `base_model_name_or_path`
    should name. Call it on one process (rank 0).
    """
    peft = require_peft()
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = peft.LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=_copy(settings.target_modules),
        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
    )
    config.save_pretrained(str(path))
    save_file({k: v.contiguous() for k, v in adapter_state.items()}, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> peft LoRA layer carrying our adapter, in module order (the same on every process)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.r}


def _check_supported(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Only plain LoRA on linear layers (nn.Linear, or GPT-2's Conv1D) is merged here; refuse the rest now, not at save time."""
    from peft.tuners.lora import Linear

    unsupported = [name for name, layer in layers.items() if type(layer) is not Linear]
    if unsupported:
        raise ValueError(f"lora.target_modules: only linear layers are supported, not {unsupported[:3]} ({type(layers[unsupported[0]]).__name__})")
    # A tied weight (an output head sharing the embeddings) would change its other use too when merged.
    names_by_tensor: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_by_tensor.setdefault(id(parameter), []).append(name)
    tied = [name for name, layer in layers.items() if len(names_by_tensor[id(layer.get_base_layer().weight)]) > 1]
    if tied:
        raise ValueError(f"lora.target_modules: {tied} share their weight with another layer (tied embeddings); leave them out")


def _delta(lora_b: torch.Tensor, lora_a: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """(alpha / r) B A in float32, transposed for layers that store their weight as [in, out] (GPT-2's Conv1D)."""
    delta = (lora_b.float() @ lora_a.float()) * layer.scaling[ADAPTER]
    return delta.T if layer.fan_in_fan_out else delta


def _restart(layers: dict[str, nn.Module], seed: int) -> None:
    """A drawn as peft draws it (kaiming-uniform, as nn.Linear's default), but from `seed`; B = 0."""
    generator = torch.Generator().manual_seed(seed)
    for layer in layers.values():
        lora_a, lora_b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        fresh = torch.empty(lora_a.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
        _local(lora_a).copy_(_local_part(fresh, lora_a))
        _local(lora_b).zero_()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value (gathered from all processes when sharded: a collective)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a parameter that this process stores (all of it when not sharded); writes to it update the parameter."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _local_part(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's share of `whole`, split as the (possibly sharded) parameter `like` is; no communication."""
    if not isinstance(like, DTensor):
        return whole.to(like.device)
    # Every process holds the same `whole`, so each takes its own piece (src_data_rank=None: no scatter).
    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()


def _reshard(model: nn.Module) -> None:
    """Register the shards again where a no-grad pass left FSDP2 parameters gathered, so writes reach the shards."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def _copy(target_modules: list[str] | str) -> list[str] | str:
    # peft keeps (and rewrites) the list it is given; the settings must not change under the caller.
    return target_modules if isinstance(target_modules, str) else list(target_modules)
