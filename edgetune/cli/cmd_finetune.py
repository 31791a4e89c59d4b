"""edgetune finetune: fine-tune a backbone on a task with one method."""
from __future__ import annotations

import argparse
import contextlib
import sys

from ..errors import UsageError
from ._common import (add_force_arg, add_output_args, add_task_args, add_train_args, check_outputs, info,
                      int_list, load_task_arg, lock_outputs, output_path, positive_float, positive_int,
                      train_kwargs,
                      write_json)

NAME = "finetune"
HELP = "fine-tune a model on a task with one method and report accuracy before/after"
DESCRIPTION = """Fine-tune a pre-trained backbone on the task's fine-tune split and report the
test accuracy before and after, with the time split into forward, backward and update.
Without --model, a backbone is first pre-trained on the task's pre-train split.

examples:
  edgetune finetune --task damage1 --data-dir ../shared/data --method skip2-lora
  edgetune finetune --task task.npz --model model/ --method lora-all --rank 2 --json out.json
  edgetune quantize --task damage1 --model model/ --out model-int8/
  edgetune finetune --task damage1 --model model-int8/ --method sparse --scheme b2,w-1:1/2 --budget 256KB
  edgetune finetune --task damage1 --model model/ --int8 --int8-cache --method skip2-lora --budget 256KB
  edgetune finetune --task damage1-1d --model cnn/ --method sparse --scheme auto --budget 256KB --batch-size 8"""
ORDER = 30


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_task_args(p)
    p.add_argument("--model", metavar="DIR", help="pre-trained model directory, float or int8 (from 'edgetune pretrain')")
    p.add_argument("--method", default="skip2-lora", help="fine-tuning method (see 'edgetune methods'; default skip2-lora)")
    g = p.add_argument_group("method options")
    g.add_argument("--rank", type=positive_int, default=1, help="LoRA rank R (default 1)")
    g.add_argument("--alpha", type=positive_float, help="LoRA alpha; the adapter output is scaled by alpha/R (default alpha=R)")
    g.add_argument("--train-last-bias", action="store_true", help="also train the last layer's bias")
    g.add_argument("--cache-budget", metavar="BYTES", help="skip2-lora: largest skip-cache allowed, e.g. 4MB")
    g.add_argument("--partial-cache", action="store_true",
                   help="skip2-lora: when the cache exceeds --cache-budget, cache what fits and recompute the rest")
    g.add_argument("--scheme", metavar="SCHEME",
                   help="sparse: update scheme, e.g. b2,w-1:1/2 = biases of the last 2 layers and half the last "
                        "layer's weight rows (default b2,w-1; see 'edgetune plan'); auto: chosen for --budget by "
                        "a contribution analysis on a validation split of the fine-tuning data")
    g.add_argument("--int8", action="store_true",
                   help="quantise a float --model to int8 first (calibrated on the task's pre-train split, as "
                        "'edgetune quantize' does); an int8 model is used as it is")
    g.add_argument("--int8-cache", action="store_true",
                   help="skip2-lora: keep the skip-cache as int8 rows (a quarter of the float cache)")
    g.add_argument("--no-qas", dest="qas", action="store_const", const=False,
                   help="sparse on an int8 model: plain gradients, without Quantization-Aware Scaling")
    g.add_argument("--budget", metavar="BYTES",
                   help="training-memory budget, e.g. 256KB: refuse (exit 1) before fine-tuning if the planned "
                        "memory exceeds it (see 'edgetune plan')")
    from ._scheme_auto import add_auto_args

    add_auto_args(g)
    add_train_args(p)
    g = p.add_argument_group("pre-training (only without --model)")
    g.add_argument("--hidden", type=int_list, metavar="W1,W2,...", help="hidden widths (task default, else 96,96)")
    g.add_argument("--pretrain-epochs", type=positive_int, help="pre-training epochs (task default)")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="save the run as it goes (see --checkpoint-every); run the same command again to resume "
                        "after a crash")
    p.add_argument("--checkpoint-every", type=positive_int, metavar="N",
                   help="with --checkpoint: save every N epochs (default: every 10 s of training, and at the end)")
    g = p.add_argument_group("validation and early stopping")
    g.add_argument("--val-split", type=positive_float, metavar="F",
                   help="hold out this share of the fine-tune split (e.g. 0.2, seeded by --seed) as validation "
                        "data, evaluated after every epoch")
    g.add_argument("--patience", type=positive_int, metavar="N",
                   help="with --val-split: stop after N epochs without a lower validation loss and keep the best "
                        "epoch's adapter")
    p.add_argument("--curve", action="store_true", help="measure test accuracy after every epoch (not counted as training time)")
    p.add_argument("--plot", metavar="PNG", help="draw the training loss per epoch (and with --curve the test "
                                                 "accuracy) to PNG (needs the plot extra)")
    p.add_argument("--save-adapter", metavar="DIR", help="save the trained adapter (adapter_model.safetensors + adapter_config.json)")
    p.add_argument("--save-model", metavar="DIR", help="save the fine-tuned model merged into a plain backbone (ft-*, lora-*)")
    p.add_argument("--onnx", metavar="FILE", type=output_path,
                   help="write the fine-tuned model as an ONNX graph (adapter merged, or skip adapters as an added "
                        "branch; int8 backbones as QDQ); needs the onnx extra")
    add_force_arg(p)
    add_output_args(p)


