"""The fleet's Flower apps: a ServerApp whose strategy screens and averages adapters, and a
ClientApp that fine-tunes one device's copy with its cache kept between rounds.

This module imports Flower; the rest of edgetune never imports it. The same apps run on
Flower's simulation engine (``edgetune fleet simulate``) and on its deployment engine
(``edgetune fleet server`` / ``edgetune fleet client``): ``server_app`` and
``client_app`` below are what a SuperLink and a SuperNode load; ``build_server_app`` and
``build_client_app`` bake a configuration in, for the simulation.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import require_flwr

require_flwr()

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from .aggregate import AGGREGATIONS, Tensors, aggregate, payload_bytes, screen_updates, update_norm  # noqa: E402
from .device import DeviceTrainer, TrainSpec, get_device, global_tensors, make_tuner  # noqa: E402
from .partition import make_fleet  # noqa: E402
from .state import load_server_state  # noqa: E402

log = logging.getLogger("flwr")


# ---------------------------------------------------------------- records <-> arrays

def to_record(tensors: Tensors) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()})


def from_record(record: ArrayRecord) -> Tensors:
    return {k: record[k].numpy() for k in record}


# ---------------------------------------------------------------- the client

FAULTS = ("nan", "shape", "norm")
_FLEETS: dict[tuple, Any] = {}


def _apply_fault(wire: Tensors, fault: str) -> Tensors:
    """A misbehaving device, for testing the server's defences."""
    k = sorted(wire)[0]
    bad = dict(wire)
    if fault == "nan":
        bad[k] = np.full_like(wire[k], np.nan)
    elif fault == "shape":
        bad[k] = np.zeros(tuple(s + 1 for s in wire[k].shape), wire[k].dtype)
    elif fault == "norm":
        bad = {n: (v + 1e4).astype(v.dtype) for n, v in wire.items()}
    return bad


def _device(context: Context, spec: TrainSpec, digest: str, defaults: dict[str, Any]) -> tuple[DeviceTrainer, str]:
    cfg = {**defaults, **dict(context.node_config)}
    missing = [k for k in ("model", "task") if not cfg.get(k)]
    if missing:
        raise ValueError(f"this SuperNode's --node-config lacks {', '.join(missing)}")
    pid, k = int(cfg.get("partition-id", 0)), int(cfg.get("num-partitions", 1))
    kind, data_dir = str(cfg.get("partition", "iid")), (str(cfg["data-dir"]) if cfg.get("data-dir") else None)
    seed = int(cfg.get("partition-seed", 0))
    state_root = str(cfg["state-dir"]) if cfg.get("state-dir") else None
    key = (str(cfg["model"]), str(cfg["task"]), data_dir, kind, pid, k, seed, spec, state_root)

    def build() -> DeviceTrainer:
        from ..quant import load_any

        backbone = load_any(str(cfg["model"]))
        if backbone.digest() != digest:
            raise ValueError(f"this device's model {cfg['model']} is not the server's backbone (digests differ)")
        fkey = (str(cfg["task"]), data_dir, kind, k, seed)
        if fkey not in _FLEETS:
            _FLEETS[fkey] = make_fleet(str(cfg["task"]), data_dir, kind, k, seed=seed)
        data = _FLEETS[fkey].devices[pid]
        state_dir = Path(state_root) / f"device-{pid}-of-{k}" if state_root else None
        return DeviceTrainer(backbone, data, spec, state_dir)

    fault = cfg.get("fault") or (cfg.get("faults") or {}).get(pid, "")
    return get_device(key, build), str(fault or "")


