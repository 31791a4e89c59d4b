"""Data sets and tasks. Built-in loaders are imported lazily by name."""
from .task import BUILTIN_TASKS, Task, load_npz_task, load_task, validate_xy

__all__ = ["BUILTIN_TASKS", "Task", "load_npz_task", "load_task", "validate_xy"]
