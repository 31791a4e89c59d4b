"""edgetune: fine-tune small neural networks on the device where they are deployed.

Five lines::

    import edgetune as et
    model, _ = et.pretrain(x_lab, y_lab, hidden=[96, 96])     # or et.Backbone.load("model")
    tuner = et.FineTuner(model, "skip2-lora", epochs=100).fit(x_field, y_field)
    print(tuner.score(x_test, y_test))
    tuner.save_adapter("adapter")
"""
__version__ = "0.1.0"

import importlib
import importlib.util
from typing import Any

from .errors import BudgetError, DataError, EdgetuneError, ModelFileError, UsageError

# The rest is imported on first use (PEP 562), so that a command imports only what it runs:
# ``edgetune data list`` never loads the trainer, the bank or the stream detectors.
_LAZY = {
    "FineTuner": ".api", "pretrain": ".api", "AdapterBank": ".bank", "Task": ".data.task",
    "load_task": ".data.task", "METHODS": ".methods", "make_method": ".methods", "Backbone": ".nn.mlp",
    "AnomalyDetector": ".stream", "History": ".train", "TrainConfig": ".train", "fit": ".train",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # a subpackage: edgetune.quant, ...
        raise AttributeError(f"module 'edgetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AdapterBank", "AnomalyDetector", "Backbone", "BudgetError", "DataError", "EdgetuneError", "FineTuner", "History",
    "METHODS",
    "ModelFileError", "Task", "TrainConfig", "UsageError", "fit", "load_task", "make_method", "pretrain",
]
