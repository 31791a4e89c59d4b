"""edgetune plan: which methods and sparse-update schemes fit a memory budget."""
from __future__ import annotations

import argparse
import sys

from ._common import add_output_args, check_outputs, info, positive_int, print_table, write_json
from ._scheme_auto import add_auto_args, check_auto_args

NAME = "plan"
HELP = "list the methods and sparse-update schemes whose training fits a memory budget"
DESCRIPTION = """Plan fine-tuning under a memory budget. Every method is planned on the float model
and on its int8 version (skip2-lora also with an int8 skip-cache), and every sparse-update
scheme (biases of the last k layers x each layer's weight at channel ratio 1/8..1; layers
with weights, for a CNN) is searched exhaustively. A convolutional model is planned as float
(int8 CNNs and their int8 skip-cache are not planned in this version). Without --batch-size, every candidate is planned at the largest of
the batch sizes 20, 8, 4, 1 at which it fits (the batch column says which; the paper trains
at batch 1 on microcontrollers); --batch-size N keeps the batch fixed. The table lists what
fits with its memory breakdown; with --task, the best-ranked candidates are also fine-tuned
briefly (at their batch size) and their test accuracy is measured.

Ranking without --task: skip2-lora, then skip-lora, then the sparse scheme with the most
trainable parameters (float before int8 when both fit, then the larger batch). With --task:
the highest accuracy, ties broken by the smaller plan.

With --target (host, aarch64-linux, cortex-m4, cortex-m7, riscv32, riscv32f) it plans one program as
'edgetune export' would write it for that device instead: the compiled engine's arena
(parameters, gradients, optimizer, skip-cache, workspace), the program's static data and
stack, and the frozen weights as flash; --partial-cache caches as many rows as fit.

With --method sparse --scheme auto (and --task) it chooses one sparse-update scheme for the
budget, measured on the task: short fine-tunes on a validation split of the task's
fine-tuning data measure what each part of a scheme adds to the last layer alone (the
biases of the last k layers, each layer's weights at each channel ratio), the scheme with
the largest summed gain that fits is chosen, then fine-tuned once to check the prediction
(see docs/budgets.md). The test split is not used. With --target as well, the budget is the
device program's RAM: every scheme is planned as 'edgetune export' would write it (the
compiled engine's arena, statics and stack; weights in flash), the analysis runs on the
samples the program trains on (--samples), on the int8 model with --int8, and the plan and
its breakdown are those of the chosen scheme ('ram_bytes', 'scheme' and 'breakdown' in
--json); --scheme S with --target plans the given scheme.

examples:
  edgetune plan --model model/ --budget 256KB --samples 470
  edgetune plan --model model/ --budget 64KB --task damage1 --data-dir ../shared/data
  edgetune plan --model model/ --budget 256KB --target cortex-m4 --method skip2-lora --int8 \
      --partial-cache --samples 200 --task damage1 --data-dir ../shared/data
  edgetune plan --model model/ --method sparse --scheme auto --budget 256KB --task damage1-1d \
      --data-dir ../shared/data --json chosen.json
  edgetune plan --model cnn/ --method sparse --scheme auto --int8 --budget 256KB --task har-raw \
      --data-dir ../shared/data --target cortex-m4 --samples 400 --json chosen.json"""
