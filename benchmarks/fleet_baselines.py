"""Baselines for a fleet run: each device alone, and one central fine-tune on all devices' data.

    python benchmarks/fleet_baselines.py --task har --data-dir ../shared/data --model runs/har-model \
        --clients 8 --partition by-subject --epochs 100

Prints JSON: the task-test accuracy before, of each device's own adapter (and its mean),
of the central adapter; and each device's accuracy on its own test data. Same method,
rank, batch and learning rate as the fleet; ``--epochs`` should equal the fleet's rounds
times its epochs per round, so that every device trains as many epochs in total.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from edgetune import FineTuner
from edgetune.fleet.partition import make_fleet
from edgetune.quant import load_any


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--partition", default="iid")
    p.add_argument("--method", default="skip2-lora")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.01)
    args = p.parse_args()
    model = load_any(args.model)
    fleet = make_fleet(args.task, args.data_dir, args.partition, args.clients)
    t = fleet.task
    kw = dict(epochs=args.epochs, lr=args.lr, batch_size=20, seed=0)
    before = FineTuner(model, args.method, **kw).score(t.x_test, t.y_test)
    alone = {}
    for d in fleet.devices:
        tuner = FineTuner(model, args.method, **kw).fit(d.x_train, d.y_train)
        alone[d.name] = {"task_test": tuner.score(t.x_test, t.y_test), "own_test": tuner.score(d.x_test, d.y_test)}
    x = np.concatenate([d.x_train for d in fleet.devices])
    y = np.concatenate([d.y_train for d in fleet.devices])
    central = FineTuner(model, args.method, **kw).fit(x, y)
    print(json.dumps({
        "accuracy_before": before,
        "alone": alone,
        "alone_task_test_mean": float(np.mean([v["task_test"] for v in alone.values()])),
        "alone_own_test_mean": float(np.mean([v["own_test"] for v in alone.values()])),
        "central_task_test": central.score(t.x_test, t.y_test),
        "central_own_test": {d.name: central.score(d.x_test, d.y_test) for d in fleet.devices},
        "central_train_seconds": central.history_.summary()["train_seconds"],
    }, indent=1))


if __name__ == "__main__":
    main()
