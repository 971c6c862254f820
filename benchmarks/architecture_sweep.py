"""Every causal LM the installed transformers maps, built tiny, scored with its pair layout against plain forwards.

For each model type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES: a config from
AutoConfig.for_model shrunk to hidden 64, 2 layers (one of each layer kind where a
model mixes kinds), 4 heads, a vocabulary of 256, windows and chunks of 8 tokens
(so that the sweep's rows cross them); the model built from it with sdpa attention,
else eager, in float32 and eval mode. Then irpo_pl.layouts.check_model_supported and
decide_pair_layout (rows of up to MAX_ROW_TOKENS), and logprobs.score_pairs against
one unpadded forward of prompt + completion per sequence, written here on its own.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/architecture_sweep.py [--only llama,gpt2] [--attention sdpa,eager]

One line per model (the layout and the largest difference, or why it was refused or
could not be built), then one JSON line with the counts and the largest difference.
A model scored wrongly (a difference over TOLERANCE, 1e-4, plus four float32 ulps of
the summed log-prob) is a bug, and makes the exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

from irpo_pl.layouts import UnsupportedModelError, check_model_supported, decide_pair_layout  # noqa: E402
from irpo_pl.logprobs import score_pairs  # noqa: E402

TOLERANCE = 1e-4
MAX_ROW_TOKENS = 40
WINDOW = 8
SECONDS_PER_MODEL = 180
VOCABULARY = 256

# Attribute -> tiny value, set wherever a (sub-)config has the attribute.
TINY = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "word_embed_proj_dim", "hidden_dim"), 64),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads", "encoder_attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "n_kv_heads"), 2),
    **dict.fromkeys(("intermediate_size", "n_inner", "ffn_dim", "d_ff", "decoder_ffn_dim", "encoder_ffn_dim", "ffn_hidden_size"), 128),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"), 32),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token"), 2),
    **dict.fromkeys(("n_group", "topk_group", "n_shared_experts", "num_shared_experts"), 1),
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank", "v_head_dim"), 16),
    **dict.fromkeys(("qk_rope_head_dim", "qk_nope_head_dim"), 8),
    **dict.fromkeys(("state_size", "ssm_state_size", "mamba_d_state", "time_step_rank", "linear_key_head_dim", "linear_value_head_dim"), 8),
    **dict.fromkeys(("sliding_window", "attention_chunk_size", "window_size", "attention_window_size"), WINDOW),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"), 256),
    "head_dim": 16,
    "vocab_size": VOCABULARY,
}
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers", "num_decoder_layers", "num_encoder_layers")
# Configurations beside each type's default where the default would leave a case untried:
# ALiBi Falcon, sliding windows that are off (or absent) by default.
VARIANTS = {
    "falcon": {"alibi": {"alibi": True}},
    "qwen2": {"sliding window": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 0}},
    "phi3": {"sliding window": {"sliding_window": WINDOW}},
    "starcoder2": {"sliding window": {"sliding_window": WINDOW}},
    "mixtral": {"sliding window": {"sliding_window": WINDOW}},
}
DROP = object()  # in TYPE_OVERRIDES: do not pass this key at all
# Shapes that one type's config ties together in ways TINY cannot guess.
TYPE_OVERRIDES = {
    "prophetnet": {"num_hidden_layers": DROP},
    "mamba2": {"head_dim": 32, "n_groups": 1},
    "jamba": {"attn_layer_offset": 1, "attn_layer_period": 2, "expert_layer_offset": 1, "expert_layer_period": 2},
    "granitemoehybrid": {"mamba_n_heads": 8},
    "rwkv": {"attention_hidden_size": 64},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "reformer": {"axial_pos_embds_dim": (32, 32), "axial_pos_shape": (16, 16)},
}
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id", "cls_token_id")


def tiny_config(config_class: type[PreTrainedConfig], overrides: dict) -> PreTrainedConfig:
    """`config_class` built again from tiny values (TINY), so that what it derives in __init__ follows them.

    Sub-configs (a text or vision tower) are made tiny the same way; a list of layer
    types keeps one layer of each kind, in the order they first appear.
    """
    default = config_class(**overrides)
    kwargs = dict(overrides)
    for name, value in vars(default).items():
        if isinstance(value, PreTrainedConfig):
            kwargs[name] = tiny_config(type(value), {})
    for key, tiny in TINY.items():
        current = getattr(default, key, None)
        if isinstance(current, int) and not isinstance(current, bool) and current > tiny and key not in overrides:
            kwargs[key] = tiny
    for key in ("head_dim", "num_key_value_heads"):
        if hasattr(default, key) and getattr(default, key) is None:
            # Some defaults leave these to be derived elsewhere, and their modeling code reads them as they are.
            kwargs[key] = TINY[key]
    if getattr(default, "kv_lora_rank", None):
        # Multi-head latent attention expands keys and values to every query head.
        kwargs["num_key_value_heads"] = TINY["num_attention_heads"]
    if getattr(default, "qk_rope_head_dim", None):
        # Multi-head latent attention rotates only qk_rope_head_dim of each head: its rotary table has that width.
        kwargs["head_dim"] = TINY["qk_rope_head_dim"]
    if isinstance(getattr(default, "rotary_dim", None), int):
        kwargs["rotary_dim"] = TINY["head_dim"] // 2
    kinds = list(dict.fromkeys(getattr(default, "layer_types", None) or ()))
    layers = max(2, len(kinds))
    kwargs.update({key: layers for key in LAYER_COUNTS if isinstance(getattr(default, key, None), int)})
    if kinds and _settable(default, "layer_types"):
        kwargs["layer_types"] = (kinds * layers)[:layers]
    if hasattr(default, "is_decoder"):
        # Encoder families' LM heads are causal only as decoders, which is how their docs build a causal LM.
        kwargs["is_decoder"] = True
    for key in TOKEN_IDS:
        token = getattr(default, key, None)
        if isinstance(token, list) or (isinstance(token, int) and token >= VOCABULARY):
            kwargs[key] = VOCABULARY - 1 - TOKEN_IDS.index(key)
    kwargs.update(TYPE_OVERRIDES.get(default.model_type, {}))
    return config_class(**{key: value for key, value in kwargs.items() if value is not DROP and _settable(config_class, key)})


def _settable(config_class: type[PreTrainedConfig], key: str) -> bool:
    """Whether `key` can be given to the config's constructor: a dataclass field, or any name the class does not compute.

    Computed attributes (properties, such as Jamba's layer_types or Bamba's layers_block_type) are left alone.
    """
    key = getattr(config_class, "attribute_map", {}).get(key, key)
    if dataclasses.is_dataclass(config_class) and key in {field.name for field in dataclasses.fields(config_class)}:
        return True
    return not isinstance(getattr(config_class, key, None), property)


def build(model_type: str, attention: str, overrides: dict | None = None) -> torch.nn.Module:
    config = tiny_config(type(AutoConfig.for_model(model_type)), overrides or {})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=torch.float32)
    return model.eval()


def plain_logps(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> float:
    """Summed log p(completion | prompt) from one forward pass of the whole sequence, nothing else in the batch."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1].double()
    return float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion).unsqueeze(-1)).sum())


