"""Which pair layout scores a model exactly: prefix-shared rows where they are exact, separate rows otherwise.

A prefix-shared row (data.PairPacker) holds the prompt once and both completions after
it, with a custom 4-D mask and restarted positions: about a third fewer tokens than
two separate rows, and exact for models whose every layer honours that mask and takes
its positions from `position_ids`. Transformers hands a custom 4-D mask unchanged to
every layer, so a model goes silently wrong with it when it has

- a sliding window (or chunked attention) shorter than the rows: the window is never applied;
- ALiBi or local attention indexed by row (MPT, Bloom, Falcon-ALiBi, GPT-Neo's local layers);
- recurrent, convolution or linear-attention layers (Mamba, Jamba, LFM2, Qwen3-Next...), which get no mask;
- an attention implementation that takes no custom mask (flash attention).

Separate rows (data.SeparatePairCollator: each completion after its own copy of the
prompt, right-padded, a 2-D mask) are what the model sees for prompt + completion
alone, so they are exact wherever a model can be batched at all.

The decision is made once per model, right after loading, and remembered on the model
object (attribute `irpo_pair_layout`), so that the training step's collator and
logprobs.score_pairs agree without passing it around:

    check_model_supported(model)                           # raises for models irpo_pl cannot score
    layout = decide_pair_layout(model, "auto", max_row_tokens=pairs.max_length)
    collate_fn = pair_layout_of(model).collator(pad_id)    # the training batches
    logprobs.score_pairs(model, rows, batch_size)          # the reference pre-pass

Where the config says enough (the families in KNOWN_EXACT, and every rule above), the
decision comes from it; for any other model it comes from a measurement on the model
itself: a few random pairs as long as the run's longest rows, packed against separate
against one unpadded forward per sequence.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from irpo_pl.data import PairPacker, SeparatePairCollator
from irpo_pl.logprobs import CUSTOM_MASK_ATTENTION, pair_token_logps, plain_token_logps

log = logging.getLogger(__name__)

SHARED_PREFIX, SEPARATE = "shared_prefix", "separate"
PAIR_LAYOUTS = ("auto", SHARED_PREFIX, SEPARATE)
ATTRIBUTE = "irpo_pair_layout"

# Model types whose every layer is full or sliding-window attention with positions from position_ids:
# prefix-shared rows are exact for them once their windows (checked from the config) cover the rows.
# Each was measured exact by benchmarks/architecture_sweep.py under sdpa and eager, and the windowed
# ones (Mistral, Gemma 2/3, Cohere 2, OLMo 3) with windows covering the rows in tests/test_layouts.py.
KNOWN_EXACT = frozenset(
    {
        "llama", "mistral", "mixtral", "ministral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
        "gemma3_text", "phi", "phi3", "phimoe", "gpt2", "gpt_neox", "gpt_bigcode", "olmo", "olmo2", "olmo3", "olmoe",
        "cohere", "cohere2", "granite", "granitemoe", "starcoder2", "smollm3", "stablelm", "glm", "glm4", "helium",
        "deepseek_v3", "internlm3", "exaone4", "seed_oss", "apertus", "arcee", "ernie4_5", "hunyuan_v1_dense",
    }
)
# Model types with recurrent, convolution or linear-attention layers that a config's layer_types may not name.
RECURRENT = frozenset(
    {
        "mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "recurrent_gemma", "jamba", "bamba", "zamba", "zamba2",
        "falcon_h1", "nemotron_h", "granitemoehybrid", "lfm2", "lfm2_moe", "qwen3_next", "minimax", "kimi_linear",
    }
)
# layer_types entries that are attention over the whole row (windowed or not).
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
# layer_types entries that scan the whole row (so they would run one branch into the other).
RECURRENT_LAYER_TYPES = frozenset({"linear_attention", "mamba", "mamba2", "conv", "short_conv", "recurrent", "hybrid", "rwkv"})
# layer_types entries (Nemotron-H) that act on each token alone, so they need no mask.
PER_TOKEN_LAYER_TYPES = frozenset({"mlp", "moe"})
ALIBI = frozenset({"bloom"})

# Per-token log-prob differences (nats) between two ways of scoring the same pair. Probes and
# measurements run in float32 (a 16-bit model is upcast for them), where noise is ~1e-6 here.
BATCHING_TOLERANCE = 1e-4  # right-padded rows against the same rows alone
LEAK_TOLERANCE = 1e-5  # a causal model's log-probs do not move at all when later tokens change
# Packed rows count as exact within 4x the separate rows' rounding, and never need to be closer than this.
# A row-indexed position in a tiny random model moves log-probs by ~5e-5 per token (RoFormer), so the floor sits below that.
MEASURED_FLOOR = 1e-5

# Rows of the measurement when nobody said how long the run's rows are.
DEFAULT_MEASURED_TOKENS = 512


class UnsupportedModelError(ValueError):
    """A model irpo_pl cannot score exactly with any layout; the message names the class and what to set."""


@dataclass(frozen=True)
class PairLayout:
    """How a model's pairs are batched, why, and how long a pair may be.

    `name` is "shared_prefix" or "separate"; `reason` says why, for the log line.
    `max_pair_tokens` bounds prompt + longer completion (what pairs.max_length bounds):
    longer pairs would be scored differently from plain forwards, or were not covered
    by the decision (None: no bound); `limit_reason` says which.
    """

    name: str
    reason: str
    max_pair_tokens: int | None = None
    limit_reason: str = ""

    def collator(self, pad_id: int) -> PairPacker | SeparatePairCollator:
        """The collate_fn of this layout's training batches, which logprobs.segment_logps scores."""
        return PairPacker(pad_id) if self.name == SHARED_PREFIX else SeparatePairCollator(pad_id)

    def fits(self, row: dict) -> bool:
        """Whether a tokenized pair is short enough to be scored exactly; longer ones are dropped, never truncated."""
        return self.max_pair_tokens is None or pair_tokens(row) <= self.max_pair_tokens

    def max_length(self, requested: int) -> int:
        """The pairs.max_length to tokenize with: `requested`, lowered to what the model scores exactly."""
        return requested if self.max_pair_tokens is None else min(requested, self.max_pair_tokens)

    def row_tokens(self, row: dict) -> int:
        """Tokens a pair takes in this layout's batch (what length-grouping sorts by)."""
        prompt, chosen, rejected = (len(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        return prompt + chosen + rejected if self.name == SHARED_PREFIX else 2 * prompt + chosen + rejected


def pair_tokens(row: dict) -> int:
    """Prompt + longer completion: the longest sequence a pair puts before the model, in either layout."""
    return len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))


