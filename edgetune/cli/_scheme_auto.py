"""The options of ``--scheme auto`` (plan, finetune, export), apart from ``cmd_plan`` so that a
command's parser imports only these few lines, not the planner's command."""
from __future__ import annotations

import argparse

from ._common import positive_float, positive_int


def add_auto_args(g) -> None:
    """The options of --scheme auto, shared with 'edgetune finetune'."""
    from ..scheme_search import DEFAULT_EPOCHS, DEFAULT_VAL_FRACTION

    g.add_argument("--auto-epochs", type=positive_int, default=DEFAULT_EPOCHS, metavar="N",
                   help=f"--scheme auto: epochs of each short fine-tune of the analysis (default {DEFAULT_EPOCHS})")
    g.add_argument("--auto-layers", type=positive_int, metavar="L",
                   help="--scheme auto: try only the last L layers with weights (default all); fewer fine-tunes")
    g.add_argument("--auto-ratios", metavar="R,R,...", type=_ratio_list,
                   help="--scheme auto: the channel ratios tried, of 1/8, 1/4, 1/2, 1 (default all four)")
    g.add_argument("--auto-val-split", type=positive_float, default=DEFAULT_VAL_FRACTION, metavar="F",
                   help=f"--scheme auto: share of the fine-tuning data held out to validate the analysis "
                        f"(default {DEFAULT_VAL_FRACTION})")


def _ratio_list(text: str) -> list[str]:
    from fractions import Fraction

    from ..methods.sparse import RATIOS

    items = [t for t in text.replace(" ", "").split(",") if t]
    try:
        ok = items and all(Fraction(t) in RATIOS for t in items)
    except (ValueError, ZeroDivisionError):
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected ratios of 1/8, 1/4, 1/2, 1 separated by commas, got {text!r}")
    return items


def check_auto_args(args: argparse.Namespace, method: str | None) -> bool:
    """True for --scheme auto, after refusing the combinations it cannot run."""
    if getattr(args, "scheme", None) is None:
        return False
    from ..errors import UsageError
    from ..methods.sparse import AUTO

    if args.scheme.strip().lower() != AUTO:
        return False
    if method not in (None, "sparse"):
        raise UsageError(f"--scheme auto chooses a sparse-update scheme: use it with --method sparse, not {method}")
    if args.budget is None:
        raise UsageError("--scheme auto chooses the scheme for a memory budget: give --budget, e.g. --budget 256KB")
    if not args.auto_val_split < 1:
        raise UsageError(f"--auto-val-split must be less than 1 (a share of the fine-tuning data), "
                         f"got {args.auto_val_split}")
    return True
