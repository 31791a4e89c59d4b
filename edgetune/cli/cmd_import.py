"""edgetune import: an ONNX model (an MLP or a CNN) as an edgetune model directory."""
from __future__ import annotations

import argparse

from ..io_atomic import target_lock
from ._common import add_force_arg, add_output_args, check_outputs, info, write_json

NAME = "import"
HELP = "convert an ONNX model (an MLP or a CNN) into an edgetune model directory"
DESCRIPTION = """Read an ONNX file holding a multi-layer perceptron or a convolutional network (from
torch.onnx.export, tf2onnx, or 'edgetune finetune --onnx') and save it as
model.safetensors + config.json for 'edgetune finetune --model'. Gemm, MatMul+Add, Conv
(1-D and 2-D, any group, dilation 1, symmetric padding), MaxPool, AveragePool,
GlobalAveragePool, residual Add of an earlier layer's input, Relu/Clip(0,6)/LeakyRelu/
Tanh/Sigmoid, inference BatchNormalization (folded), Flatten, Reshape, a leading Transpose
and per-feature Sub/Mul/Div before the first layer (the input normalisation) convert;
anything else is refused before anything is written, naming the node and listing what
converts (see docs/onnx.md). Needs the onnx extra (pip install edgetune[onnx]).

examples:
  edgetune import model.onnx --out runs/model
  edgetune import keras.onnx --out runs/model --labels quiet,damaged --json -"""
ORDER = 22


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("onnx_file", metavar="MODEL.onnx", help="the ONNX file (external data files beside it are read)")
    p.add_argument("--out", required=True, metavar="DIR", help="model directory to write")
    p.add_argument("--labels", metavar="A,B,...", help="names of the outputs (default: those the file records, "
                                                     "else 0, 1, ...)")
    add_force_arg(p)
    add_output_args(p)


def run(args: argparse.Namespace) -> int:
    from ..onnx import read_onnx

    check_outputs(args.json, dirs=(args.out,), args=args)
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    with target_lock(args.out):
        imported = read_onnx(args.onnx_file, labels=labels)  # every refusal comes before the write
        imported.backbone.save(args.out)
    rep = {"onnx": args.onnx_file, "model": args.out, **imported.summary()}
    b = imported.backbone
    what = (f"{'-'.join(map(str, b.sizes))} ({b.activation.name}" if all(s.kind == "dense" for s in b.specs)
            else f"{b.n_layers} layers ({', '.join(s.kind for s in b.specs)}; input {list(b.input_shape)}")
    print(f"imported {what}, {b.dtype}"
          f"{', with input normalisation' if b.input_mean is not None else ''}) from {args.onnx_file} "
          f"(input '{imported.input_name}' {imported.input_shape}), saved to {args.out}")
    for note in imported.notes:
        info(args, f"  note: {note}")
    write_json(args.json, rep)
    return 0
