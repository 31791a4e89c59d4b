"""The benchmark suite's command-line options. The suite is benchmarks/ of a source checkout;
its options live in the package, so that `edgetune bench --help` is the same everywhere and
building the parser does not import the suite."""
from __future__ import annotations

import argparse

SECTIONS = ("methods", "torch", "memory", "scaling", "limit", "instructions")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="fewer repeats and epochs, a smoke run with noisy ratios: each section prints its time "
                        "on stderr (instructions, under valgrind, takes the longest: 1-2 minutes; "
                        "--only to leave it out)")
    p.add_argument("--tiny", action="store_true", help="smoke test on tiny synthetic shapes (numbers are meaningless)")
    p.add_argument("--data-dir", metavar="DIR", help="where the built-in data sets are (default: $EDGETUNE_DATA, then the user cache)")
    p.add_argument("--only", metavar="SECTIONS", help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    p.add_argument("--threads", type=int, default=1, help="BLAS and torch threads for the measurements (default 1)")
    p.add_argument("--repeats", type=int, help="timed repeats per measurement (default 3, --quick 1)")
    p.add_argument("--plot", metavar="PNG", help="write the scaling plot here (needs matplotlib)")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown (e.g. BENCHMARKS.md)")
    p.add_argument("--json", metavar="PATH", help="also write the raw numbers as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