ORDER = 35
BATCH_SIZES = (20, 8, 4, 1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="model directory (float or int8)")
    p.add_argument("--budget", required=True, metavar="BYTES", help="memory budget, e.g. 64KB, 256KB, 1MB")
    p.add_argument("--samples", type=positive_int, help="fine-tuning samples (default: the task's, else 100)")
    p.add_argument("--batch-size", type=positive_int,
                   help=f"mini-batch size, fixed (default: the largest of {', '.join(map(str, BATCH_SIZES))} "
                        f"at which each candidate fits)")
    p.add_argument("--optimizer", choices=["sgd", "momentum", "adam"], default="sgd", help="optimizer (default sgd)")
    p.add_argument("--rank", type=positive_int, default=1, help="LoRA rank R (default 1)")
    p.add_argument("--no-int8", action="store_true", help="do not consider the int8 version of a float model")
    p.add_argument("--weights-in-flash", action="store_true",
                   help="a microcontroller: frozen weights stay in flash, the budget is RAM only")
    p.add_argument("--task", metavar="TASK", help="measure accuracy on this task after a short fine-tune")
    p.add_argument("--data-dir", metavar="DIR", help="where the built-in data sets are")
    p.add_argument("--epochs", type=positive_int,
                   help="with --task: epochs of the short fine-tune (default 20); with --target: the epochs the "
                        "exported program trains (default: export's, the task's epochs, else 100)")
    p.add_argument("--evaluate", type=positive_int, default=6, metavar="K",
                   help="with --task: fine-tune the K best-ranked candidates (default 6)")
    g = p.add_argument_group("a device program (the plan 'edgetune export' uses)")
    g.add_argument("--target", metavar="TARGET", help="plan for this export target: host, aarch64-linux, cortex-m4, cortex-m7, "
                                                       "riscv32, riscv32f")
    g.add_argument("--method", help="with --target: the method (default skip2-lora); with --scheme auto: sparse")
    g.add_argument("--int8", action="store_true", help="with --target: int8 backbone and skip-cache (needs --task)")
    g.add_argument("--partial-cache", action="store_true", help="with --target: cache as many rows as fit the budget")
    g.add_argument("--test-samples", type=positive_int, metavar="N",
                   help="with --target and --task: test samples linked into a microcontroller's flash")
    g.add_argument("--flash", metavar="BYTES", help="with --target, a microcontroller: the part's flash (default: "
                                                    "the target's)")
    g = p.add_argument_group("choosing a sparse scheme on the task (--method sparse --scheme auto)")
    g.add_argument("--scheme", metavar="SCHEME|auto",
                   help="auto: choose the sparse-update scheme for --budget by a contribution analysis on --task "
                        "(with --target: each scheme planned as the device program); with --target also an "
                        "explicit scheme, e.g. b2,w-1:1/2 (--method sparse, the default with --scheme)")
    add_auto_args(g)
    g.add_argument("--seed", type=int, default=0, help="with --scheme auto: seed of the split, the fine-tunes and "
                                                       "the search; with --target also the export's --seed (the "
                                                       "samples' subsets) (default 0)")
    p.add_argument("--show", type=positive_int, default=12, metavar="K",
                   help="sparse schemes shown in the table, in the ranking's order (without --task the most "
                        "trainable first; with --task the fine-tuned ones by accuracy, then the rest as ranked "
                        "without --task); default 12")
    add_output_args(p)


#: Without --target: the epochs of the short fine-tune that ranks candidates by accuracy.
SHORT_FINETUNE_EPOCHS = 20


def model_text(model) -> str:
    """An MLP by its widths (512-96-96-2), any other chain of layers by its layers and shapes."""
    if all(spec.kind == "dense" for spec in model.specs):
        return "-".join(map(str, model.sizes))
    return f"{model.n_layers}-layer {list(model.input_shape)} -> {model.sizes[-1]} " \
           f"({', '.join(spec.kind for spec in model.specs)})"


def _rank_key(c):
    p = c.plan
    order = {"skip2-lora": 0, "skip-lora": 1}.get(p.method, 2)
    return (order, -p.n_trainable if order == 2 else 0, p.backbone != "float32", p.cache == "int8", -p.batch_size,
            p.total)


def trainable_params(plan, specs: list, rank: int) -> int:
    """The parameters ``plan``'s method trains on layers ``specs``, as 'edgetune methods' and
    'finetune' count them (a skip method stores its adapters as one masked block matrix: the
    plan's memory holds more values)."""
    from ..methods import method_class
    from ..methods.base import MethodOptions

    if plan.method == "sparse":
        return plan.n_trainable
    return method_class(plan.method).count_trainable(specs, MethodOptions(rank=rank))