def tolerance(truth: torch.Tensor) -> torch.Tensor:
    """TOLERANCE, plus the float32 rounding of sums as large as these (score_pairs adds up in float32, as training does).

    Sums of several hundred nats are rounded to 6e-5 in float32 (MiniCPM3's tiny model reaches 740).
    """
    return TOLERANCE + 4 * torch.finfo(torch.float32).eps * truth.abs()


def sweep_rows(vocabulary: int) -> list[dict]:
    """Pairs of random ordinary tokens whose rows cross windows of WINDOW tokens, of mixed lengths (so batches pad)."""
    generator = torch.Generator().manual_seed(1)
    shapes = [(5, 9, 14), (12, 27, 6), (2, 2, 3), (14, 20, 26), (7, 33, 30)]

    def draw(n: int) -> list[int]:
        return torch.randint(4, min(vocabulary, VOCABULARY) - 8, (n,), generator=generator).tolist()

    return [{"prompt_ids": draw(p), "chosen_ids": draw(c), "rejected_ids": draw(r)} for p, c, r in shapes]


class Timeout(Exception):
    pass


def _alarm(*_):
    raise Timeout(f"over {SECONDS_PER_MODEL} s")


def one_model(model_type: str, attention: str, overrides: dict) -> dict:
    start = time.perf_counter()
    try:
        model = build(model_type, attention, overrides)
        with torch.no_grad():
            # A tiny config whose shapes do not fit together fails here, before any layout is tried.
            model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]]), use_cache=False)
    except Exception as error:  # noqa: BLE001 - anything that stops a tiny build is reported, not raised
        return {"model_type": model_type, "outcome": "could_not_build", "why": f"{type(error).__name__}: {_line(error)}"}
    name = type(model).__name__
    try:
        check_model_supported(model)
        layout = decide_pair_layout(model, "auto", max_row_tokens=MAX_ROW_TOKENS)
    except UnsupportedModelError as error:
        return {"model_type": model_type, "class": name, "outcome": "refused", "why": str(error), "seconds": time.perf_counter() - start}
    rows = [row for row in sweep_rows(model.get_input_embeddings().num_embeddings) if layout.fits(row)]
    with torch.no_grad():
        scored = score_pairs(model, rows, batch_size=2)
        truth = torch.tensor([[plain_logps(model, r["prompt_ids"], r[key]) for key in ("chosen_ids", "rejected_ids")] for r in rows])
    differences = (scored.double() - truth).abs()
    difference = float(differences.max())
    exact = bool((differences <= tolerance(truth)).all())
    outcome = f"exact_{layout.name}" if exact else f"wrong_{layout.name}"
    return {
        "model_type": model_type, "class": name, "attention": attention, "outcome": outcome, "difference": difference,
        "why": layout.reason, "parameters": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - start,
    }


