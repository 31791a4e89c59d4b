"""The ``edgetune`` command.

Each subcommand lives in its own module ``edgetune/cli/cmd_<name>.py`` that defines
``NAME``, ``HELP``, ``ORDER`` (position in ``--help``), ``add_arguments(parser)`` and
``run(args) -> int``. Adding a subcommand means adding one file.

Exit codes: 0 success, 1 failure (bad data, damaged file, budget exceeded), 2 usage error.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys
from types import ModuleType

from ..errors import EdgetuneError, UsageError

ENGINES = ("auto", "c", "numpy")


def _command_names() -> list[str]:
    """The subcommands, from the module names alone (nothing imported)."""
    return [info.name[len("cmd_"):] for info in pkgutil.iter_modules(__path__) if info.name.startswith("cmd_")]


def _command_modules(only: str | None = None) -> list[ModuleType]:
    mods = []
    for name in _command_names():
        if only is None or name == only:
            mods.append(importlib.import_module(f"{__name__}.cmd_{name}"))
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.NAME))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 on usage errors; keep that
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}{self._suggestion(message)}\n")

    def _suggestion(self, message: str) -> str:
        """'did you mean ...?' for a mistyped command, choice or option."""
        import difflib

        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'?([^',\s]+)'?", m.group(2))
            close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.6)
            return f" (did you mean '{close[0]}'?)" if close else ""
        m = re.match(r"unrecognized arguments: (.*)", message)
        if m:
            options = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            for subparsers in (a for a in self._actions if isinstance(a, argparse._SubParsersAction)):
                for sub in subparsers.choices.values():
                    options += [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
            hints = []
            for word in m.group(1).split():
                if word.startswith("--"):
                    close = difflib.get_close_matches(word.split("=")[0], sorted(set(options)), n=1, cutoff=0.7)
                    if close:
                        hints.append(f"'{close[0]}' for '{word.split('=')[0]}'")
            return f" (did you mean {', '.join(hints)}?)" if hints else ""
        return ""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``edgetune`` parser; with ``only``, just that subcommand's (``main`` runs one command,
    and importing every command's module would add their imports to its memory)."""
    from .. import __version__

    parser = _Parser(
        prog="edgetune",
        description="Fine-tune small neural networks on the device where they run.",
        epilog="Run 'edgetune COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"edgetune {__version__}")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="BLAS threads (default 1, or $EDGETUNE_THREADS): small batches run fastest on one")
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help="training engine: auto (compiled C when built, else NumPy; the default, or "
                             "$EDGETUNE_ENGINE), c, numpy. Also accepted after the command")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in _command_modules(only):
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _set_threads(threads: int | None) -> None:
    import os

    from ..threads import set_blas_threads

    if threads is None:
        env = os.environ.get("EDGETUNE_THREADS", "1")
        try:
            threads = int(env)
        except ValueError:
            raise UsageError(f"EDGETUNE_THREADS must be a whole number, got {env!r}") from None
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    set_blas_threads(threads)


