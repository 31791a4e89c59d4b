"""A complete fine-tuning run in plain PyTorch, the counterpart of

    edgetune finetune --task TASK --method METHOD

used by the benchmark suite's peak-memory section: load the task, standardise inputs with
the pre-training split's statistics, pre-train an MLP (all tensors, SGD), fine-tune it with
``METHOD`` (skip2-lora with a tensor skip-cache, lora-all, or ft-all) and print the test
accuracy on the last line. The data are read with edgetune's loaders (NumPy only).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_ref  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--method", default="skip2-lora", choices=torch_ref.TORCH_METHODS)
    p.add_argument("--hidden", default=None, help="comma-separated hidden widths (task default)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--pretrain-epochs", type=int)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from edgetune import load_task

    task = load_task(args.task, args.data_dir)
    d = task.defaults
    hidden = [int(v) for v in args.hidden.split(",")] if args.hidden else d.get("hidden", [96, 96])
    epochs = args.epochs or d.get("epochs", 100)
    pre_epochs = args.pretrain_epochs or d.get("pretrain_epochs", epochs)
    lr, bs = d.get("lr", 0.01), d.get("batch_size", 20)
    torch.manual_seed(args.seed)

    x_pre = torch.from_numpy(task.x_pretrain.astype(np.float32))
    mean, std = x_pre.mean(0), x_pre.std(0, unbiased=False)
    std[std < 1e-8] = 1.0

    def prep(x: np.ndarray) -> np.ndarray:
        return ((torch.from_numpy(x.astype(np.float32)) - mean) / std).numpy()

    sizes = [task.n_features, *hidden, task.n_classes]
    layers: list[nn.Module] = []
    for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(i, o))
        if k < len(sizes) - 2:
            layers.append(nn.ReLU())
    mlp = nn.Sequential(*layers)
    torch_ref.finetune("ft-all", mlp, prep(task.x_pretrain), task.y_pretrain, epochs=pre_epochs, batch_size=bs,
                       lr=lr, seed=args.seed)
    x_ft, x_te = prep(task.x_finetune), prep(task.x_test)
    before = torch_ref.accuracy(mlp, x_te, task.y_test)
    if args.method == "ft-all":
        model: nn.Module = mlp
    elif args.method == "lora-all":
        model = torch_ref.add_lora(mlp, None)
    else:
        model = torch_ref.Skip2LoRA(mlp, len(x_ft))
    torch_ref.finetune(args.method, model, x_ft, task.y_finetune, epochs=epochs, batch_size=bs, lr=lr, seed=args.seed)
    after = torch_ref.accuracy(model, x_te, task.y_test)
    print(f"test accuracy {before:.4f} -> {after:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