def set_pair_layout(model: torch.nn.Module, layout: PairLayout) -> None:
    """Remember `layout` on the model object (it follows the model through deepcopy, FSDP2 and PEFT wrappers)."""
    setattr(model, ATTRIBUTE, layout)


def pair_layout_of(model: torch.nn.Module) -> PairLayout:
    """The layout decided for `model`; where none was, decided now with the defaults (auto, rows of unknown length)."""
    layout = getattr(model, ATTRIBUTE, None)
    return layout if layout is not None else decide_pair_layout(model)


def decide_pair_layout(model: torch.nn.Module, requested: str = "auto", max_row_tokens: int | None = None) -> PairLayout:
    """Choose, remember on the model and log (one line) the pair layout that scores `model` exactly.

    `requested` is train.pair_layout: "auto" picks prefix-shared rows where they are
    exact, else separate rows; "separate" is always honoured; "shared_prefix" is refused
    (ValueError, with the reason) where it is not exact. `max_row_tokens` is the longest
    prompt + completion the run can build (pairs.max_length); windows at least that
    long never bite. Unknown (None): any window counts, and a measurement uses pairs of
    up to DEFAULT_MEASURED_TOKENS, which then bounds the pairs prefix sharing may take.
    Runs check_model_supported first.
    """
    if requested not in PAIR_LAYOUTS:
        raise ValueError(f"train.pair_layout must be one of {', '.join(PAIR_LAYOUTS)}, got {requested!r}")
    check_model_supported(model)
    limit, limit_reason = position_limit(model.config)
    name, reason, checked = SEPARATE, "train.pair_layout is separate", None
    if requested != SEPARATE:
        exact, reason, checked = shared_prefix_verdict(model, max_row_tokens, limit)
        if requested == SHARED_PREFIX and not exact:
            raise ValueError(
                f"train.pair_layout shared_prefix: prefix-shared rows would score {type(model).__name__} wrongly ({reason}); "
                "set train.pair_layout to auto or separate"
            )
        # Separate rows are exact at any length; prefix sharing only as far as it was checked.
        name, checked = (SHARED_PREFIX, checked) if exact else (SEPARATE, None)
    if checked is not None and (limit is None or checked < limit):
        limit, limit_reason = checked, f"prefix sharing was checked for pairs of up to {checked} tokens"
    layout = PairLayout(name, reason, limit, limit_reason)
    set_pair_layout(model, layout)
    log.info(summary(model, layout, max_row_tokens))
    return layout


