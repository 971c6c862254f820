"""The pair layout each architecture gets, and that it scores like plain forwards: real tiny transformers models."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from irpo_pl.layouts import (
    SEPARATE,
    SHARED_PREFIX,
    PairLayout,
    UnsupportedModelError,
    check_model_supported,
    config_verdict,
    decide_pair_layout,
    measured_verdict,
    pair_layout_of,
    position_limit,
    set_pair_layout,
)
from irpo_pl.logprobs import score_pairs, segment_logps
from irpo_pl.streams import interleave_back, split_rows

VOCABULARY = 96
MAX_ROW_TOKENS = 32
WINDOW = 4
ATTENTION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}

# (id, model type, config overrides, the layout auto must choose). Windows of 4 tokens, rows of up to 32.
ARCHITECTURES = [
    ("llama", "llama", ATTENTION, SHARED_PREFIX),
    ("qwen2", "qwen2", ATTENTION, SHARED_PREFIX),
    ("qwen2-window", "qwen2", {**ATTENTION, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 0}, SEPARATE),
    ("mistral-window", "mistral", {**ATTENTION, "sliding_window": WINDOW}, SEPARATE),
    ("gemma2", "gemma2", {**ATTENTION, "head_dim": 16, "sliding_window": WINDOW}, SEPARATE),
    ("gemma3", "gemma3_text", {**ATTENTION, "head_dim": 16, "sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]}, SEPARATE),
    ("phi3-window", "phi3", {**ATTENTION, "sliding_window": WINDOW}, SEPARATE),
    ("gpt2", "gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4}, SHARED_PREFIX),
    ("gpt-neox", "gpt_neox", ATTENTION, SHARED_PREFIX),
    ("mpt", "mpt", {"d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 128}, SEPARATE),
    ("falcon-alibi", "falcon", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "alibi": True}, SEPARATE),
    ("bloom", "bloom", {"hidden_size": 64, "n_layer": 2, "n_head": 4}, SEPARATE),
    ("mamba", "mamba", {"hidden_size": 64, "num_hidden_layers": 2, "state_size": 8, "time_step_rank": 8}, SEPARATE),
    ("lfm2", "lfm2", {**ATTENTION, "layer_types": ["conv", "full_attention"]}, SEPARATE),
    # Not in irpo_pl's lists: decided by a measurement on the model.
    ("opt-measured", "opt", {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "word_embed_proj_dim": 64}, SHARED_PREFIX),
    ("roformer-measured", "roformer", {**ATTENTION, "embedding_size": 64, "is_decoder": True}, SEPARATE),
]
OVERRIDES = {identifier: overrides for identifier, _, overrides, _ in ARCHITECTURES}


def build(model_type: str, overrides: dict, attention: str | None = None):
    """A tiny model of `model_type` in eval mode, same weights every time, with `attention` (None: the model's default).

    Skips where transformers has no such attention for the model.
    """
    config = AutoConfig.for_model(model_type, vocab_size=VOCABULARY, pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    except ValueError as error:
        if "does not support" in str(error):
            pytest.skip(f"{model_type} has no {attention} attention in this transformers")
        raise
    return model.eval()


def random_rows(seed: int = 1) -> list[dict]:
    """Pairs of mixed lengths (so batches pad) whose rows cross windows of WINDOW tokens; ids avoid the special tokens."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(5, 9, 14), (12, 19, 6), (2, 2, 3), (7, 25, 20), (3, 6, 6)]

    def draw(n: int) -> list[int]:
        return torch.randint(4, VOCABULARY, (n,), generator=generator).tolist()

    return [{"prompt_ids": draw(p), "chosen_ids": draw(c), "rejected_ids": draw(r)} for p, c, r in shapes]


def alone(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion | prompt) from one forward pass of prompt + completion, nothing else in the batch."""
    logits = model(input_ids=torch.tensor([prompt + completion]), use_cache=False).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(completion).unsqueeze(-1)).sum()


def plain_pairs(model, rows: list[dict]) -> torch.Tensor:
    return torch.stack([torch.stack([alone(model, r["prompt_ids"], r[key]) for key in ("chosen_ids", "rejected_ids")]) for r in rows])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize(("model_type", "overrides", "expected"), [a[1:] for a in ARCHITECTURES], ids=[a[0] for a in ARCHITECTURES])
def test_every_architecture_scores_like_plain_forwards_with_the_layout_it_gets(model_type, overrides, expected, attention):
    model = build(model_type, overrides, attention)
    layout = decide_pair_layout(model, "auto", max_row_tokens=MAX_ROW_TOKENS)
    assert layout.name == expected, layout.reason
    rows = random_rows()
    with torch.no_grad():
        truth = plain_pairs(model, rows)
        scored = score_pairs(model, rows, batch_size=2)
        # What the training step computes: the layout's batch, split into two row streams and put back together.
        batch = pair_layout_of(model).collator(pad_id=0)(rows)
        step = interleave_back([segment_logps(model, part, 2) for part in split_rows(batch, 2)])
    assert (scored.double() - truth).abs().max() < 1e-4
    assert (step.double() - truth).abs().max() < 1e-4
    assert not model.training  # score_pairs gives the model back in the mode it had


@pytest.mark.parametrize(
    ("model_type", "overrides", "expected"),
    [a[1:] for a in ARCHITECTURES if a[0] in ("llama", "mistral-window", "mamba")],
    ids=["llama", "mistral-window", "mamba"],
)
def test_training_gradients_match_plain_forwards(model_type, overrides, expected):
    model = build(model_type, overrides)
    layout = decide_pair_layout(model, "auto", max_row_tokens=MAX_ROW_TOKENS)
    assert layout.name == expected
    rows = random_rows()
    weights = torch.tensor([1.0, -0.5])  # any mix of chosen and rejected, as the loss weighs them

    def gradients(logps: callable) -> list[torch.Tensor]:
        model.zero_grad()
        (logps() * weights).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.train()
    ours = gradients(lambda: segment_logps(model, layout.collator(0)(rows), 2))
    truth = gradients(lambda: plain_pairs(model, rows).float())
    assert len(ours) == len(truth) > 0
    for mine, theirs in zip(ours, truth):
        assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-3)


def test_an_explicit_shared_prefix_is_refused_where_it_is_not_exact():
    model = build("mistral", {**ATTENTION, "sliding_window": WINDOW})
    with pytest.raises(ValueError, match=r"train.pair_layout shared_prefix: .*MistralForCausalLM.*sliding window of 4 tokens.*set train.pair_layout to auto or separate"):
        decide_pair_layout(model, "shared_prefix", max_row_tokens=MAX_ROW_TOKENS)
    mpt = build("mpt", {"d_model": 64, "n_layers": 2, "n_heads": 4}, "eager")
    with pytest.raises(ValueError, match="ALiBi"):
        decide_pair_layout(mpt, "shared_prefix", max_row_tokens=MAX_ROW_TOKENS)


def test_explicit_layouts_are_honoured_where_exact():
    model = build("llama", ATTENTION)
    assert decide_pair_layout(model, "shared_prefix", max_row_tokens=MAX_ROW_TOKENS).name == SHARED_PREFIX
    assert decide_pair_layout(model, "separate", max_row_tokens=MAX_ROW_TOKENS).name == SEPARATE
    assert pair_layout_of(model).name == SEPARATE  # the last decision is the one remembered
    with pytest.raises(ValueError, match="train.pair_layout must be one of auto, shared_prefix, separate, got 'packed'"):
        decide_pair_layout(model, "packed")


WINDOWED = {
    "mistral": {},
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16, "layer_types": ["sliding_attention", "full_attention"]},
    "cohere2": {"layer_types": ["sliding_attention", "full_attention"]},
    "olmo3": {"layer_types": ["sliding_attention", "full_attention"]},
}


@pytest.mark.parametrize("model_type", list(WINDOWED))
def test_a_window_as_long_as_the_rows_keeps_prefix_sharing_exact(model_type):
    model = build(model_type, {**ATTENTION, **WINDOWED[model_type], "sliding_window": 64})
    assert decide_pair_layout(model, "auto", max_row_tokens=MAX_ROW_TOKENS).name == SHARED_PREFIX
    rows = random_rows()
    with torch.no_grad():
        assert (score_pairs(model, rows, batch_size=2).double() - plain_pairs(model, rows)).abs().max() < 1e-4
    assert decide_pair_layout(model, "auto", max_row_tokens=128).name == SEPARATE
    # Rows of unknown length may cross any window.
    assert decide_pair_layout(model, "auto").name == SEPARATE


def test_a_model_that_is_not_causal_is_refused_naming_what_to_set():
    model = build("bert", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "is_decoder": False})
    with pytest.raises(UnsupportedModelError, match=r"BertLMHeadModel is not causal: .*; set is_decoder=True in its config"):
        check_model_supported(model)


def test_a_model_that_cannot_be_batched_is_refused_at_start():
    # ProphetNet's decoder scores a right-padded row differently from the same row alone.
    overrides = {
        "hidden_size": 64, "num_encoder_layers": 1, "num_decoder_layers": 2, "num_encoder_attention_heads": 4,
        "num_decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "is_decoder": True,
    }
    model = build("prophetnet", overrides, "eager")
    with pytest.raises(UnsupportedModelError, match=r"ProphetNetForCausalLM cannot be batched: right-padded rows score .* away from the same rows alone"):
        decide_pair_layout(model, "auto", max_row_tokens=MAX_ROW_TOKENS)
    assert getattr(model, "irpo_pair_layout", None) is None  # nothing was remembered for it


def test_attention_without_a_custom_mask_means_separate_rows():
    config = AutoConfig.for_model("llama", **ATTENTION)
    config._attn_implementation = "flash_attention_2"
    assert config_verdict(config, MAX_ROW_TOKENS) == (False, "flash_attention_2 attention takes no custom mask")
    config._attn_implementation = "flex_attention"
    assert config_verdict(config, MAX_ROW_TOKENS)[0] is True


def test_longrope_bounds_the_pairs_a_model_scores_exactly():
    config = AutoConfig.for_model(
        "phi3",
        **ATTENTION,
        max_position_embeddings=512,
        original_max_position_embeddings=64,
        rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "original_max_position_embeddings": 64},
    )
    limit, reason = position_limit(config)
    assert limit == 64 and "longrope RoPE changes its frequencies for batches longer than 64" in reason
    assert position_limit(AutoConfig.for_model("gpt2", n_positions=128)) == (128, "max_position_embeddings is 128")


def test_score_pairs_refuses_a_pair_longer_than_the_layout_allows_instead_of_truncating():
    model = build("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 24})
    layout = decide_pair_layout(model, "auto", max_row_tokens=24)
    assert layout.max_pair_tokens == 24 and layout.max_length(256) == 24
    rows = random_rows()
    assert [layout.fits(r) for r in rows] == [True, False, True, False, True]
    with pytest.raises(ValueError, match=r"rows\[1\] is longer than GPT2LMHeadModel scores exactly: max_position_embeddings is 24"):
        score_pairs(model, rows, batch_size=2)


def test_a_layout_set_on_a_model_is_the_one_score_pairs_uses():
    model = build("mistral", {**ATTENTION, "sliding_window": WINDOW})
    rows = random_rows()
    set_pair_layout(model, PairLayout(SHARED_PREFIX, "forced, to show that score_pairs follows the model's layout"))
    with torch.no_grad():
        wrong = score_pairs(model, rows, batch_size=2)
        assert (wrong.double() - plain_pairs(model, rows)).abs().max() > 1e-2  # the silently wrong numbers the issue found
    # Without a decision, score_pairs decides with the defaults (rows of unknown length: any window counts).
    fresh = build("mistral", {**ATTENTION, "sliding_window": WINDOW})
    with torch.no_grad():
        assert (score_pairs(fresh, rows, batch_size=2).double() - plain_pairs(fresh, rows)).abs().max() < 1e-4
    assert pair_layout_of(fresh).name == SEPARATE


def test_a_16_bit_model_is_measured_in_float32_and_given_back_bit_for_bit():
    # LFM2's convolutions move packed log-probs by ~3e-4 nats per token here: less than bfloat16 rounding, plain in float32.
    model = build("lfm2", {**ATTENTION, "layer_types": ["conv", "full_attention"]}).to(torch.bfloat16)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    exact, reason = measured_verdict(model, MAX_ROW_TOKENS)
    assert not exact, reason
    after = model.state_dict()
    assert all(after[name].dtype == tensor.dtype and torch.equal(after[name], tensor) for name, tensor in before.items())


@pytest.mark.slow
def test_the_architecture_sweep_runs_and_counts():
    command = [sys.executable, "benchmarks/architecture_sweep.py", "--only", "llama,mistral,mamba,xlnet"]
    finished = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    counts = json.loads(finished.stdout.strip().splitlines()[-1])
    assert counts["model_types"] == 4 and counts["wrong"] == 0
    assert (counts["exact_shared_prefix"], counts["exact_separate"], counts["refused"]) == (1, 2, 1)


def test_a_model_on_the_meta_device_is_decided_from_its_config_or_told_to_take_the_decision_of_another_process():
    with torch.device("meta"):
        llama = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=VOCABULARY, **ATTENTION))
        opt = build("opt", OVERRIDES["opt-measured"])
    assert decide_pair_layout(llama, "auto", max_row_tokens=MAX_ROW_TOKENS).name == SHARED_PREFIX
    with pytest.raises(ValueError, match="weights are on the meta device: decide on a process that holds the weights .* set_pair_layout"):
        decide_pair_layout(opt, "auto", max_row_tokens=MAX_ROW_TOKENS)


@pytest.mark.slow
def test_a_fit_run_on_a_sliding_window_model_trains_on_exact_log_probs(tmp_path):
    """Mistral with a window of 4 tokens, far shorter than a pair: the run picks separate rows, and the
    reference log-probs it trained against (reference_logps/) equal plain forwards of each completion alone."""
    import os
    import subprocess
    import sys

    import yaml
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM

    from irpo_pl.data import cut_after_divergence
    from irpo_pl.models import build_word_tokenizer, encode_completion, encode_prompt, format_prompt
    from irpo_pl.tasks import get_task

    repo = Path(__file__).resolve().parents[1]
    tokenizer = build_word_tokenizer(get_task("toy", num_train=10, num_test=10).vocabulary())
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        sliding_window=4, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    tokenizer.save_pretrained(tmp_path / "mistral")
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "irpo_pl", "fit", "--config", str(repo / "configs" / "toy.yaml"), "--run_dir", str(run),
         "--data.task.args", '{"num_train": 200, "num_test": 24}', "--data.task", '{"gold_chains": null}', "--model.policy.name_or_path", str(tmp_path / "mistral"),
         "--warm_start.steps", "0", "--iterations", "1", "--data.sampling.questions_per_iteration", "16", "--data.sampling.num_samples", "4",
         "--data.sampling.max_new_tokens", "40", "--data.batch_size", "8", "--trainer.enable_progress_bar", "false"],
        capture_output=True, text=True, cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "pair layout separate for MistralForCausalLM: its sliding window of 4 tokens" in done.stdout

    model = AutoModelForCausalLM.from_pretrained(run / "iteration_0" / "model").eval()
    saved_tokenizer = AutoTokenizer.from_pretrained(run / "iteration_0" / "model")

    def alone(prompt: list[int], completion: list[int]) -> float:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).sum().item()

    pairs, reference = load_from_disk(str(run / "iteration_1" / "pairs")), load_from_disk(str(run / "iteration_1" / "reference_logps"))
    assert len(pairs) == len(reference) > 0
    # The config may score each loser only up to a few tokens past its winner; the plain pass scores what the run scored.
    cut = yaml.safe_load((run / "config.yaml").read_text())["data"]["init_args"]["pairs"]["rejected_tokens_after_divergence"]
    for pair, logps in zip(pairs, reference):
        prompt = encode_prompt(saved_tokenizer, format_prompt(saved_tokenizer, pair["prompt"]))
        completions = {side: encode_completion(saved_tokenizer, pair[side]) for side in ("chosen", "rejected")}
        if cut is not None:
            completions["rejected"] = cut_after_divergence(completions["chosen"], completions["rejected"], cut)
        for side, completion in completions.items():
            plain = alone(prompt, completion)
            assert abs(logps[side] - plain) <= 1e-4 + 1e-6 * abs(plain), (side, logps[side], plain)
