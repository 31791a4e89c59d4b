"""Choose a sparse-update scheme for a memory budget, measured on the user's own task.

After Lin et al., "On-Device Training Under 256KB Memory" (NeurIPS 2022), section 3.2:
a *contribution analysis* measures, one at a time, how much validation accuracy each part
of a scheme buys on top of a baseline that trains the last layer only (its weights and
bias): the biases of the last k layers, and each layer's weights at each channel ratio.
Assuming the gains add up, ``choose_scheme`` then maximises the summed gain over the
schemes whose planned training memory (``memory.plan_memory``) fits the budget, and
``auto_scheme`` checks the prediction with one more fine-tune of the chosen scheme.

Layers count the layers with weights (``backbone.tap_layers``), as the sparse method does.
The last layer's weight always trains at ratio 1 (the classifier, part of the baseline), so
the analysis costs 1 + (n-1) + 4(n-1) short fine-tunes for n such layers (fewer with
``layers``/``ratios``). Everything is measured on a seeded validation split of the data
passed in, which is the fine-tuning data: the test split is never seen.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .errors import BudgetError, UsageError
from .nn.mlp import Backbone

# methods.sparse (RATIOS, SparseScheme) and fractions (with the decimal module) are imported where
# they are used: the command line reads this module's defaults for its --scheme auto options, and a
# fine-tune of another method never needs them.
if TYPE_CHECKING:
    from fractions import Fraction

#: Above this many schemes, ``choose_scheme`` searches instead of trying every one.
MAX_EXHAUSTIVE = 4096
DEFAULT_EPOCHS = 5
DEFAULT_VAL_FRACTION = 0.25

PlanFn = Callable[[str], Any]          # scheme text -> MemoryPlan (anything with ``.total``)
Progress = Callable[[str], None]


def _ratio_text(r: Fraction) -> str:
    return str(r)


def scheme_text(n_layers: int, bias_layers: int, ratios: dict[int, Fraction]) -> str:
    """The scheme string of: biases of the last ``bias_layers``, ``ratios`` {layer: ratio},
    and the last layer's whole weight (always trained here)."""
    from fractions import Fraction

    from .methods.sparse import SparseScheme

    weights = {**{k: r for k, r in ratios.items() if r is not None}, n_layers - 1: Fraction(1)}
    return str(SparseScheme(bias_layers, tuple(sorted(weights.items()))))


@dataclass
class Contributions:
    """Validation-accuracy gains over the baseline (last layer's weight and bias), one part at a time."""
    n_layers: int                                   # layers with weights
    baseline: str                                   # the baseline's scheme string
    baseline_accuracy: float
    bias: dict[int, float]                          # k -> gain of training the last k layers' biases (k=1: 0)
    weight: dict[tuple[int, Fraction], float]       # (layer, ratio) -> gain of that layer's weight rows
    epochs: int
    batch_size: int
    lr: float
    seed: int
    n_train: int
    n_val: int
    val_indices: np.ndarray                         # rows of the data passed in used for validation
    runs: int                                       # fine-tunes the analysis ran
    seconds: float                                  # its wall time
    accuracies: dict[str, float] = field(default_factory=dict)  # scheme -> validation accuracy measured

    @property
    def layers(self) -> list[int]:
        """The layers whose weights the search may add (the last one always trains)."""
        return sorted({k for k, _ in self.weight})

    @property
    def ratios(self) -> list[Fraction]:
        return sorted({r for _, r in self.weight})

    def predict(self, bias_layers: int, ratios: dict[int, Fraction | None]) -> float:
        """Predicted validation accuracy of a scheme: the gains assumed additive (as the paper
        does), capped at 1 (summed gains can overshoot)."""
        return min(1.0, self.baseline_accuracy + self.gain(bias_layers, ratios))

    def gain(self, bias_layers: int, ratios: dict[int, Fraction | None]) -> float:
        return self.bias[bias_layers] + sum(self.weight[(k, r)] for k, r in ratios.items() if r is not None)

    def table(self) -> list[dict[str, Any]]:
        """One row per measured part: what, the scheme fine-tuned, its accuracy and gain."""
        rows = [{"part": f"bias of the last {k} layer{'s' if k > 1 else ''}", "kind": "bias", "layers": k,
                 "ratio": None, "scheme": scheme_text(self.n_layers, k, {}),
                 "val_accuracy": self.accuracies.get(scheme_text(self.n_layers, k, {})), "gain": g}
                for k, g in sorted(self.bias.items())]
        for (k, r), g in sorted(self.weight.items()):
            s = scheme_text(self.n_layers, 1, {k: r})
            rows.append({"part": f"layer {k} weight at {_ratio_text(r)}", "kind": "weight", "layer": k,
                         "ratio": _ratio_text(r), "scheme": s, "val_accuracy": self.accuracies.get(s), "gain": g})
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {"n_layers": self.n_layers, "baseline": self.baseline, "baseline_accuracy": self.baseline_accuracy,
                "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed,
                "train_samples": self.n_train, "val_samples": self.n_val, "runs": self.runs,
                "seconds": self.seconds, "table": self.table()}