def summary(model: torch.nn.Module, layout: PairLayout, max_row_tokens: int | None = None) -> str:
    """The one line that says which layout a model got and why (and the pair length it bounds, where that bites)."""
    bites = layout.max_pair_tokens is not None and (max_row_tokens is None or layout.max_pair_tokens < max_row_tokens)
    limit = f"; pairs over {layout.max_pair_tokens} tokens are dropped ({layout.limit_reason})" if bites else ""
    return f"irpo_pl: pair layout {layout.name} for {type(model).__name__}: {layout.reason}{limit}"


def shared_prefix_verdict(model: torch.nn.Module, max_row_tokens: int | None, limit: int | None = None) -> tuple[bool, str, int | None]:
    """(exact, why, checked) for prefix-shared rows on `model`, from the config where it tells, else measured.

    `checked` is the longest pair the verdict covers (None: any).
    """
    verdict = config_verdict(model.config, max_row_tokens)
    if verdict is not None:
        return (*verdict, max_row_tokens)
    tokens = min(x for x in (max_row_tokens or DEFAULT_MEASURED_TOKENS, limit) if x is not None)
    return (*measured_verdict(model, tokens), tokens)


def config_verdict(config, max_row_tokens: int | None) -> tuple[bool, str] | None:
    """(exact, why) where the config decides it, None where only a measurement can."""
    text = config.get_text_config(decoder=True)
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    if attention not in CUSTOM_MASK_ATTENTION:
        return False, f"{attention} attention takes no custom mask"
    model_type = text.model_type
    if model_type in ALIBI or getattr(text, "alibi", False) or _attn_config_value(text, "alibi"):
        return False, "ALiBi biases follow row indices, not position_ids"
    layer_types = set(getattr(text, "layer_types", None) or ())
    other_layers = sorted(layer_types - ATTENTION_LAYER_TYPES - PER_TOKEN_LAYER_TYPES)
    if model_type in RECURRENT or RECURRENT_LAYER_TYPES & set(other_layers):
        kinds = ", ".join(other_layers) or "recurrent or convolution"
        return False, f"its {kinds} layers take no attention mask and run the chosen branch into the rejected one"
    conflict = next(_window_conflicts(text, layer_types, max_row_tokens), None)
    if conflict:
        return False, conflict
    if model_type in KNOWN_EXACT and not other_layers:
        return True, f"{model_type} layers all take the prefix-sharing mask and position_ids" + _window_note(text, max_row_tokens)
    return None


def _attn_config_value(text, key: str):
    """A value of MPT's attn_config, which is a dict or a config object."""
    attn_config = getattr(text, "attn_config", None)
    return attn_config.get(key) if isinstance(attn_config, dict) else getattr(attn_config, key, None)


def _window_conflicts(text, layer_types: set[str], max_row_tokens: int | None):
    """Why windowed or chunked attention would see more in a packed row than in a plain one, if it would."""
    rows = f"rows of up to {max_row_tokens} tokens" if max_row_tokens else "rows of unknown length"
    window = getattr(text, "sliding_window", None)
    if window and (not layer_types or "sliding_attention" in layer_types) and not _covers(window, max_row_tokens):
        yield f"its sliding window of {window} tokens, shorter than {rows}, is not applied to a custom mask"
    chunk = getattr(text, "attention_chunk_size", None)
    # Chunks and GPT-Neo's local windows count row indices, and a packed row is up to twice a plain one.
    if chunk and "chunked_attention" in layer_types and not _covers(chunk, max_row_tokens and 2 * max_row_tokens):
        yield f"its attention chunks of {chunk} tokens count row indices, and packed {rows} hold two completions"
    local = "local" in (getattr(text, "attention_layers", None) or ())
    if local and not _covers(getattr(text, "window_size", 0), max_row_tokens and 2 * max_row_tokens):
        yield f"its local attention window of {text.window_size} tokens counts row indices, and packed {rows} hold two completions"