def run(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as outputs:
        return _run(args, outputs)


def _run(args: argparse.Namespace, outputs: contextlib.ExitStack) -> int:
    from ..experiment import finetune_on_task, pretrain_on_task
    from ..methods import method_class
    from ..units import parse_bytes

    from ._scheme_auto import check_auto_args

    cls = method_class(args.method)  # unknown names fail before any work
    auto = check_auto_args(args, args.method)
    if (args.cache_budget or args.partial_cache) and not cls.uses_cache:
        raise UsageError(f"--cache-budget and --partial-cache apply to methods with a skip-cache "
                         f"(skip2-lora), not {args.method}")
    if args.int8_cache and not cls.uses_cache:
        raise UsageError(f"--int8-cache applies to methods with a skip-cache (skip2-lora), not {args.method}")
    if args.partial_cache and not args.cache_budget:
        raise UsageError("--partial-cache needs --cache-budget")
    if args.save_model and not cls.mergeable:
        raise UsageError(f"--save-model: {args.method} does not fold into a plain backbone in general (its "
                         f"adapters on earlier layers' inputs reach the output around the layers in between); "
                         f"use --save-adapter, or a lora-*/ft-* method for a merged model")
    budget = parse_bytes(args.cache_budget, "--cache-budget") if args.cache_budget else None
    limit = parse_bytes(args.budget, "--budget") if args.budget is not None else None
    if args.patience is not None and args.val_split is None:
        raise UsageError("--patience (early stopping) needs --val-split F: the validation data it watches")
    if args.val_split is not None and not args.val_split < 1:
        raise UsageError(f"--val-split must be less than 1 (a share of the fine-tune split), got {args.val_split}")
    if args.val_split is not None and args.curve:
        raise UsageError("--val-split and --curve both evaluate after every epoch; choose one")
    if args.checkpoint_every and not args.checkpoint:
        raise UsageError("--checkpoint-every needs --checkpoint FILE")
    check_outputs(args.json, args.onnx, args.plot, dirs=(args.save_adapter, args.save_model), args=args)
    if args.onnx:
        from ..onnx import require_onnx
        require_onnx()  # a missing extra is said before training, not after
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'edgetune[plot]'") from None
    if args.checkpoint:
        check_outputs(args.checkpoint, args=args, own="--checkpoint")
    # every output locked before any work, so nothing is written by a run that cannot finish
    lock_outputs(outputs, args.json, args.checkpoint, args.save_adapter, args.save_model)
    task = load_task_arg(args)
    info(args, task.summary())
    progress = None if not args.quiet else False
    if args.model:
        from ..quant import load_any

        model = load_any(args.model)
        if args.int8 and not model.is_int8:
            from ..experiment import check_compatible

            from ..quant import quantize

            check_compatible(model, task)
            model = quantize(model, task.x_pretrain)
            info(args, f"quantised {args.model} to int8 (calibrated on {len(task.y_pretrain)} pre-train samples)")
    else:
        info(args, "no --model given: pre-training a backbone on the task's pre-train split")
        model, rep = pretrain_on_task(task, hidden=args.hidden, epochs=args.pretrain_epochs, seed=args.seed,
                                      progress=progress)
        info(args, f"pre-trained {'-'.join(map(str, model.sizes))} in {rep['pretrain_seconds']:.2f} s; "
                   f"test accuracy {rep['accuracy_test']:.4f}")
        if args.int8:
            from ..quant import quantize

            model = quantize(model, task.x_pretrain)
            info(args, "quantised it to int8")
    if not args.int8_cache:  # the int8 cache calibrates on the pre-train split; nothing else reads it now
        task.drop_pretrain()
    train = train_kwargs(args, task.defaults)
    if args.patience is not None:
        train["patience"] = args.patience
    auto_result = None
    if auto:
        auto_result = _choose_scheme(args, model, task, train, limit)
        args.scheme = auto_result.scheme
    if limit is not None:
        from ..memory import check_budget, plan_memory

        check_budget(plan_memory(model, args.method, batch_size=train["batch_size"], n_samples=len(task.y_finetune),
                                 optimizer=train["optimizer"], rank=args.rank,
                                 train_last_bias=args.train_last_bias, scheme=args.scheme,
                                 cache="int8" if args.int8_cache else "float32"), limit)
    tuner, result = finetune_on_task(
        task, model, args.method,
        method_options={"rank": args.rank, "alpha": args.alpha, "train_last_bias": args.train_last_bias,
                        "cache_budget": budget, "cache_overflow": "partial" if args.partial_cache else "error",
                        "scheme": args.scheme, "qas": args.qas},
        train_options=train, curve=args.curve, progress=progress, checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every, int8_cache=args.int8_cache, val_fraction=args.val_split,
        keep_cache=False)  # nothing fits again: the skip-cache is freed before the test sets are scored
    if auto_result is not None:
        result["scheme"] = auto_result.scheme
        result["scheme_search"] = auto_result.as_dict()
    out = sys.stdout
    if auto_result is not None:
        ch = auto_result.choice
        print(f"scheme auto: sparse[{ch.scheme}], planned {ch.plan.total} bytes of {limit}; predicted validation "
              f"accuracy {ch.predicted_accuracy:.4f} ({auto_result.contributions.runs} short fine-tunes, "
              f"{auto_result.contributions.seconds:.2f} s)", file=out)
    print(f"{args.method} on {task.name}: {result['trainable_params']} trainable parameters, "
          f"{result['epochs']} epochs, batch {result['batch_size']}, lr {result['lr']}", file=out)
    print(f"  test accuracy  {result['accuracy_before']:.4f} -> {result['accuracy_after']:.4f}", file=out)
    for name in task.extra_tests:
        print(f"  {name} accuracy {result[f'{name}_accuracy_before']:.4f} -> {result[f'{name}_accuracy_after']:.4f}", file=out)
    print(f"  train time     {result['train_seconds']:.3f} s (forward {result['forward_seconds']:.3f}, "
          f"backward {result['backward_seconds']:.3f}, update {result['update_seconds']:.3f})", file=out)
    if result.get("later_epoch_seconds"):
        print(f"  epoch time     first {1e3 * result['first_epoch_seconds']:.2f} ms, "
              f"later {1e3 * result['later_epoch_seconds']:.2f} ms", file=out)
    if "cache_bytes" in result:
        print(f"  skip-cache     {result['cache_bytes']} bytes, {result['cache_filled']} samples", file=out)
    print(f"  final loss     {result['final_loss']:.5f}", file=out)
    if result.get("stopped_early"):
        print(f"  early stop     after epoch {len(result['val_loss_curve'])}, kept epoch {result['best_epoch']} "
              f"(lowest validation loss on {result['validation_samples']} held-out samples)", file=out)
    result["loss_curve"] = [e.loss for e in tuner.history_.epochs]
    if args.plot:
        _plot(args.plot, result)
        info(args, f"loss curve drawn to {args.plot}")
    write_json(args.json, result)  # the results first: an optional save below cannot lose them
    if args.save_adapter:
        tuner.save_adapter(args.save_adapter, overwrite=args.force)
        info(args, f"adapter saved to {args.save_adapter}")
    if args.save_model:
        tuner.merged().save(args.save_model)
        info(args, f"merged model saved to {args.save_model}")
    if args.onnx:
        from ..onnx import to_onnx
        to_onnx(tuner, args.onnx)
        info(args, f"ONNX graph saved to {args.onnx}")
    return 0


def _choose_scheme(args: argparse.Namespace, model, task, train: dict, limit: int):
    """--scheme auto: the scheme chosen for --budget at the run's batch size, measured on a
    validation split of the task's fine-tuning data (the test split is not used)."""
    from ..errors import BudgetError
    from ..memory import plan_memory
    from ..scheme_search import auto_scheme

    n = len(task.y_finetune)

    def plan_fn(scheme: str):
        return plan_memory(model, "sparse", batch_size=train["batch_size"], n_samples=n,
                           optimizer=train["optimizer"], scheme=scheme, train_last_bias=args.train_last_bias)

    info(args, f"choosing a sparse scheme for {args.budget} at batch {train['batch_size']}")
    try:
        return auto_scheme(model, task.x_finetune, task.y_finetune, budget=limit, plan_fn=plan_fn,
                           epochs=args.auto_epochs, batch_size=train["batch_size"], lr=train["lr"],
                           optimizer=train["optimizer"], seed=train["seed"], val_fraction=args.auto_val_split,
                           layers=args.auto_layers, ratios=args.auto_ratios, engine="auto", verify=False,
                           progress=lambda t: info(args, t))
    except BudgetError as e:
        hint = "; a smaller --batch-size needs less" if train["batch_size"] > 1 else ""
        raise BudgetError(f"{e} (at batch {train['batch_size']}{hint})") from None


def _plot(path: str, result: dict) -> None:
    """The training loss per epoch (and the test accuracy with --curve), written atomically."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io_atomic import write_bytes_atomic

    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = range(1, len(result["loss_curve"]) + 1)
    ax.plot(epochs, result["loss_curve"], label="training loss")
    if result.get("val_loss_curve"):
        ax.plot(epochs, result["val_loss_curve"], label="validation loss")
        ax.legend()
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(f"{result['method']} on {result['task']}")
    if result.get("curve"):
        ax2 = ax.twinx()
        ax2.plot(epochs, result["curve"], color="tab:orange", label="test accuracy")
        ax2.set_ylabel("test accuracy")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