def finetune_command(args: argparse.Namespace, plan, model_is_int8: bool) -> str:
    """The 'edgetune finetune' command line that runs ``plan`` (a candidate of this plan)."""
    import shlex

    task = args.task or "TASK"
    parts = ["edgetune", "finetune", "--task", task]
    if args.data_dir:
        parts += ["--data-dir", args.data_dir]
    parts += ["--model", args.model, "--method", plan.method]
    if plan.backbone == "int8" and not model_is_int8:
        parts.append("--int8")
    if plan.cache == "int8":
        parts.append("--int8-cache")
    if plan.scheme is not None:
        parts += ["--scheme", plan.scheme]
    if args.rank != 1 and plan.method != "sparse" and not plan.method.startswith("ft-"):
        parts += ["--rank", str(args.rank)]
    parts += ["--batch-size", str(plan.batch_size)]
    if args.optimizer != "sgd":
        parts += ["--optimizer", args.optimizer]
    parts += ["--budget", args.budget]
    return " ".join(shlex.quote(p) for p in parts)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..memory import candidates, evaluate_candidate
    from ..quant import load_any, quantize
    from ..units import format_bytes, parse_bytes

    check_outputs(args.json, args=args)  # writable, and not over the model or the task
    budget = parse_bytes(args.budget, "--budget")
    if budget <= 0:
        raise UsageError(f"--budget must be more than 0 bytes, got {args.budget!r}")
    auto = check_auto_args(args, args.method)
    if args.target:
        if args.scheme is not None:
            args.method = args.method or "sparse"
            if args.method != "sparse":
                raise UsageError(f"--scheme chooses the sparse update's trained parts: use it with --method sparse, "
                                 f"not {args.method}")
        args.method = args.method or "skip2-lora"
        return _run_device(args, budget)
    if args.scheme is not None and not auto:
        raise UsageError(f"edgetune plan takes --scheme auto (with --method sparse), or any scheme with --target, "
                         f"got {args.scheme!r}; 'edgetune finetune --scheme {args.scheme} --budget B' checks a given "
                         f"scheme on this machine")
    if auto and args.int8:
        raise UsageError("--int8 with --scheme auto plans an exported program: add --target (e.g. --target "
                         "cortex-m4), or pass an int8 --model (edgetune quantize) to plan on this machine")
    if auto:
        return _run_auto(args, budget)
    if args.epochs is None:
        args.epochs = SHORT_FINETUNE_EPOCHS
    model = load_any(args.model)
    task = None
    if args.task:
        from ..data.task import load_task
        from ..experiment import check_compatible

        task = load_task(args.task, args.data_dir)
        check_compatible(model, task)
    n = args.samples or (len(task.y_finetune) if task is not None else 100)
    batches = [args.batch_size] if args.batch_size else list(BATCH_SIZES)
    batch_text = (f"batch {args.batch_size}" if args.batch_size else
                  f"batch: the largest of {', '.join(map(str, BATCH_SIZES))} that fits")
    cands = candidates(model, budget=budget, batch_size=batches, n_samples=n, optimizer=args.optimizer,
                       rank=args.rank, int8_available=not args.no_int8,
                       weights_in_flash=args.weights_in_flash)
    fit = sorted((c for c in cands if c.fits), key=_rank_key)
    n_sparse = sum(1 for c in cands if c.plan.method == "sparse")
    info(args, f"{len(cands)} candidates ({n_sparse} sparse schemes) planned for {model_text(model)}, "
               f"{n} samples, {batch_text}; {len(fit)} fit {format_bytes(budget)}")
    if task is not None and fit:
        qmodel = None
        for c in fit[:args.evaluate]:
            bb = model
            if c.plan.backbone == "int8" and not model.is_int8:
                qmodel = qmodel or quantize(model, task.x_pretrain)
                bb = qmodel
            info(args, f"fine-tuning {c.plan.label} for {args.epochs} epochs")
            c.accuracy = evaluate_candidate(bb, c.plan, task, epochs=args.epochs, lr=task.defaults.get("lr", 0.01))
        # The fine-tuned candidates by accuracy (ties: the smaller plan), then the rest in the ranking's order.
        rank = {id(c): i for i, c in enumerate(fit)}
        fit = sorted(fit, key=lambda c: (0, -c.accuracy, c.plan.total) if c.accuracy is not None
                     else (1, rank[id(c)], 0))
    shown = [c for c in fit if c.plan.method != "sparse"]
    shown += [c for c in fit if c.plan.method == "sparse"][:args.show]
    shown = sorted(shown, key=lambda c: fit.index(c))
    rows = []
    for c in shown:
        b = c.plan.breakdown()
        rows.append({"label": c.plan.label, "n": trainable_params(c.plan, model.specs, args.rank),
                     "batch": c.plan.batch_size,
                     "total": format_bytes(c.plan.total),
                     **{k: format_bytes(v) for k, v in b.items()},
                     "accuracy": "" if c.accuracy is None else f"{c.accuracy:.4f}"})
    out = sys.stdout
    where = "RAM (frozen weights in flash)" if args.weights_in_flash else "memory"
    print(f"budget {format_bytes(budget)} of {where} ({budget} B); model {model_text(model)} "
          f"({'int8' if model.is_int8 else 'float32'}); {n} samples, {batch_text}, "
          f"{args.optimizer}", file=out)
    if not fit:
        smallest = min(cands, key=lambda c: c.plan.total)
        print(f"nothing fits: the smallest plan is {smallest.plan.explain()} at batch {smallest.plan.batch_size}",
              file=out)
        write_json(args.json, {"budget": budget, "fits": [], "smallest": smallest.plan.as_dict()})
        return 1
    cols = [("label", "candidate"), ("n", "trainable"), ("batch", "batch"),
            ("total", "RAM" if args.weights_in_flash else "total"),
            ("frozen_weights", "frozen (flash)" if args.weights_in_flash else "frozen"),
            ("weight_copies", "copies"), ("trainable", "params"), ("gradients", "grads"), ("optimizer", "optim"),
            ("snapshot", "snapshot"), ("activations", "activ."), ("cache", "cache"), ("working", "working")]
    if task is not None:
        cols.append(("accuracy", f"acc ({args.epochs} ep)"))
    print_table(rows, cols, file=out)
    n_fit_sparse = sum(1 for c in fit if c.plan.method == "sparse")
    if n_fit_sparse > args.show:
        print(f"({n_fit_sparse - min(n_fit_sparse, args.show)} more sparse schemes fit; --show to list them)", file=out)
    best = fit[0]
    acc = f", accuracy {best.accuracy:.4f}" if best.accuracy is not None else ""
    flash = f" + {format_bytes(best.plan.flash)} of weights in flash" if args.weights_in_flash else ""
    print(f"recommended: {best.plan.label} at batch {best.plan.batch_size}: {format_bytes(best.plan.total)} of "
          f"{format_bytes(budget)}{flash}{acc}", file=out)
    is_q = model.is_int8
    print(f"run it: {finetune_command(args, best.plan, is_q)}", file=out)
    if not args.task:
        print("(TASK: the task to fine-tune on, a built-in name or an .npz file)", file=out)
    write_json(args.json, {"budget": budget, "samples": n, "batch_sizes": batches,
                           "recommended": {**best.plan.as_dict(), "accuracy": best.accuracy,
                                           "trainable_params": trainable_params(best.plan, model.specs, args.rank),
                                           "command": finetune_command(args, best.plan, is_q)},
                           "fits": [{**c.plan.as_dict(), "accuracy": c.accuracy,
                                     "trainable_params": trainable_params(c.plan, model.specs, args.rank),
                                     "command": finetune_command(args, c.plan, is_q)} for c in fit]})
    return 0