def _covers(window: int, tokens: int | None) -> bool:
    return tokens is not None and window >= tokens


def _window_note(text, max_row_tokens: int | None) -> str:
    window = getattr(text, "sliding_window", None)
    return f" (its sliding window of {window} covers rows of up to {max_row_tokens} tokens)" if window and max_row_tokens else ""


def position_limit(config) -> tuple[int | None, str]:
    """The longest prompt + completion the model scores the same in any batch, and why; (None, "") for no limit.

    A learned position table (or a declared context) ends somewhere; longrope and
    dynamic RoPE switch their frequencies for a whole batch once its longest sequence
    passes the original context, so a short pair batched with a long one would be
    scored differently from how it is alone.
    """
    text = config.get_text_config(decoder=True)
    limits = []
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            limits.append((value, f"{name} is {value}"))
            break
    for parameters in _rope_parameter_sets(text):
        kind = parameters.get("rope_type")
        if kind in ("longrope", "dynamic"):
            original = parameters.get("original_max_position_embeddings") or getattr(text, "original_max_position_embeddings", None)
            original = original or getattr(text, "max_position_embeddings", None)
            if original:
                limits.append((original, f"{kind} RoPE changes its frequencies for batches longer than {original}"))
    return min(limits) if limits else (None, "")


def _rope_parameter_sets(text) -> list[dict]:
    """rope_parameters as a list: one dict, or one per layer type (Gemma 3's sliding and full layers)."""
    parameters = getattr(text, "rope_parameters", None) or {}
    if "rope_type" in parameters or not all(isinstance(v, dict) for v in parameters.values()):
        return [parameters]
    return list(parameters.values())


def check_model_supported(model: torch.nn.Module) -> None:
    """Raise UnsupportedModelError, naming the model class and what to set, for a model no layout can score exactly.

    Cheap enough to call right after loading, before any sampling or training: from the
    config for the families in KNOWN_EXACT, else a few short forward passes: they check
    that a token's log-probs do not depend on later tokens (a causal LM), and that
    right-padded rows score like the same rows alone (the model can be batched).
    """
    name = type(model).__name__
    config = model.config
    if config.get_text_config(decoder=True).model_type in KNOWN_EXACT:
        return
    with _evaluating(model):
        generator = torch.Generator().manual_seed(0)
        probe = _random_pairs(model, [(4, 8, 3), (2, 3, 5)], generator)
        try:
            leak = _future_leak(model, probe[0], _random_tokens(model, 4, generator))
            padded = pair_token_logps(model, _on(model, SeparatePairCollator(_pad_id(model))(probe)))
            batching_error = _max_difference(padded, _plain(model, probe))
        except Exception as error:  # noqa: BLE001 - any failure here means the model cannot be scored; the cause is chained
            raise UnsupportedModelError(
                f"{name} cannot score a batch of padded rows ({type(error).__name__}: {_first_line(error)}); irpo_pl cannot train it"
            ) from error
    if leak > LEAK_TOLERANCE:
        fix = "set is_decoder=True in its config" if getattr(config, "is_decoder", None) is False else "irpo_pl needs a causal language model"
        raise UnsupportedModelError(f"{name} is not causal: its log-probs change with later tokens (by {leak:.2g} nats); {fix}")
    if batching_error > BATCHING_TOLERANCE:
        raise UnsupportedModelError(
            f"{name} cannot be batched: right-padded rows score up to {batching_error:.2g} nats per token away from the same rows alone; "
            f"load it with another attention implementation (model.attn_implementation, now {getattr(config, '_attn_implementation', None)}) "
            "or use another model"
        )


