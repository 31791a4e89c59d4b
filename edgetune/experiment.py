"""One fine-tuning experiment on a task: accuracy before and after, time, memory.

Shared by ``edgetune finetune`` and ``edgetune reproduce`` so that both report the same
keys, computed the same way.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .api import FineTuner, pretrain
from .data.task import Task
from .errors import DataError, UsageError
from .nn.mlp import Backbone


def backbone_accuracy(backbone: Backbone, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(backbone.forward(backbone.prepare(x)).argmax(axis=1) == y))


def check_compatible(backbone: Backbone, task: Task) -> None:
    if backbone.sizes[0] != task.n_features or (len(task.input_shape) > 1 and task.input_shape != backbone.input_shape):
        want = backbone.sizes[0] if len(backbone.input_shape) == 1 else list(backbone.input_shape)
        have = task.n_features if len(task.input_shape) == 1 else list(task.input_shape)
        raise DataError(f"the model takes {want} features but task '{task.name}' has {have}")
    if backbone.sizes[-1] != task.n_classes:
        raise DataError(f"the model has {backbone.sizes[-1]} outputs but task '{task.name}' has {task.n_classes} classes")


def pretrain_on_task(task: Task, *, hidden: list[int] | None = None, arch: str | None = None,
                     epochs: int | None = None, lr: float | None = None, batch_size: int | None = None,
                     optimizer: str | None = None, seed: int = 0,
                     progress: bool | None = False) -> tuple[Backbone, dict[str, Any]]:
    """Pre-train on the task's pre-train split: ``arch`` (an architecture string, or 'cnn' for
    the task's convolutional preset), else ``hidden`` widths, else the task's default."""
    d = task.defaults
    if arch == "cnn":
        arch = d.get("arch")
        if arch is None:
            raise UsageError(f"task '{task.name}' has no convolutional preset (its samples are flat); write an "
                             f"architecture with --arch, or use its channels-first variant (e.g. damage1-1d)")
    if arch is None and hidden is None:
        arch = d.get("arch")
    hidden = hidden or d.get("hidden", [96, 96])
    model, hist = pretrain(task.x_pretrain, task.y_pretrain, hidden=hidden, arch=arch, labels=task.labels,
                           epochs=epochs or d.get("pretrain_epochs", d.get("epochs", 100)),
                           lr=lr or d.get("pretrain_lr", d.get("lr", 0.01)),
                           batch_size=batch_size or d.get("batch_size", 20),
                           optimizer=optimizer or d.get("pretrain_optimizer", "sgd"),
                           seed=seed, progress=progress)
    report = {"task": task.name, "sizes": model.sizes, "arch": arch, "pretrain_epochs": len(hist.epochs),
              "pretrain_seconds": hist.train_seconds, "pretrain_final_loss": hist.final_loss,
              "accuracy_pretrain": backbone_accuracy(model, task.x_pretrain, task.y_pretrain),
              "accuracy_test": backbone_accuracy(model, task.x_test, task.y_test)}
    for name, (x, y) in task.extra_tests.items():
        report[f"accuracy_{name}"] = backbone_accuracy(model, x, y)
    return model, report


def finetune_on_task(task: Task, backbone: Backbone, method: str, *, method_options: dict[str, Any] | None = None,
                     train_options: dict[str, Any] | None = None, curve: bool = False,
                     progress: bool | None = False, checkpoint: str | None = None,
                     checkpoint_every: int | None = None,
                     int8_cache: bool = False, val_fraction: float | None = None,
                     keep_cache: bool = True) -> tuple[FineTuner, dict[str, Any]]:
    """Fine-tune ``backbone`` on the task's fine-tune split and report test accuracy before/after.

    With ``curve`` the test accuracy is measured after every epoch (its time is recorded
    as evaluation, not training). ``int8_cache`` gives skip2-lora an int8 skip-cache
    (calibrated on the pre-train split when the backbone is float). ``val_fraction`` holds
    that share of the fine-tune split out (seeded) as validation data, measured every epoch:
    what early stopping (``patience`` in ``train_options``) watches. ``keep_cache=False`` frees
    the skip-cache once trained, before the test sets are scored, for a caller that fits no more
    (the tuner's next fit would rebuild it; its statistics are in the result either way).
    """
    check_compatible(backbone, task)
    d = task.defaults
    t = {"epochs": d.get("epochs", 100), "batch_size": d.get("batch_size", 20), "lr": d.get("lr", 0.01),
         **{k: v for k, v in (train_options or {}).items() if v is not None}}
    tuner = FineTuner(backbone, method, progress=progress, **(method_options or {}), **t)
    if int8_cache:
        from .quant import attach_int8_cache

        attach_int8_cache(tuner.method, len(task.y_finetune), x_calib=task.x_pretrain)
    before = {"accuracy_before": backbone_accuracy(backbone, task.x_test, task.y_test)}
    for name, (x, y) in task.extra_tests.items():
        before[f"{name}_accuracy_before"] = backbone_accuracy(backbone, x, y)
    x_ft, y_ft = task.x_finetune, task.y_finetune
    if val_fraction is not None:
        if curve:
            raise UsageError("a validation split and the test-accuracy curve both use the per-epoch evaluation; "
                             "choose one")
        if not 0.0 < val_fraction < 1.0:
            raise UsageError(f"the validation share must be between 0 and 1, got {val_fraction}")
        order = np.random.default_rng([tuner.config.seed, 3]).permutation(len(y_ft))
        n_val = int(round(val_fraction * len(y_ft)))
        if n_val < 1 or n_val >= len(y_ft):
            raise UsageError(f"a validation share of {val_fraction} of {len(y_ft)} fine-tune samples leaves "
                             f"{n_val} for validation and {len(y_ft) - n_val} for training; both need at least 1")
        val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
        tuner.fit(x_ft[train], y_ft[train], x_val=x_ft[val], y_val=y_ft[val], checkpoint=checkpoint,
                  checkpoint_every=checkpoint_every)
    elif curve:
        tuner.fit(x_ft, y_ft, x_val=task.x_test, y_val=task.y_test, checkpoint=checkpoint,
                  checkpoint_every=checkpoint_every)
    else:
        tuner.fit(x_ft, y_ft, checkpoint=checkpoint, checkpoint_every=checkpoint_every)
    hist = tuner.history_
    assert hist is not None
    if not keep_cache:
        tuner.release()
    result: dict[str, Any] = {"task": task.name, "method": method, **hist.summary(), **before,
                              "accuracy_after": tuner.score(task.x_test, task.y_test),
                              "finetune_samples": int(len(task.y_finetune)), "test_samples": int(len(task.y_test)),
                              "sizes": backbone.sizes,
                              "rank": tuner.method.options.rank, "alpha": tuner.method.options.alpha or tuner.method.options.rank,
                              "batch_size": tuner.config.batch_size, "lr": tuner.config.lr,
                              "optimizer": tuner.config.optimizer, "seed": tuner.config.seed}
    for name, (x, y) in task.extra_tests.items():
        result[f"{name}_accuracy_after"] = tuner.score(x, y)
    if int8_cache:
        result["cache"] = "int8"
    if curve:
        result["curve"] = [e.val_accuracy for e in hist.epochs]
    if val_fraction is not None:
        result["validation_samples"] = n_val
        result["finetune_samples"] = int(len(y_ft) - n_val)
        result["val_loss_curve"] = [e.val_loss for e in hist.epochs]
    return tuner, result
