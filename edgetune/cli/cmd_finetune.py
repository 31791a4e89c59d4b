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
  edgetune finetune --task damage1 --model model-int8/ --method sparse --scheme b2,w-1:1/2 --budget 256KB"""
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
                        "layer's weight rows (default b2,w-1; see 'edgetune plan')")
    g.add_argument("--no-qas", dest="qas", action="store_const", const=False,
                   help="sparse on an int8 model: plain gradients, without Quantization-Aware Scaling")
    g.add_argument("--budget", metavar="BYTES",
                   help="training-memory budget, e.g. 256KB: refuse (exit 1) before fine-tuning if the planned "
                        "memory exceeds it (see 'edgetune plan')")
    add_train_args(p)
    g = p.add_argument_group("pre-training (only without --model)")
    g.add_argument("--hidden", type=int_list, metavar="W1,W2,...", help="hidden widths (task default, else 96,96)")
    g.add_argument("--pretrain-epochs", type=positive_int, help="pre-training epochs (task default)")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="save the run as it goes (see --checkpoint-every); run the same command again to resume "
                        "after a crash")
    p.add_argument("--checkpoint-every", type=positive_int, metavar="N",
                   help="with --checkpoint: save every N epochs (default: every 10 s of training, and at the end)")
    p.add_argument("--curve", action="store_true", help="measure test accuracy after every epoch (not counted as training time)")
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
    from ..quant import load_any
    from ..units import parse_bytes

    cls = method_class(args.method)  # unknown names fail before any work
    if (args.cache_budget or args.partial_cache) and not cls.uses_cache:
        raise UsageError(f"--cache-budget and --partial-cache apply to methods with a skip-cache "
                         f"(skip2-lora), not {args.method}")
    if args.partial_cache and not args.cache_budget:
        raise UsageError("--partial-cache needs --cache-budget")
    if args.save_model and not cls.mergeable:
        raise UsageError(f"--save-model: {args.method} does not fold into a plain backbone in general (its "
                         f"adapters on earlier layers' inputs reach the output around the layers in between); "
                         f"use --save-adapter, or a lora-*/ft-* method for a merged model")
    budget = parse_bytes(args.cache_budget, "--cache-budget") if args.cache_budget else None
    limit = parse_bytes(args.budget, "--budget") if args.budget is not None else None
    if args.checkpoint_every and not args.checkpoint:
        raise UsageError("--checkpoint-every needs --checkpoint FILE")
    check_outputs(args.json, args.onnx, dirs=(args.save_adapter, args.save_model), args=args)
    if args.onnx:
        from ..onnx import require_onnx
        require_onnx()  # a missing extra is said before training, not after
    if args.checkpoint:
        check_outputs(args.checkpoint, args=args, own="--checkpoint")
    # every output locked before any work, so nothing is written by a run that cannot finish
    lock_outputs(outputs, args.json, args.checkpoint, args.save_adapter, args.save_model)
    task = load_task_arg(args)
    info(args, task.summary())
    progress = None if not args.quiet else False
    if args.model:
        model = load_any(args.model)
    else:
        info(args, "no --model given: pre-training a backbone on the task's pre-train split")
        model, rep = pretrain_on_task(task, hidden=args.hidden, epochs=args.pretrain_epochs, seed=args.seed,
                                      progress=progress)
        info(args, f"pre-trained {'-'.join(map(str, model.sizes))} in {rep['pretrain_seconds']:.2f} s; "
                   f"test accuracy {rep['accuracy_test']:.4f}")
    train = train_kwargs(args, task.defaults)
    if limit is not None:
        from ..memory import check_budget, plan_memory

        check_budget(plan_memory(model, args.method, batch_size=train["batch_size"], n_samples=len(task.y_finetune),
                                 optimizer=train["optimizer"], rank=args.rank,
                                 train_last_bias=args.train_last_bias, scheme=args.scheme), limit)
    tuner, result = finetune_on_task(
        task, model, args.method,
        method_options={"rank": args.rank, "alpha": args.alpha, "train_last_bias": args.train_last_bias,
                        "cache_budget": budget, "cache_overflow": "partial" if args.partial_cache else "error",
                        "scheme": args.scheme, "qas": args.qas},
        train_options=train, curve=args.curve, progress=progress, checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every)
    out = sys.stdout
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