def measured_verdict(model: torch.nn.Module, tokens: int, seed: int = 0) -> tuple[bool, str]:
    """(exact, why) from scoring a few random pairs of up to `tokens` tokens packed, separate and alone.

    Runs in float32 whatever the model's dtype (see _evaluating). Packed rows are exact
    if they stay within 4x the difference between separate rows and plain forwards (both
    exact in exact arithmetic, so that difference is float32 rounding on this model), or
    within MEASURED_FLOOR (1e-5 nats per token) where that rounding is smaller.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = max(tokens, 8)
    shapes = [(tokens // 4, tokens - tokens // 4, tokens - tokens // 4 - tokens // 8), (tokens // 2, tokens // 4, tokens // 2), (3, 2, 4)]
    pad = _pad_id(model)
    with _evaluating(model):
        pairs = _random_pairs(model, shapes, generator)
        plain = _plain(model, pairs)
        noise = _max_difference(pair_token_logps(model, _on(model, SeparatePairCollator(pad)(pairs))), plain)
        try:
            packed = _max_difference(pair_token_logps(model, _on(model, PairPacker(pad)(pairs))), plain)
        except Exception as error:  # noqa: BLE001 - a model that cannot run packed rows is scored with separate ones
            return False, f"packed rows raise {type(error).__name__}: {_first_line(error)}"
    tolerance = max(MEASURED_FLOOR, 4 * noise)
    measured = f"measured on pairs of up to {tokens} tokens: packed rows {packed:.2g} nats per token from plain forwards, separate rows {noise:.2g}"
    return packed <= tolerance, measured


def _random_pairs(model: torch.nn.Module, shapes: list[tuple[int, int, int]], generator: torch.Generator) -> list[dict]:
    """Pairs of random ordinary tokens with (prompt, chosen, rejected) lengths `shapes`."""
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    return [{key: _random_tokens(model, n, generator) for key, n in zip(keys, shape)} for shape in shapes]


def _random_tokens(model: torch.nn.Module, count: int, generator: torch.Generator) -> list[int]:
    """Random ids the model's head predicts, none of them special (some models treat those apart)."""
    text = model.config.get_text_config(decoder=True)
    # Embedding tables may hold more rows than the vocabulary the head predicts (extra prompt or audio tokens).
    vocabulary = min(model.get_input_embeddings().num_embeddings, getattr(text, "vocab_size", None) or 4096, 4096)
    special = set()
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(text, key, None)
        special.update(value if isinstance(value, list) else [value])
    ordinary = torch.tensor([token for token in range(vocabulary) if token not in special])
    return ordinary[torch.randint(len(ordinary), (count,), generator=generator)].tolist()


def _plain(model: torch.nn.Module, pairs: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tuple(plain_token_logps(model, p["prompt_ids"], p[key]) for key in ("chosen_ids", "rejected_ids")) for p in pairs]


def _future_leak(model: torch.nn.Module, pair: dict, other_ending: list[int]) -> float:
    """How far the log-probs of a completion's first tokens move when only its later tokens change."""
    prompt, completion = pair["prompt_ids"], pair["chosen_ids"]
    kept = len(completion) - len(other_ending)
    first, second = (plain_token_logps(model, prompt, c)[:kept] for c in (completion, completion[:kept] + other_ending))
    return float((first - second).abs().max())


def _max_difference(scored: list[tuple[torch.Tensor, torch.Tensor]], reference: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return max(float((a.cpu() - b.cpu()).abs().max()) for pair, truth in zip(scored, reference) for a, b in zip(pair, truth))


def _on(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {key: value.to(device) for key, value in batch.items()}


def _pad_id(model: torch.nn.Module) -> int:
    return getattr(model.config, "pad_token_id", None) or 0


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


@contextmanager
def _evaluating(model: torch.nn.Module):
    """Eval mode, no gradients and float32 weights for a probe; the model's mode and weights come back as they were.

    16-bit rounding (~1e-3 nats per token) would hide the small differences a probe
    looks for, so 16-bit parameters and buffers are upcast for it, which takes twice
    their memory for a moment; converted back, they are the same bits.
    """
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(
            f"{type(model).__name__}'s pair layout needs a probe of the model, and its weights are on the meta device: "
            "decide on a process that holds the weights and give the other processes its PairLayout with set_pair_layout"
        )
    was_training = model.training
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64)]
    dtypes = [t.dtype for t in tensors]
    model.eval()
    try:
        for tensor in tensors:
            tensor.data = tensor.data.float()
        with torch.no_grad():
            yield
    finally:
        for tensor, dtype in zip(tensors, dtypes):
            tensor.data = tensor.data.to(dtype)
        model.train(was_training)
