"""The run directory: its layout, atomic writes, and what a re-run may reuse.

Everything is written to a temporary name and then renamed, so a kill at any
moment leaves either the old version of a file or the new one, never half.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from irpo_pl.config import RunConfig

# Options that may change between a run and its resumption: where it is, and how far it goes.
RESUMABLE_CHANGES = {"run_dir", "overwrite", "iterations"}


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


def open_run_dir(run_dir: Path, config: RunConfig, main_process: bool = True) -> list[dict]:
    """Create `run_dir`, or reopen it to resume; returns the summary rows of finished iterations.

    Only the main process deletes (--overwrite) or writes; the others just read.

    A run directory remembers its config. Re-running with a different one (other
    than the options in RESUMABLE_CHANGES) is refused, since mixing the two runs'
    iterations would make a summary that no single config produced.
    """
    if main_process and config.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_config = run_dir / "config.json"
    current = _comparable(config)
    if saved_config.exists():
        previous = json.loads(saved_config.read_text())
        changed = sorted(key for key in set(previous) | set(current) if previous.get(key) != current.get(key))
        if changed:
            raise ValueError(
                f"{run_dir} holds a run made with different settings ({', '.join(changed)}); "
                "pass --overwrite true to start it over, or choose another --run_dir"
            )
    elif main_process:
        write_json(saved_config, current)
    summary_path = run_dir / "summary.json"
    return json.loads(summary_path.read_text())["iterations"] if summary_path.exists() else []


def _comparable(config: RunConfig) -> dict:
    """The config flattened to dotted keys, without the options a resumed run may change."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and prefix not in ("task.args",):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = value

    walk("", asdict(config))
    for key in RESUMABLE_CHANGES:
        flat.pop(key, None)
    # A longer run needs a longer temperature schedule; only the iterations already run must agree.
    flat.pop("sampling.temperatures", None)
    return flat
