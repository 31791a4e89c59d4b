"""edgetune: fine-tune small neural networks on the device where they are deployed.

Five lines::

    import edgetune as et
    model, _ = et.pretrain(x_lab, y_lab, hidden=[96, 96])     # or et.Backbone.load("model")
    tuner = et.FineTuner(model, "skip2-lora", epochs=100).fit(x_field, y_field)
    print(tuner.score(x_test, y_test))
    tuner.save_adapter("adapter")
"""
__version__ = "0.1.0"

from .api import FineTuner, pretrain
from .bank import AdapterBank
from .data.task import Task, load_task
from .errors import BudgetError, DataError, EdgetuneError, ModelFileError, UsageError
from .methods import METHODS, make_method
from .nn.mlp import Backbone
from .train import History, TrainConfig, fit

__all__ = [
    "AdapterBank", "Backbone", "BudgetError", "DataError", "EdgetuneError", "FineTuner", "History", "METHODS",
    "ModelFileError", "Task", "TrainConfig", "UsageError", "fit", "load_task", "make_method", "pretrain",
]