def _line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:160]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated model types (default: all mapped ones)")
    parser.add_argument("--attention", default="sdpa,eager", help="implementations to try in order; the first that builds is used")
    args = parser.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    logging.getLogger("irpo_pl.layouts").setLevel(logging.WARNING)
    selected = [t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if not args.only or t in args.only.split(",")]
    cases = [(t, "", {}) for t in selected] + [(t, name, o) for t in selected for name, o in VARIANTS.get(t, {}).items()]
    signal.signal(signal.SIGALRM, _alarm)
    results = []
    for model_type, variant, overrides in cases:
        for attention in args.attention.split(","):
            signal.alarm(SECONDS_PER_MODEL)
            try:
                result = one_model(model_type, attention, overrides)
            except Exception as error:  # noqa: BLE001 - a crash in scoring is a finding, reported as such
                result = {"model_type": model_type, "outcome": "crashed", "why": f"{type(error).__name__}: {_line(error)}"}
            finally:
                signal.alarm(0)
            if result["outcome"] != "could_not_build" or attention == args.attention.split(",")[-1]:
                break
        results.append(result)
        label = f"{model_type} ({variant})" if variant else model_type
        difference = f" {result['difference']:.1e}" if "difference" in result else ""
        print(f"{label:30s} {result.get('class', ''):42s} {result.get('attention', ''):5s} {result['outcome']}{difference}: {result['why']}", flush=True)
    counts = {key: sum(r["outcome"] == key for r in results) for key in ("exact_shared_prefix", "exact_separate", "refused", "could_not_build")}
    counts["wrong"] = sum(r["outcome"].startswith("wrong") or r["outcome"] == "crashed" for r in results)
    largest = max((r["difference"] for r in results if "difference" in r), default=0.0)
    print(json.dumps({"model_types": len(selected), "variants": len(cases) - len(selected), **counts, "largest_difference": largest, "transformers": transformers.__version__, "torch": torch.__version__}))
    return 1 if counts["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