def _run_device(args: argparse.Namespace, budget: int) -> int:
    """One exported program's RAM for a device target: exactly what 'edgetune export' plans."""
    from ..errors import UsageError
    from ..export.project import ExportOptions, plan_export
    from ..units import format_bytes, parse_bytes

    if args.seed < 0:
        raise UsageError(f"--seed must be 0 or more, got {args.seed}")
    if args.flash is not None:
        parse_bytes(args.flash, "--flash")

    opts = ExportOptions(model=args.model, method=args.method, target=args.target, out="", task=args.task,
                         data_dir=args.data_dir, batch_size=args.batch_size, optimizer=args.optimizer,
                         rank=args.rank, int8=args.int8, budget=args.budget, partial_cache=args.partial_cache,
                         max_samples=args.samples, test_samples=args.test_samples, epochs=args.epochs,
                         toolchain_check=False, scheme=args.scheme, auto_epochs=args.auto_epochs,
                         auto_layers=args.auto_layers, auto_ratios=args.auto_ratios,
                         auto_val_split=args.auto_val_split, seed=args.seed, flash=args.flash)
    d = plan_export(opts)
    plan = d["plan"]
    search = d["scheme_search"]
    if search is not None:
        c, ch = search.contributions, search.choice
        print(f"scheme auto: sparse[{ch.scheme}], predicted validation accuracy {ch.predicted_accuracy:.4f} "
              f"({c.runs} fine-tunes of {c.epochs} epochs on {c.n_train} of the program's {plan.max_samples} "
              f"samples, validated on the other {c.n_val}; {ch.strategy} search over {ch.space} schemes, each "
              f"planned as the device program)")
    print(f"{args.target}: {plan.explain(budget)}")
    print(f"training: {d['train']['epochs']} epochs, batch {d['train']['batch_size']}, {plan.max_samples} samples "
          f"(the plan 'edgetune export' makes with the same options)")
    if plan.cache:
        print(f"skip-cache: {plan.cache_capacity} of {plan.max_samples} samples' rows")
    print(f"flash: frozen weights {format_bytes(plan.flash_weights)}, program about {format_bytes(d['flash_estimate'])}")
    command = export_command(args, plan.scheme)
    print(f"write it: {command}")
    extra = {} if search is None else {"scheme_search": search.as_dict()}
    write_json(args.json, {"target": args.target, "budget": budget, "train": d["train"], "method": plan.method,
                           "scheme": plan.scheme, "ram_bytes": plan.total, "breakdown": plan.breakdown(),
                           "memory": plan.as_dict(), "flash_estimate": d["flash_estimate"], "command": command,
                           **extra})
    return 0


