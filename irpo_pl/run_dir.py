"""The run directory: its layout, atomic writes, and what a re-run may reuse.

Everything is written to a temporary name and then renamed, so a kill at any
moment leaves either the old version of a file or the new one, never half.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

CONFIG_FILE = "config.yaml"

# Options that may change between a run and its resumption: where it is, how far it goes, and how
# it is run and watched. (A longer run needs a longer temperature schedule: the loop checks that
# the iterations already run agree with it.)
RESUMABLE_CHANGES = {
    "run_dir", "overwrite", "iterations", "config", "print_config", "ckpt_path", "weights_only",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.logger",
    "trainer.callbacks", "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.profiler",
    "trainer.default_root_dir", "trainer.log_every_n_steps",
}


def write_json(path: Path, value) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2))
    os.replace(partial, path)


def replace_dir(partial: Path, final: Path) -> None:
    """Move a finished folder into place; the old one, if any, is removed only after the new one is complete."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_model(model, tokenizer, path: Path, state_dict: dict | None = None) -> None:
    """save_pretrained of model and tokenizer (safetensors), moved into place once complete.

    `state_dict` gives the weights when the model's own are sharded across processes.
    """
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, state_dict=state_dict)
    tokenizer.save_pretrained(partial)
    replace_dir(partial, path)


def open_run_dir(run_dir: Path, config: dict, write_config: Callable[[Path], None], overwrite: bool, main_process: bool = True) -> list[dict]:
    """Create `run_dir`, or reopen it to resume; returns the summary rows of finished iterations.

    Only the main process deletes (--overwrite) or writes; the others just read.

    A run directory remembers its config (config.yaml, written by `write_config`). Re-running
    with a different one (other than the options in RESUMABLE_CHANGES) is refused, since mixing
    the two runs' iterations would make a summary that no single config produced.
    """
    if main_process and overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_config = run_dir / CONFIG_FILE
    if saved_config.exists():
        previous, current = _comparable(yaml.safe_load(saved_config.read_text())), _comparable(config)
        changed = sorted(key for key in set(previous) | set(current) if previous.get(key) != current.get(key))
        if changed:
            raise ValueError(
                f"{run_dir} holds a run made with different settings ({', '.join(changed)}); "
                "pass --overwrite true to start it over, or choose another --run_dir"
            )
    elif main_process:
        write_config(saved_config)
    summary_path = run_dir / "summary.json"
    return json.loads(summary_path.read_text())["iterations"] if summary_path.exists() else []


def _comparable(config: dict) -> dict:
    """The config flattened to dotted keys, without the options a resumed run may change."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = value

    walk("", config)
    return {key: value for key, value in flat.items() if not _resumable(key)}


def _resumable(key: str) -> bool:
    return key.endswith(".temperatures") or any(key == option or key.startswith(option + ".") for option in RESUMABLE_CHANGES)