def split_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows) of ``n`` fine-tuning samples: a seeded share ``fraction``."""
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"the validation share must be between 0 and 1, got {fraction}")
    n_val = int(round(fraction * n))
    if n_val < 1 or n_val >= n:
        raise UsageError(f"a validation share of {fraction} of {n} fine-tuning samples leaves {n_val} for "
                         f"validation and {n - n_val} for training; both need at least 1")
    order = np.random.default_rng([seed, 11]).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@dataclass
class _Runner:
    """Short fine-tunes of one backbone on one train/validation split."""
    backbone: Backbone
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    seed: int
    engine: str | None
    progress: Progress | None
    runs: int = 0

    def __call__(self, scheme: str) -> float:
        from .api import FineTuner

        t0 = time.perf_counter()
        tuner = FineTuner(self.backbone, "sparse", scheme=scheme, epochs=self.epochs, batch_size=self.batch_size,
                          lr=self.lr, optimizer=self.optimizer, seed=self.seed, engine=self.engine, progress=False)
        tuner.fit(self.x_train, self.y_train)
        acc = float(tuner.score(self.x_val, self.y_val))
        self.runs += 1
        if self.progress:
            self.progress(f"  sparse[{scheme}]: validation accuracy {acc:.4f} ({time.perf_counter() - t0:.2f} s)")
        return acc


def _runner(backbone: Backbone, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int, lr: float,
            optimizer: str, seed: int, val_fraction: float, engine: str | None,
            progress: Progress | None) -> tuple[_Runner, np.ndarray]:
    if not isinstance(backbone, Backbone):
        raise UsageError(f"backbone must be an edgetune Backbone, got {type(backbone).__name__}")
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise UsageError(f"x and y must have the same number of samples, got {len(x)} and {len(y)}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise UsageError(f"{name} must be a whole number >= 1, got {v!r}")
    tr, va = split_validation(len(y), val_fraction, seed)
    return _Runner(backbone, x[tr], y[tr], x[va], y[va], int(epochs), int(batch_size), float(lr), optimizer,
                   int(seed), engine, progress), va


def contribution_analysis(backbone: Backbone, x: np.ndarray, y: np.ndarray, *, epochs: int = DEFAULT_EPOCHS,
                          batch_size: int = 20, lr: float = 0.01, optimizer: str = "sgd", seed: int = 0,
                          val_fraction: float = DEFAULT_VAL_FRACTION, layers: int | None = None,
                          ratios: Sequence[Fraction | str] | None = None, engine: str | None = "auto",
                          progress: Progress | None = None) -> Contributions:
    """Measure each part's validation-accuracy gain over the baseline (the last layer's weight and bias).

    ``x``, ``y``: the fine-tuning data (a seeded ``val_fraction`` of it is held out as
    validation data; nothing else is read). ``layers``: only the last ``layers`` layers with
    weights are tried (their weights and biases; default all); ``ratios``: the channel ratios
    tried (default 1/8, 1/4, 1/2, 1). Each part is one fine-tune of ``epochs`` epochs on
    ``engine`` ('auto': the compiled engine when built), all with the same seed.
    """
    t0 = time.perf_counter()
    run, val_rows = _runner(backbone, x, y, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                            seed=seed, val_fraction=val_fraction, engine=engine, progress=progress)
    n = len(backbone.tap_layers)
    if layers is None:
        layers = n
    if not isinstance(layers, (int, np.integer)) or isinstance(layers, bool) or not 1 <= layers <= n:
        raise UsageError(f"layers must be a whole number from 1 to {n} (the layers with weights), got {layers!r}")
    from fractions import Fraction

    from .methods.sparse import RATIOS

    tried = [Fraction(r) for r in (ratios if ratios is not None else RATIOS)]
    if not tried or any(r not in RATIOS for r in tried):
        raise UsageError(f"ratios must be some of 1/8, 1/4, 1/2, 1, got {list(map(str, tried))}")
    tried = sorted(set(tried))
    candidates = list(range(n - layers, n - 1))
    total_runs = 1 + (layers - 1) + len(candidates) * len(tried)
    if progress:
        progress(f"contribution analysis: {total_runs} fine-tunes of {epochs} epochs on {run.y_train.shape[0]} "
                 f"samples, validated on {run.y_val.shape[0]}")
    accuracies: dict[str, float] = {}
    base = scheme_text(n, 1, {})
    accuracies[base] = base_acc = run(base)
    bias = {1: 0.0}
    for k in range(2, layers + 1):
        s = scheme_text(n, k, {})
        accuracies[s] = run(s)
        bias[k] = accuracies[s] - base_acc
    weight = {}
    for k in candidates:
        for r in tried:
            s = scheme_text(n, 1, {k: r})
            accuracies[s] = run(s)
            weight[(k, r)] = accuracies[s] - base_acc
    return Contributions(n, base, base_acc, bias, weight, int(epochs), int(batch_size), float(lr), int(seed),
                         int(run.y_train.shape[0]), int(run.y_val.shape[0]), val_rows, run.runs,
                         time.perf_counter() - t0, accuracies)


# ---------------------------------------------------------------------------- the search
@dataclass
class Choice:
    """The scheme ``choose_scheme`` picked, its plan and its predicted validation accuracy."""
    scheme: str
    bias_layers: int
    ratios: dict[int, Fraction]
    plan: Any
    predicted_gain: float
    predicted_accuracy: float
    strategy: str
    planned: int          # schemes planned during the search
    space: int            # schemes in the search space

    def as_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "ram_bytes": self.plan.total, "breakdown": self.plan.breakdown(),
                "predicted_gain": self.predicted_gain, "predicted_accuracy": self.predicted_accuracy,
                "strategy": self.strategy, "planned": self.planned, "space": self.space}


def _space_size(c: Contributions) -> int:
    return len(c.bias) * (len(c.ratios) + 1) ** len(c.layers)


def choose_scheme(contributions: Contributions, plan_fn: PlanFn, budget: int, *, strategy: str = "auto",
                  seed: int = 0, max_exhaustive: int = MAX_EXHAUSTIVE, generations: int = 40,
                  population: int = 24) -> Choice:
    """The scheme with the largest summed gain whose ``plan_fn(scheme).total`` fits ``budget`` bytes.

    The space: biases of the last k layers (the k measured) x, per layer measured, no weight
    or one of the ratios measured; the last layer's weight always trains. ``strategy``:
    'exhaustive' (every scheme), 'evolution' (a seeded evolutionary search started from the
    greedy choice), or 'auto' (exhaustive up to ``max_exhaustive`` schemes). Ties go to the
    smaller plan, then to the scheme string. Raises BudgetError when nothing fits, with the
    smallest plan's bytes.
    """
    from .memory import exact_bytes

    if strategy not in ("auto", "exhaustive", "evolution"):
        raise UsageError(f"strategy must be 'auto', 'exhaustive' or 'evolution', got {strategy!r}")
    if not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise UsageError(f"budget must be a number of bytes > 0, got {budget!r}")
    c = contributions
    layers, options = c.layers, [None, *c.ratios]
    ks = sorted(c.bias)
    space = _space_size(c)
    if strategy == "auto":
        strategy = "exhaustive" if space <= max_exhaustive else "evolution"
    plans: dict[str, Any] = {}

    def plan_of(k: int, genes: tuple) -> Any:
        s = scheme_text(c.n_layers, k, dict(zip(layers, genes)))
        if s not in plans:
            plans[s] = plan_fn(s)
        return plans[s]

    def key(k: int, genes: tuple) -> tuple:
        """Sort key, smaller is better; None when it does not fit."""
        p = plan_of(k, genes)
        if p.total > budget:
            return None
        s = scheme_text(c.n_layers, k, dict(zip(layers, genes)))
        return (-round(c.gain(k, dict(zip(layers, genes))), 12), p.total, s)

    best: tuple | None = None  # (key, k, genes)

    def consider(k: int, genes: tuple) -> None:
        nonlocal best
        kk = key(k, genes)
        if kk is not None and (best is None or kk < best[0]):
            best = (kk, k, genes)

    if strategy == "exhaustive":
        for k in ks:
            for genes in itertools.product(options, repeat=len(layers)):
                consider(k, genes)
    else:
        rng = np.random.default_rng(seed)
        start = (ks[0], (None,) * len(layers))
        consider(*start)
        greedy = _greedy(start, ks, options, key)
        consider(*greedy)
        pop = [start, greedy]
        while len(pop) < population:
            pop.append((ks[rng.integers(len(ks))], tuple(options[rng.integers(len(options))] for _ in layers)))
        for _ in range(generations):
            children = []
            for _ in range(population):
                a, b = pop[rng.integers(len(pop))], pop[rng.integers(len(pop))]
                k = a[0] if rng.random() < 0.5 else b[0]
                genes = [ga if rng.random() < 0.5 else gb for ga, gb in zip(a[1], b[1])]
                if rng.random() < 0.5 or not layers:
                    k = ks[rng.integers(len(ks))]
                else:
                    genes[rng.integers(len(genes))] = options[rng.integers(len(options))]
                children.append((k, tuple(genes)))
            scored = []
            for ind in {*pop, *children}:
                kk = key(*ind)
                if kk is not None:
                    consider(*ind)
                    scored.append((kk, ind))
            scored.sort()
            pop = [ind for _, ind in scored[:population]] or [start]
    if best is None:
        smallest = min(plans.items(), key=lambda kv: (kv[1].total, kv[0]))
        raise BudgetError(f"no sparse scheme of the search fits {exact_bytes(budget)}: the smallest, "
                          f"sparse[{smallest[0]}], plans {exact_bytes(smallest[1].total)}")
    (_, _, s), k, genes = best
    ratios = {layer: r for layer, r in zip(layers, genes) if r is not None}
    g = c.gain(k, ratios)
    return Choice(s, k, ratios, plans[s], g, c.predict(k, ratios), strategy, len(plans), space)


def _greedy(start: tuple, ks: list[int], options: list, key: Callable) -> tuple:
    """From ``start``, take the single change (more biases, one layer's ratio) that best improves
    the key while fitting, until none does."""
    cur, cur_key = start, key(*start)
    if cur_key is None:
        return start
    while True:
        moves = [(k, cur[1]) for k in ks if k != cur[0]]
        for i in range(len(cur[1])):
            for o in options:
                if o != cur[1][i]:
                    moves.append((cur[0], cur[1][:i] + (o,) + cur[1][i + 1:]))
        scored = [(kk, m) for m in moves if (kk := key(*m)) is not None and kk < cur_key]
        if not scored:
            return cur
        cur_key, cur = min(scored)


# ---------------------------------------------------------------------------- verify
def largest_batch(plan_at: Callable[[str, int], Any], n_layers: int, budget: int,
                  batch_sizes: Sequence[int] = (20, 8, 4, 1)) -> int:
    """The largest of ``batch_sizes`` at which the search's smallest scheme (the baseline)
    fits ``budget`` (``plan_at(scheme, batch)``); the smallest batch size when none does."""
    base = scheme_text(n_layers, 1, {})
    sizes = sorted(batch_sizes, reverse=True)
    return next((b for b in sizes if plan_at(base, b).total <= budget), sizes[-1])


def last_k_scheme(n_layers: int, k: int) -> str:
    """The paper's 'update the last k layers' baseline: their weights and biases."""
    from fractions import Fraction

    from .methods.sparse import SparseScheme

    return str(SparseScheme(k, tuple((i, Fraction(1)) for i in range(n_layers - k, n_layers))))


def bias_only_scheme(k: int) -> str:
    return f"b{k}"


def largest_fitting(schemes: list[str], plan_fn: PlanFn, budget: int) -> str | None:
    """The last of ``schemes`` (ordered small to large) whose plan fits ``budget``."""
    fit = [s for s in schemes if plan_fn(s).total <= budget]
    return fit[-1] if fit else None


@dataclass
class AutoScheme:
    """What ``auto_scheme`` found: the analysis, the choice and the verification fine-tunes."""
    contributions: Contributions
    choice: Choice
    measured_accuracy: float | None                 # the chosen scheme's validation accuracy, fine-tuned once
    baselines: dict[str, dict[str, Any]]            # 'last_k' / 'bias_only': scheme, ram_bytes, val_accuracy
    seconds: float                                  # analysis + search + verification

    @property
    def scheme(self) -> str:
        return self.choice.scheme

    def as_dict(self) -> dict[str, Any]:
        return {"scheme": self.choice.scheme, "ram_bytes": self.choice.plan.total,
                "breakdown": self.choice.plan.breakdown(), "plan": self.choice.plan.as_dict(),
                "predicted_val_accuracy": self.choice.predicted_accuracy,
                "measured_val_accuracy": self.measured_accuracy, "search": self.choice.as_dict(),
                "baselines": self.baselines, "contributions": self.contributions.as_dict(),
                "analysis_seconds": self.contributions.seconds, "seconds": self.seconds}


def auto_scheme(backbone: Backbone, x: np.ndarray, y: np.ndarray, *, budget: int, plan_fn: PlanFn,
                epochs: int = DEFAULT_EPOCHS, batch_size: int = 20, lr: float = 0.01, optimizer: str = "sgd",
                seed: int = 0, val_fraction: float = DEFAULT_VAL_FRACTION, layers: int | None = None,
                ratios: Sequence[Fraction | str] | None = None, engine: str | None = "auto",
                strategy: str = "auto", verify: bool = True, progress: Progress | None = None) -> AutoScheme:
    """Contribution analysis, then ``choose_scheme``, then (``verify``) one fine-tune each of the
    chosen scheme and of the paper's baselines that fit: the last k layers (the largest k that
    fits) and the biases only (likewise), all on the same validation split."""
    t0 = time.perf_counter()
    plans: dict[str, Any] = {}

    def cached_plan(s: str) -> Any:
        if s not in plans:
            plans[s] = plan_fn(s)
        return plans[s]

    # Nothing to analyse if not even the baseline fits: say so before the fine-tunes.
    n = len(backbone.tap_layers)
    base = scheme_text(n, 1, {})
    if cached_plan(base).total > budget:
        from .memory import exact_bytes

        raise BudgetError(f"the smallest scheme of the search, sparse[{base}] (the last layer's weight and bias), "
                          f"plans {exact_bytes(cached_plan(base).total)}; the budget is {exact_bytes(budget)}")
    contrib = contribution_analysis(backbone, x, y, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                                    seed=seed, val_fraction=val_fraction, layers=layers, ratios=ratios,
                                    engine=engine, progress=progress)
    choice = choose_scheme(contrib, cached_plan, budget, strategy=strategy, seed=seed)
    if progress:
        progress(f"chosen: sparse[{choice.scheme}], predicted validation accuracy {choice.predicted_accuracy:.4f} "
                 f"({choice.strategy} search over {choice.space} schemes)")
    measured, baselines = None, {}
    if verify:
        run, _ = _runner(backbone, x, y, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed,
                         val_fraction=val_fraction, engine=engine, progress=progress)
        measured = contrib.accuracies.get(choice.scheme)
        if measured is None:
            measured = run(choice.scheme)
        for name, schemes in (("last_k", [last_k_scheme(n, k) for k in range(1, n + 1)]),
                              ("bias_only", [bias_only_scheme(k) for k in range(1, n + 1)])):
            s = largest_fitting(schemes, cached_plan, budget)
            if s is None:
                baselines[name] = {"scheme": None, "ram_bytes": None, "val_accuracy": None}
                continue
            acc = contrib.accuracies.get(s)
            baselines[name] = {"scheme": s, "ram_bytes": cached_plan(s).total,
                               "val_accuracy": acc if acc is not None else run(s)}
    return AutoScheme(contrib, choice, measured, baselines, time.perf_counter() - t0)