def _join_size_values(argv: list[str]) -> list[str]:
    """Turn ``--budget -5KB`` into ``--budget=-5KB`` so a negative size is refused with its own
    message, not taken for an unknown option."""
    from ._common import SIZE_OPTIONS

    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out.extend(argv[i:])
            break
        if a in SIZE_OPTIONS and i + 1 < len(argv) and re.match(r"-[0-9.]", argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


class _Terminated(BaseException):
    """SIGTERM, raised in the command so that every ``finally`` runs (temporaries removed)."""


def _on_sigterm(signum, _frame):
    raise _Terminated()


def _command_in(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (after the global options), if it names one."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--threads", "--engine"):
            i += 2
            continue
        if a.startswith("-"):
            if a in ("-h", "--help", "--version"):
                return None
            i += 1
            continue
        return a if a in _command_names() else None
    return None


def _interrupt_hint(args: argparse.Namespace) -> str:
    """What an interrupted run kept, and how not to lose the next one."""
    if not hasattr(args, "checkpoint"):
        return ""
    if args.checkpoint:
        return (f"; {args.checkpoint} holds the run up to its last save: run the same command again "
                f"to resume from it")
    return ("; nothing was saved. With --checkpoint FILE the run is saved as it goes and the same "
            "command resumes it")


#: Commands whose whole run is edgetune's own code and NumPy: run as the ``edgetune`` program, they
#: never load OpenSSL (see ``_lighten_process``). Commands that download (``data``), talk to other
#: machines (``fleet``) or import third-party converters keep the interpreter as it is.
LIGHT_COMMANDS = frozenset({"finetune", "pretrain", "evaluate", "predict", "quantize", "reproduce", "plan",
                            "methods", "info"})

#: glibc's mallopt parameter M_MMAP_THRESHOLD and the value it is fixed at (glibc's own initial one).
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 128 * 1024


def _lighten_process(command: str | None) -> None:
    """Process-wide settings for the ``edgetune`` program (never for ``main`` called from Python).

    - NumPy's random module imports ``secrets``, whose ``hmac`` loads CPython's OpenSSL hashes
      (``_hashlib``, which maps OpenSSL's libcrypto into the process). A light command marks that
      module missing before anything imports it, so ``hashlib`` uses CPython's built-in SHA-2,
      SHA-3, BLAKE2 and MD5 (the same digests) and ``hmac`` its pure-Python form.
    - glibc raises its mmap threshold to the size of each large block freed, so that arrays of a
      few MB made after a freed one are carved from the heap, where they stay resident after they
      are freed. Fixing the threshold keeps every array over 128 KB in its own mapping, returned
      to the system when NumPy frees it.

    BENCHMARKS.md ("Peak memory") has what each saves on a complete damage1 fine-tune.
    """
    if command in LIGHT_COMMANDS and "_hashlib" not in sys.modules:
        sys.modules["_hashlib"] = None  # type: ignore[assignment]  # "import _hashlib" -> ImportError
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        except (AttributeError, OSError):  # not glibc (musl has no such call): keep its defaults
            pass


def main(argv: list[str] | None = None) -> int:
    """The ``edgetune`` program. ``argv`` None means the process is the program itself (the
    console script, ``python -m edgetune``): only then are process-wide settings changed."""
    if argv is None:
        _lighten_process(_command_in(_join_size_values(sys.argv[1:])))
    argv = _join_size_values(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    import os

    import signal
    import threading

    from . import _common

    engine_before = os.environ.get("EDGETUNE_ENGINE")
    stdout_before = sys.stdout
    json_to_stdout = getattr(args, "json", None) == "-"
    sigterm_before = None
    if threading.current_thread() is threading.main_thread():
        sigterm_before = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _set_threads(args.threads)
        if args.engine is not None:  # read by every FineTuner of the command and of its child processes
            os.environ["EDGETUNE_ENGINE"] = args.engine
        if json_to_stdout:  # stdout carries the JSON alone: the human report goes to stderr
            _common.JSON_STDOUT = stdout_before
            sys.stdout = sys.stderr
        return int(args._run(args) or 0)
    except UsageError as e:
        print(f"edgetune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except EdgetuneError as e:
        print(f"edgetune {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the file system said no (permissions, disk full, a file in the way)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"edgetune {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edgetune {args.command}: interrupted{_interrupt_hint(args)}", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"edgetune {args.command}: terminated (SIGTERM); nothing half-written was left", file=sys.stderr)
        return 143
    finally:  # main() called from Python (tests, notebooks) leaves the caller's environment as it was
        if sigterm_before is not None:
            signal.signal(signal.SIGTERM, sigterm_before)
        if json_to_stdout:
            sys.stdout = stdout_before
            _common.JSON_STDOUT = None
        if args.engine is not None:
            if engine_before is None:
                os.environ.pop("EDGETUNE_ENGINE", None)
            else:
                os.environ["EDGETUNE_ENGINE"] = engine_before


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
