"""Reasoning tasks, looked up by name or by class path."""

from __future__ import annotations

import importlib

from irpo_pl.tasks.arc import ArcChallengeTask
from irpo_pl.tasks.base import Task, read_jsonl
from irpo_pl.tasks.gsm8k import GSM8KTask
from irpo_pl.tasks.math import MathTask
from irpo_pl.tasks.toy import ToyTask

TASKS: dict[str, type[Task]] = {
    "toy": ToyTask,
    "gsm8k": GSM8KTask,
    "math": MathTask,
    "arc_challenge": ArcChallengeTask,
}


def get_task(name: str, **kwargs) -> Task:
    """A task by registered name (`toy`, `gsm8k`, ...) or by class path (`my_pkg.tasks.MyTask`)."""
    if name in TASKS:
        return TASKS[name](**kwargs)
    if "." in name:
        module_name, _, class_name = name.rpartition(".")
        try:
            task_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"task: cannot import {name!r} ({error})") from None
        if not (isinstance(task_class, type) and issubclass(task_class, Task)):
            raise ValueError(f"task: {name!r} is not a subclass of irpo_pl.tasks.Task")
        return task_class(**kwargs)
    raise ValueError(f"task: unknown task {name!r}; known: {sorted(TASKS)}, or give a class path like 'my_pkg.MyTask'")


__all__ = ["TASKS", "Task", "ToyTask", "get_task", "read_jsonl"]