def build_client_app(defaults: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``defaults`` fill what a SuperNode's node config does not say
    (model, task, data-dir, partition, state-dir), as in a simulation."""
    defaults = dict(defaults or {})
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        spec = TrainSpec.from_config(cfg)
        dev, fault = _device(context, spec, str(cfg["backbone-digest"]), defaults)
        wire, metrics = dev.train(from_record(msg.content["arrays"]))
        if fault:
            wire = _apply_fault(wire, fault)
            metrics["bytes-up"] = payload_bytes(wire)
        content = RecordDict({"arrays": to_record(wire), "metrics": MetricRecord(metrics),
                              "device": ConfigRecord({"name": dev.data.name})})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        spec = TrainSpec.from_config(cfg)
        dev, _ = _device(context, spec, str(cfg["backbone-digest"]), defaults)
        metrics = dev.evaluate(from_record(msg.content["arrays"]))
        content = RecordDict({"metrics": MetricRecord(metrics), "device": ConfigRecord({"name": dev.data.name})})
        return Message(content=content, reply_to=msg)

    return app


client_app = build_client_app()


# ---------------------------------------------------------------- the server

@dataclass
class ServerSpec:
    """Everything the ServerApp needs, as one JSON string in the run config."""
    model: str
    train: TrainSpec = field(default_factory=TrainSpec)
    rounds: int = 3
    min_clients: int = 2
    aggregation: str = "fedavg"
    task: str | None = None            # central evaluation on this task's test split
    data_dir: str | None = None
    json_path: str | None = None
    state_dir: str | None = None       # checkpoint after every round; a restarted server resumes
    round_timeout: float = 600.0       # seconds to wait for a round's replies
    max_update_norm: float | None = 100.0
    outlier_factor: float | None = 20.0  # with 3+ updates: refuse one farther than this x the median
    min_replies: int = 1               # fewer accepted updates than this: the global adapter stays
    extra: dict[str, Any] = field(default_factory=dict)   # recorded in the results as is

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "ServerSpec":
        d = json.loads(text)
        d["train"] = TrainSpec(**d["train"])
        return cls(**d)


class AdapterStrategy(FedAvg):
    """FedAvg's sampling, with the adapters screened before they are averaged, and the
    choice of averaging A and B apart (``fedavg``) or their products (``product``)."""

    def __init__(self, *, min_clients: int, aggregation: str, max_update_norm: float | None, min_replies: int,
                 outlier_factor: float | None = 20.0):
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=min_clients,
                         min_evaluate_nodes=min_clients, min_available_nodes=min_clients)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}")
        self.aggregation, self.max_update_norm, self.min_replies = aggregation, max_update_norm, min_replies
        self.outlier_factor = outlier_factor
        self.current: Tensors = {}
        self.report: dict[str, Any] = {}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, errors = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        updates, weights, names, metrics, bytes_up = [], [], [], [], 0
        rejected = []
        for msg in valid:
            c = msg.content
            name = str(c["device"]["name"]) if "device" in c.config_records else f"node{msg.metadata.src_node_id}"
            try:
                tensors = from_record(c["arrays"])
                m = dict(c["metrics"])
                n = float(m["num-examples"])
            except (KeyError, TypeError, ValueError) as e:
                rejected.append({"device": name, "reason": f"malformed reply ({e})"})
                continue
            bytes_up += payload_bytes(tensors)
            if not (math.isfinite(n) and n > 0):
                rejected.append({"device": name, "reason": f"num-examples {n} is not a positive count"})
                continue
            updates.append(tensors), weights.append(n), names.append(name), metrics.append(m)
        reasons = screen_updates(updates, self.current, max_norm=self.max_update_norm, how=self.aggregation,
                                 outlier_factor=self.outlier_factor)
        accepted = [i for i, r in enumerate(reasons) if r is None]
        for i, r in enumerate(reasons):
            if r is not None:
                rejected.append({"device": names[i], "reason": r})
        distances: dict[str, float | None] = {}
        for i, u in enumerate(updates):  # what the screening measured, for tuning its limits
            try:
                d = update_norm(u, self.current, self.aggregation)
            except (KeyError, ValueError):
                continue
            distances[names[i]] = d if math.isfinite(d) else None
        for rej in rejected:
            log.warning("round %d: update from %s rejected: %s", server_round, rej["device"], rej["reason"])
        self.report = {
            "clients": [names[i] for i in accepted],
            "rejected": rejected,
            "failed": [{"node": int(m.metadata.src_node_id), "reason": str(m.error.reason)} for m in errors],
            "bytes_up": bytes_up,
            "client_train_seconds": {names[i]: metrics[i].get("train-seconds") for i in range(len(names))},
            "client_accuracy_after_training": {names[i]: metrics[i].get("local-accuracy-after-training")
                                               for i in range(len(names))},
            "client_cache_misses": {names[i]: int(metrics[i].get("cache-misses", 0)) for i in range(len(names))},
            "client_cache_hits": {names[i]: int(metrics[i].get("cache-hits", 0)) for i in range(len(names))},
            "weights": {names[i]: weights[i] for i in accepted},
            "update_distance": distances,
            "product_residual": None,
        }
        if len(accepted) < max(1, self.min_replies):
            log.warning("round %d: %d acceptable updates (< %d): the global adapter stays", server_round,
                        len(accepted), max(1, self.min_replies))
            return None, None
        agg, resid = aggregate([updates[i] for i in accepted], [weights[i] for i in accepted], self.aggregation,
                               reference=self.current)
        self.report["product_residual"] = resid if self.aggregation == "product" else None
        return to_record(agg), MetricRecord({"accepted": len(accepted)})


def _central_evaluator(spec: ServerSpec, backbone):
    """Accuracy of a global adapter on the task's test split (None without a task)."""
    if not spec.task:
        return None
    from ..data.task import load_task

    task = load_task(spec.task, spec.data_dir)
    tuner = make_tuner(backbone, spec.train)
    base = tuner.method.adapter_tensors()

    def accuracy(tensors: Tensors) -> float:
        tuner.method.load_adapter_tensors({**base, **tensors})
        return float(tuner.score(task.x_test, task.y_test))
    return accuracy


def _identity(spec: ServerSpec, digest: str) -> dict[str, Any]:
    return {"backbone": digest, "train": asdict(spec.train), "aggregation": spec.aggregation}


def run_fleet_server(grid: Grid, spec: ServerSpec) -> dict[str, Any]:
    """The rounds: train, screen, aggregate, evaluate, checkpoint; returns the results."""
    from ..io_atomic import write_atomic, write_json_atomic
    from ..quant import load_any

    backbone = load_any(spec.model)
    digest = backbone.digest()
    current = global_tensors(backbone, spec.train)
    central = _central_evaluator(spec, backbone)
    strategy = AdapterStrategy(min_clients=spec.min_clients, aggregation=spec.aggregation,
                               max_update_norm=spec.max_update_norm, min_replies=spec.min_replies,
                               outlier_factor=spec.outlier_factor)
    adapter_bytes = payload_bytes(current)
    results: dict[str, Any] = {
        "method": spec.train.method, "aggregation": spec.aggregation, "rank": spec.train.rank,
        "epochs_per_round": spec.train.epochs, "personal": spec.train.personal,
        "keep_cache": spec.train.keep_cache, "min_clients": spec.min_clients, "task": spec.task,
        "max_update_norm": spec.max_update_norm, "outlier_factor": spec.outlier_factor,
        "adapter_bytes": adapter_bytes, "whole_model_bytes": int(backbone.nbytes),
        "accuracy_before": central(current) if central else None, "rounds": [], **spec.extra,
    }
    state = Path(spec.state_dir) if spec.state_dir else None
    first = 1
    loaded = load_server_state(state) if state is not None else None
    if loaded is not None:
        saved, saved_tensors = loaded
        if saved.get("identity") == _identity(spec, digest):
            current = saved_tensors
            results = saved["results"]
            results["resumed_after_round"] = results["rounds"][-1]["round"]
            first = results["rounds"][-1]["round"] + 1
            log.info("resuming after round %d from %s", first - 1, state)
    base_cfg = {**spec.train.to_config(), "backbone-digest": digest}
    for rnd in range(first, spec.rounds + 1):
        strategy.current = current
        t0 = time.time()
        msgs = list(strategy.configure_train(rnd, to_record(current), ConfigRecord(dict(base_cfg)), grid))
        replies = list(grid.send_and_receive(msgs, timeout=spec.round_timeout))
        arrays, _ = strategy.aggregate_train(rnd, replies)
        rep = strategy.report
        if arrays is not None:
            current = from_record(arrays)
        ev_msgs = list(strategy.configure_evaluate(rnd, to_record(current), ConfigRecord(dict(base_cfg)), grid))
        ev = [m for m in grid.send_and_receive(ev_msgs, timeout=spec.round_timeout) if not m.has_error()]
        client_acc = {str(m.content["device"]["name"]): float(m.content["metrics"]["accuracy"]) for m in ev}
        n_ev = {str(m.content["device"]["name"]): float(m.content["metrics"]["num-examples"]) for m in ev}
        fed_acc = (sum(client_acc[k] * n_ev[k] for k in client_acc) / sum(n_ev.values())) if n_ev else None
        secs = [s for s in rep["client_train_seconds"].values() if s is not None]
        record = {
            "round": rnd,
            "clients": rep["clients"],
            "accuracy": central(current) if central else fed_acc,
            "accuracy_federated": fed_acc,
            "client_accuracy": client_acc,
            "client_accuracy_after_training": rep["client_accuracy_after_training"],
            "bytes_up": rep["bytes_up"],
            "bytes_down": adapter_bytes * len(msgs),
            "bytes_down_evaluate": adapter_bytes * len(ev_msgs),
            "client_train_seconds": rep["client_train_seconds"],
            "client_train_seconds_mean": float(np.mean(secs)) if secs else None,
            "client_cache_misses": rep["client_cache_misses"],
            "client_cache_hits": rep["client_cache_hits"],
            "client_update_distance": rep["update_distance"],
            "rejected": rep["rejected"],
            "failed": rep["failed"],
            "updated": arrays is not None,
            "product_residual": rep["product_residual"],
            "seconds": time.time() - t0,
        }
        results["rounds"].append(record)
        log.info("round %d: %d clients, accuracy %s, %d rejected", rnd, len(rep["clients"]),
                 record["accuracy"], len(rep["rejected"]))
        if state is not None:
            state.mkdir(parents=True, exist_ok=True)
            write_atomic(state / "global.npz", lambda f: np.savez(f, **current))
            write_json_atomic(state / "server.json", {"identity": _identity(spec, digest), "results": results})
    results["totals"] = _totals(results["rounds"])
    if state is not None:
        write_atomic(state / "global.npz", lambda f: np.savez(f, **current))
        write_json_atomic(state / "server.json", {"identity": _identity(spec, digest), "results": results,
                                                 "finished": True})
    if spec.json_path:
        write_json_atomic(spec.json_path, results)
    return results


def _totals(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    first = [s for s in (rounds[0]["client_train_seconds"].values() if rounds else []) if s is not None]
    later = [s for r in rounds[1:] for s in r["client_train_seconds"].values() if s is not None]
    return {
        "rounds": len(rounds),
        "bytes_up": int(sum(r["bytes_up"] for r in rounds)),
        "bytes_down": int(sum(r["bytes_down"] for r in rounds)),
        "bytes_down_evaluate": int(sum(r["bytes_down_evaluate"] for r in rounds)),
        "client_train_seconds": float(sum(first) + sum(later)),
        "client_train_seconds_first_round_mean": float(np.mean(first)) if first else None,
        "client_train_seconds_later_rounds_mean": float(np.mean(later)) if later else None,
        "rejected": int(sum(len(r["rejected"]) for r in rounds)),
        "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
    }


def build_server_app(spec: ServerSpec | None = None, sink: list | None = None) -> ServerApp:
    """A ServerApp running ``spec`` (or the ``spec`` JSON of the run config); the results
    are appended to ``sink`` when one is given."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        s = spec if spec is not None else ServerSpec.from_json(str(context.run_config["spec"]))
        res = run_fleet_server(grid, s)
        if sink is not None:
            sink.append(res)

    return app


server_app = build_server_app()