def export_command(args: argparse.Namespace, scheme: str | None = None) -> str:
    """The 'edgetune export' command line that writes the program this device plan describes
    (``scheme``: the sparse scheme planned, written out, so an 'auto' choice is not searched again)."""
    import shlex

    parts = ["edgetune", "export", "--model", args.model, "--method", args.method, "--target", args.target]
    if scheme is not None:
        parts += ["--scheme", scheme]
    if args.seed:
        parts += ["--seed", str(args.seed)]
    if args.task:
        parts += ["--task", args.task] + (["--data-dir", args.data_dir] if args.data_dir else [])
    for flag, on in (("--int8", args.int8), ("--partial-cache", args.partial_cache)):
        if on:
            parts.append(flag)
    for flag, value in (("--batch-size", args.batch_size), ("--rank", args.rank if args.rank != 1 else None),
                        ("--max-samples", args.samples), ("--test-samples", args.test_samples),
                        ("--epochs", args.epochs), ("--flash", args.flash)):
        if value is not None:
            parts += [flag, str(value)]
    if args.optimizer != "sgd":
        parts += ["--optimizer", args.optimizer]
    parts += ["--budget", args.budget, "--out", "OUT"]
    return " ".join(shlex.quote(p) for p in parts)


def _run_auto(args: argparse.Namespace, budget: int) -> int:
    """--method sparse --scheme auto: choose a scheme for the budget by a contribution analysis on the task."""
    from ..data.task import load_task
    from ..errors import BudgetError, UsageError
    from ..experiment import check_compatible
    from ..memory import MemoryPlan, exact_bytes, plan_memory
    from ..quant import load_any
    from ..scheme_search import auto_scheme, largest_batch
    from ..units import format_bytes

    if not args.task:
        raise UsageError("--scheme auto measures what each part of a scheme buys on your task: give --task")
    model = load_any(args.model)
    if model.is_int8 and not model.is_plain_mlp():
        raise UsageError(f"{args.model} is an int8 CNN, which this machine's memory planner does not model: add "
                         f"--target T (e.g. --target cortex-m4) to choose the scheme for the device program's RAM "
                         f"(the compiled engine's arena), or plan the float model")
    task = load_task(args.task, args.data_dir)
    check_compatible(model, task)
    n = args.samples or len(task.y_finetune)
    n_layers = len(model.tap_layers)
    if args.auto_layers is not None and args.auto_layers > n_layers:
        raise UsageError(f"--auto-layers {args.auto_layers}: the model has {n_layers} layers with weights")

    def plan_fn(scheme: str, batch: int) -> MemoryPlan:
        return plan_memory(model, "sparse", batch_size=batch, n_samples=n, optimizer=args.optimizer, scheme=scheme,
                           weights_in_flash=args.weights_in_flash)

    batch = args.batch_size or largest_batch(plan_fn, n_layers, budget, BATCH_SIZES)
    lr = task.defaults.get("lr", 0.01)
    where = "RAM (frozen weights in flash)" if args.weights_in_flash else "memory"
    info(args, f"choosing a sparse scheme for {model_text(model)} in {format_bytes(budget)} of {where}, batch {batch}")
    try:
        result = auto_scheme(model, task.x_finetune, task.y_finetune, budget=budget,
                             plan_fn=lambda s: plan_fn(s, batch), epochs=args.auto_epochs, batch_size=batch, lr=lr,
                             optimizer=args.optimizer, seed=args.seed, val_fraction=args.auto_val_split,
                             layers=args.auto_layers, ratios=args.auto_ratios, engine="auto",
                             progress=lambda t: info(args, t))
    except BudgetError as e:
        raise BudgetError(f"{e} (at batch {batch})") from None
    c, choice = result.contributions, result.choice
    # Seconds go to stderr and --json only: the table on stdout is the same from run to run.
    info(args, f"analysis {c.seconds:.2f} s, search and verification {result.seconds - c.seconds:.2f} s")
    out = sys.stdout
    print(f"budget {format_bytes(budget)} of {where} ({budget} B); model {model_text(model)} "
          f"({'int8' if model.is_int8 else 'float32'}); batch {batch}, {args.optimizer}, lr {lr}", file=out)
    print(f"contribution analysis: {c.runs} fine-tunes of {c.epochs} epochs on {c.n_train} of the task's "
          f"fine-tuning samples, validated on the other {c.n_val} (the test split is not used)", file=out)
    rows = [{"part": r["part"] if r["kind"] == "weight" or r["layers"] > 1 else "baseline: the last layer",
             "scheme": r["scheme"], "ram": format_bytes(plan_fn(r["scheme"], batch).total),
             "acc": f"{r['val_accuracy']:.4f}", "gain": f"{r['gain']:+.4f}"} for r in c.table()]
    print_table(rows, [("part", "part"), ("scheme", "fine-tuned"), ("ram", "planned"), ("acc", "val acc"),
                       ("gain", "gain")], file=out)
    p = choice.plan
    print(f"chosen: sparse[{choice.scheme}] at batch {batch}: {exact_bytes(p.total)} of {format_bytes(budget)} "
          f"({choice.strategy} search over {choice.space} schemes)", file=out)
    print(f"  {p.explain()}", file=out)
    measured = "" if result.measured_accuracy is None else f", measured {result.measured_accuracy:.4f}"
    print(f"  validation accuracy: predicted {choice.predicted_accuracy:.4f} (summed gains){measured}", file=out)
    for key, name in (("last_k", "last k layers"), ("bias_only", "biases only")):
        b = result.baselines.get(key)
        if not b:
            continue
        if b["scheme"] is None:
            print(f"  baseline {name}: none fits", file=out)
        else:
            print(f"  baseline {name}: sparse[{b['scheme']}], {format_bytes(b['ram_bytes'])}, validation accuracy "
                  f"{b['val_accuracy']:.4f}", file=out)
    from types import SimpleNamespace

    command = finetune_command(args, SimpleNamespace(method="sparse", backbone="int8" if model.is_int8 else "float32",
                                                     cache=None, scheme=choice.scheme, batch_size=batch),
                               model.is_int8)
    print(f"run it: {command}", file=out)
    write_json(args.json, {"budget": budget, "batch_size": batch, "samples": n, "seed": args.seed,
                           **result.as_dict(), "command": command})
    return 0
