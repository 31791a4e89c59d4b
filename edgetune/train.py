"""The training loop: seeded mini-batches, epochs, evaluation and a per-phase timing.

Every run records, per epoch, the seconds spent in the forward pass (including skip-cache
reads), the backward pass (loss gradient included) and the parameter update, as in the
Skip2-LoRA paper's tables. Evaluation time is recorded apart and never counted as training.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import EdgetuneError, UsageError
from .methods.base import Method
from .nn.losses import SoftmaxCrossEntropyGrad, cross_entropy_from_logits
from .optim import OPTIMIZERS, make_optimizer
from .progress import Progress


#: With ``fit(checkpoint=...)`` and no ``checkpoint_every``: save when this much time has passed.
#: A save writes and fsyncs the whole state; every epoch of a 0.1 ms skip2-lora run would
#: spend most of its time saving.
CHECKPOINT_SECONDS = 10.0


class TrainingDiverged(EdgetuneError):
    """The loss became NaN or inf, or exploded far above where it started; parameters are
    restored to an epoch before that."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 20
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    patience: int | None = None   # stop after this many epochs without a better validation loss
    shuffle: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise UsageError(f"{name} must be a whole number >= 1, got {v!r}")
        real = (int, float, np.integer, np.floating)
        if not (isinstance(self.lr, real) and not isinstance(self.lr, bool) and np.isfinite(self.lr)
                and self.lr > 0):
            raise UsageError(f"lr must be a positive number, got {self.lr!r}")
        self.lr = float(self.lr)
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer '{self.optimizer}': use one of {', '.join(OPTIMIZERS)}")
        if self.patience is not None and (not isinstance(self.patience, (int, np.integer))
                                          or isinstance(self.patience, bool) or self.patience < 1):
            raise UsageError(f"patience must be a whole number >= 1 or None, got {self.patience!r}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or self.seed < 0:
            raise UsageError(f"seed must be a whole number >= 0, got {self.seed!r}")
        self.epochs, self.batch_size, self.seed = int(self.epochs), int(self.batch_size), int(self.seed)
        if self.patience is not None:
            self.patience = int(self.patience)


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    seconds: float
    forward_seconds: float
    backward_seconds: float
    update_seconds: float
    val_loss: float | None = None
    val_accuracy: float | None = None
    eval_seconds: float = 0.0


@dataclass
class History:
    method: str
    trainable_params: int
    config: dict[str, Any]
    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    memory: dict[str, int] = field(default_factory=dict)
    cache: dict[str, int] = field(default_factory=dict)
    engine: str = "numpy"
    #: The last epoch a checkpoint held when this run resumed from it (None: a fresh start).
    resumed_from_epoch: int | None = None

    def _sum(self, key: str) -> float:
        return float(sum(getattr(e, key) for e in self.epochs))

    @property
    def train_seconds(self) -> float:
        return self._sum("seconds")

    @property
    def final_loss(self) -> float:
        return self.epochs[-1].loss if self.epochs else float("nan")

    def summary(self) -> dict[str, Any]:
        """The totals reported by the CLI and ``reproduce``."""
        first = self.epochs[0].seconds if self.epochs else 0.0
        later = [e.seconds for e in self.epochs[1:]]
        return {
            "method": self.method, "engine": self.engine, "trainable_params": self.trainable_params,
            "epochs": len(self.epochs),
            "train_seconds": self.train_seconds, "forward_seconds": self._sum("forward_seconds"),
            "backward_seconds": self._sum("backward_seconds"), "update_seconds": self._sum("update_seconds"),
            "first_epoch_seconds": first,
            "later_epoch_seconds": float(np.mean(later)) if later else None,
            "final_loss": self.final_loss, "best_epoch": self.best_epoch, "stopped_early": self.stopped_early,
            "resumed_from_epoch": self.resumed_from_epoch,
            **self.memory, **self.cache,
        }

    def as_dict(self) -> dict[str, Any]:
        return {**self.summary(), "config": self.config, "history": [asdict(e) for e in self.epochs]}


def evaluate(method: Method, x: np.ndarray, y: np.ndarray, batch: int = 4096) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``method`` on prepared inputs ``x``."""
    return score_logits(predict_logits(method, x, batch), y)


def score_logits(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    return cross_entropy_from_logits(logits, y), float(np.mean(logits.argmax(axis=1) == y))


def predict_logits(method: Method, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    if len(x) <= batch:
        return method.predict_logits(x)
    return np.concatenate([method.predict_logits(x[i:i + batch]) for i in range(0, len(x), batch)])


class NumpyRunner:
    """Runs epochs on the NumPy engine: the method's forward and backward, batch by batch."""

    name = "numpy"

    def __init__(self, method: Method, opt: Any, x: np.ndarray, y: np.ndarray, batch_size: int):
        self.method, self.opt, self.x, self.y, self.bs = method, opt, x, y, batch_size
        self.loss_grad = SoftmaxCrossEntropyGrad(method.backbone.sizes[-1])
        self.eager = getattr(method, "uses_cache", False) and getattr(method.options, "cache_fill", "") == "eager"

    def run(self, orders: np.ndarray) -> list[Any]:
        from .core.engine import EpochResult

        method, x, y, bs, clock = self.method, self.x, self.y, self.bs, time.perf_counter
        n = len(x)
        out = []
        for order in orders:
            snapshot = method.params.flat.copy()
            y_order = y[order]
            self.loss_grad.start_epoch(n, x.dtype)
            t_fwd = t_bwd = t_upd = 0.0
            start = clock()
            if self.eager:
                method.fill_cache(x)
                self.eager = False
                t_fwd += clock() - start
            for lo in range(0, n, bs):
                t0 = clock()
                logits = method.forward(x, order[lo:lo + bs])
                t1 = clock()
                method.backward(self.loss_grad(logits, y_order[lo:lo + bs]))
                t2 = clock()
                self.opt.step()
                t3 = clock()
                t_fwd += t1 - t0
                t_bwd += t2 - t1
                t_upd += t3 - t2
            seconds = clock() - start
            epoch_loss = self.loss_grad.epoch_loss()
            diverged = not np.isfinite(epoch_loss) or not np.all(np.isfinite(method.params.flat))
            if diverged:
                method.params.flat[...] = snapshot
            out.append(EpochResult(epoch_loss, seconds, t_fwd, t_bwd, t_upd, diverged))
            if diverged:
                break
        return out

    def predict(self, x: np.ndarray) -> np.ndarray:
        return predict_logits(self.method, x)


def make_runner(engine: str | None, method: Method, opt: Any, x: np.ndarray, y: np.ndarray,
                batch_size: int, keep: dict | None = None) -> Any:
    """The epoch runner of ``engine`` ('auto', 'c', 'numpy'; None: EDGETUNE_ENGINE or 'auto').

    ``keep`` (a dict the caller holds between fits) keeps the compiled engine's structs: they are
    reused while the method runs on the same backbone key (``fit_key``, set by methods that guard
    their backbone) and the same transposed weights, and rebuilt otherwise.
    """
    from .core.engine import CoreModel, CoreRunner, resolve_engine

    fit_key = getattr(method, "fit_key", None)
    if keep is None or fit_key is None:
        if resolve_engine(engine, method, type(opt).__name__.lower()) != "c":
            return NumpyRunner(method, opt, x, y, batch_size)
        return CoreRunner(method, opt, x, y, batch_size)
    # What decides the engine: the request, EDGETUNE_ENGINE, the optimizer, the backbone's state.
    question = (engine, os.environ.get("EDGETUNE_ENGINE"), type(opt).__name__, fit_key)
    if keep.get("engine", (None,))[0] != question:
        keep["engine"] = (question, resolve_engine(engine, method, type(opt).__name__.lower()))
    if keep["engine"][1] != "c":
        return NumpyRunner(method, opt, x, y, batch_size)
    wt = method.core_spec().wt
    kept = keep.get("core")
    if kept is None or kept[0] != fit_key or kept[1] is not wt or kept[2].batch != batch_size:
        kept = keep["core"] = (fit_key, wt, CoreModel(method, batch_size))
    keep["runner"] = CoreRunner(method, opt, x, y, batch_size, model=kept[2], previous=keep.get("runner"))
    return keep["runner"]


def _generator(seed: int, keep: dict | None) -> np.random.Generator:
    """``np.random.default_rng(seed)``, as it is when made; with ``keep``, one generator per
    caller reset to that state (cheaper than seeding one again; the same draws)."""
    if keep is None:
        return np.random.default_rng(seed)
    kept = keep.get("rng")
    if kept is None or kept[0] != seed:
        rng = np.random.default_rng(seed)
        keep["rng"] = (seed, rng, rng.bit_generator.state)
        return rng
    kept[1].bit_generator.state = kept[2]
    return kept[1]


def epoch_orders(rng: np.random.Generator, n: int, count: int, shuffle: bool = True) -> np.ndarray:
    """``count`` epochs' sample orders (int32, one row per epoch): ``rng.permutation(n)`` per
    epoch, drawn by the compiled engine when it can (the same numbers, the generator left in the
    same state; see ``core.engine.permutations``), else by NumPy; 0..n-1 without ``shuffle``."""
    if not shuffle:
        return np.tile(np.arange(n, dtype=np.int32), (count, 1))
    from .core import engine

    orders = engine.permutations(rng, n, count)
    if orders is None:
        orders = np.empty((count, n), np.int32)
        for i in range(count):
            orders[i] = rng.permutation(n)
    return orders


#: A finite loss this many times the first epoch's (and above ``EXPLODED_LOSS``) has diverged too:
#: with Adam at a huge learning rate the loss can stay finite at 1e12 while nothing is learnt.
EXPLODED_FACTOR = 1e6
EXPLODED_LOSS = 1e3


def _exploded(loss: float, earlier: list[EpochRecord], n_classes: int) -> bool:
    """True when a finite ``loss`` is far above where training started.

    The first epoch is compared with ln(classes), the loss of a model that knows nothing."""
    if loss <= EXPLODED_LOSS:
        return False
    start = earlier[0].loss if earlier else max(float(np.log(n_classes)), 1.0)
    return loss > EXPLODED_FACTOR * start


def _divergence_hint(x: np.ndarray, config: TrainConfig) -> str:
    """What to change: the data's scaling when the inputs themselves are extreme, else the lr."""
    with np.errstate(invalid="ignore"):
        peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > 1e6:
        return (f"The inputs reach {peak:.3g} after normalisation: check the data's units/scaling "
                f"(inputs of a few units train best).")
    return f"Lower the learning rate (now {config.lr})."


def _chunk(epoch_seconds: float) -> int:
    """Epochs per call of the runner: about a quarter of a second of them, 1 to 1000."""
    return int(min(max(1, 0.25 / max(epoch_seconds, 1e-6)), 1000))


def fit(method: Method, x: np.ndarray, y: np.ndarray, config: TrainConfig, *,
        x_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
        callback: Callable[[EpochRecord], bool | None] | None = None,
        progress: bool | None = False, checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int | None = None, engine: str | None = None, keep: dict | None = None) -> History:
    """Train ``method`` on prepared inputs ``x`` (row i is sample id i) and labels ``y``.

    ``callback(record)`` runs after each epoch and may return True to stop. With
    ``x_val``/``y_val`` every epoch is evaluated (time recorded apart); ``config.patience``
    then stops early and restores the parameters of the best epoch. With ``checkpoint``
    the run's state is saved atomically every ``checkpoint_every`` epochs (None: whenever
    ``CHECKPOINT_SECONDS`` of training have passed since the last save, and at the end), and a run
    started again with the same file continues where it stopped, bit-identically.
    ``engine``: 'auto' (the compiled engine when built, else NumPy), 'c' or 'numpy'; None
    reads EDGETUNE_ENGINE. ``keep``: a dict held by the caller between fits, where the engine's
    structs are kept (see ``make_runner``).
    """
    n = len(x)
    if len(y) != n:
        raise UsageError(f"x has {n} samples but y has {len(y)}")
    n_classes = method.backbone.sizes[-1]
    if n == 0 or y.min() < 0 or y.max() >= n_classes:
        raise UsageError(f"labels must be class indices 0..{n_classes - 1} for {n} >= 1 samples")
    validate = x_val is not None and y_val is not None
    if config.patience is not None and not validate:
        raise UsageError("patience (early stopping) needs validation data: pass x_val and y_val")
    rng = _generator(config.seed, keep)
    opt = make_optimizer(config.optimizer, method.params, config.lr, momentum=config.momentum,
                         weight_decay=config.weight_decay)
    hist = History(method=method.name, trainable_params=method.n_trainable, config=dict(vars(config)))
    best_loss, best_params, since_best = np.inf, None, 0
    bs = min(config.batch_size, n)  # a batch beyond the data is the whole data: the same on both engines
    clock = time.perf_counter
    first_epoch = 1
    if checkpoint is not None:
        if checkpoint_every is not None and (not isinstance(checkpoint_every, (int, np.integer))
                                             or isinstance(checkpoint_every, bool) or checkpoint_every < 1):
            raise UsageError(f"checkpoint_every must be a whole number >= 1 (or None: by time), got {checkpoint_every!r}")
        from . import checkpoint as ckpt  # only a run with a checkpoint reads or writes one

        fp = ckpt.fingerprint(method, config, x, y, x_val, y_val)
        journal = ckpt.HistoryJournal(checkpoint)  # each save appends only the epochs since the last one
        saved = ckpt.load(checkpoint, fp, journal)
        if saved is not None:
            method.params.flat[...] = saved["params"]
            try:
                opt.load_state(saved["optimizer"])
            except UsageError as e:
                raise ckpt.ModelFileError(f"{checkpoint}: {e}; delete the checkpoint to start over") from None
            rng.bit_generator.state = saved["rng"]
            hist.epochs = [EpochRecord(**e) for e in saved["history"]]
            best_loss, since_best = saved["best"]["loss"], saved["best"]["since"]
            hist.best_epoch = saved["best"]["epoch"]
            best_params = saved["best_params"]
            hist.stopped_early = bool(saved["best"].get("stopped_early", False))
            # A run that stopped early is finished: resuming it trains nothing more.
            first_epoch = config.epochs + 1 if hist.stopped_early else saved["epoch"] + 1
            hist.resumed_from_epoch = int(saved["epoch"])
            if progress is not False:  # the command line says so; the Python API stays quiet
                print(f"resuming from epoch {saved['epoch']} of {config.epochs} (checkpoint {checkpoint})",
                      file=sys.stderr)
    method.begin_fit(x)
    runner = make_runner(engine, method, opt, x, y, bs, keep)
    hist.engine = runner.name
    bar = Progress(config.epochs, desc=method.name, enabled=progress if progress is not None else None)
    # Epochs with nothing to do in between (no validation, checkpoint or callback) run several per
    # call: the compiled engine then never returns to Python between them.
    batched = not validate and checkpoint is None and callback is None
    # Divergence is detected below, once per epoch; NumPy's per-operation warnings add nothing
    # (the compiled engine's epochs run no NumPy operation: no state to switch there).
    errstate = np.errstate(over="ignore", invalid="ignore") if runner.name != "c" or validate else None
    if errstate is not None:
        errstate.__enter__()
    try:
        bar.update(first_epoch - 1)
        # The first call runs one epoch, to learn how long one takes, unless an earlier fit of the
        # same caller on as many samples said so (``keep``).
        epoch, stop = first_epoch, False
        chunk = keep.get("chunk", {}).get(n, 1) if keep is not None and batched else 1
        last_save = clock()
        while epoch <= config.epochs and not stop:
            count = min(chunk, config.epochs - epoch + 1)
            orders = epoch_orders(rng, n, count, config.shuffle)
            chunk_start, before_chunk = epoch, method.params.flat.copy()
            for res in runner.run(orders):
                epoch_loss = res.loss
                restored_to = epoch - 1
                if not res.diverged and _exploded(epoch_loss, hist.epochs, n_classes):
                    method.params.flat[...] = before_chunk  # the runner only restores after NaN or inf
                    restored_to = chunk_start - 1
                elif not res.diverged:
                    restored_to = None
                if restored_to is not None:
                    raise TrainingDiverged(
                        f"{method.name}: the training loss became {epoch_loss:.4g} in epoch {epoch}; parameters were "
                        f"restored to the end of epoch {restored_to}. {_divergence_hint(x, config)}")
                rec = EpochRecord(epoch, epoch_loss, res.seconds, res.forward_seconds, res.backward_seconds,
                                  res.update_seconds)
                if validate:
                    t0 = clock()
                    rec.val_loss, rec.val_accuracy = score_logits(runner.predict(x_val), y_val)
                    rec.eval_seconds = clock() - t0
                    if rec.val_loss < best_loss:
                        best_loss, since_best, hist.best_epoch = rec.val_loss, 0, epoch
                        if config.patience is not None:
                            best_params = method.params.flat.copy()
                    else:
                        since_best += 1
                hist.epochs.append(rec)
                if config.patience is not None and since_best >= config.patience:
                    hist.stopped_early = True
                if checkpoint is not None and (
                        (clock() - last_save >= CHECKPOINT_SECONDS if checkpoint_every is None
                         else epoch % checkpoint_every == 0) or epoch == config.epochs or hist.stopped_early):
                    last_save = clock()
                    ckpt.save(checkpoint, fp=fp, epoch=epoch, params=method.params.flat, opt_state=opt.state(),
                              rng=rng, history=hist.epochs,
                              best={"loss": float(best_loss), "since": since_best, "epoch": hist.best_epoch,
                                    "stopped_early": hist.stopped_early},
                              best_params=best_params, journal=journal)
                if bar.enabled:
                    bar.update(1, f"loss {epoch_loss:.4f}" + (f" val acc {rec.val_accuracy:.3f}" if validate else ""))
                else:
                    bar.n += 1
                epoch += 1
                if hist.stopped_early or (callback is not None and callback(rec)):
                    stop = True
                    break
            if batched and hist.epochs:  # about a quarter of a second of epochs per call
                chunk = _chunk(hist.epochs[-1].seconds)
                if keep is not None:
                    keep["chunk"] = {n: chunk}
    finally:
        if errstate is not None:
            errstate.__exit__(None, None, None)
        bar.close()
        method.end_fit()
    if best_params is not None and hist.stopped_early:
        method.params.flat[...] = best_params
    hist.memory = method.memory_report()
    cache = getattr(method, "cache", None)
    if cache is not None:
        hist.cache = cache.stats()
    return hist
