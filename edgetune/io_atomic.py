"""Model files: atomic writes (temporary file beside the target, fsync, rename), directory
sets swapped in whole, a lock per target, and the validated read of a model or adapter
directory's JSON config.

A crash at any moment leaves either the old file (or directory) or the new one, never
half of one and never a mix of two saves.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, IO, Iterator

from .errors import ModelFileError, OutputError, UsageError

# Hidden names of edgetune's own temporaries beside a target called NAME:
#   .NAME.edgetune-tmp-PID-XXXX.tmp   a file being written (write_atomic)
#   .NAME.edgetune-new-PID-XXXX       a directory set being written (write_dir_atomic)
#   .NAME.edgetune-old-PID-XXXX       the previous directory, moved aside for the swap
#   .NAME.edgetune-lock               the lock file (kept: deleting a lock file races)
_TAG = ".edgetune-"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _test_hook(step: str) -> None:
    """Crash tests stop a real process at a named step: EDGETUNE_TEST_HOOK=step=kill|sleep:SECONDS."""
    spec = os.environ.get("EDGETUNE_TEST_HOOK")
    if not spec:
        return
    for item in spec.split(","):
        name, _, action = item.partition("=")
        if name != step:
            continue
        if action == "kill":
            os.kill(os.getpid(), 9)
        elif action.startswith("sleep:"):
            time.sleep(float(action[len("sleep:"):]))


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file, then atomically move it to ``path``.

    The file gets the mode a plain ``open`` would give it (0666 less the umask). Stale
    temporaries left by killed edgetune processes beside ``path`` are removed first.
    """
    path = Path(path)
    ensure_parent(path)
    clean_stale(path)
    tmp = path.parent / f".{path.name}{_TAG}tmp-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666 & ~_umask())
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    fsync_dir(path.parent)
    return path


def ensure_parent(path: str | os.PathLike) -> Path:
    """Create ``path``'s parent folders, or raise OutputError saying why that is impossible.

    Call it before long work too, so that a bad output path fails at once, not after it.
    """
    path = Path(path)
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot write {path}: {parent} is a file, not a directory")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def check_writable(path: str | os.PathLike, *, directory: bool = False) -> None:
    """Raise OutputError now if ``path`` (a file, or with ``directory`` a folder) could not be
    written later; creates nothing, so a run that fails leaves no empty folders behind."""
    path = Path(os.path.abspath(path))
    if path.exists():
        if directory and not path.is_dir():
            raise OutputError(f"cannot write into {path}: it is a file, not a directory")
        target = path if directory else path.parent
    else:
        target = path.parent
        while not target.exists() and target != target.parent:
            target = target.parent
    if not target.is_dir():
        raise OutputError(f"cannot write {path}: {target} is a file, not a directory")
    if not os.access(target, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: no permission to write in {target}")


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create directory ``path`` (and its parents), or raise OutputError saying why not."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write into {path}: it is a file, not a directory")
    ensure_parent(path / "x")
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda f: f.write(data))


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, allow_nan=False, default=_json_default) + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_bytes_atomic(path, json_text(obj).encode())


def _json_default(o: Any) -> Any:
    # NumPy scalars and arrays appear in results; JSON wants plain Python values.
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (best effort where the OS does not allow it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- locks
_held: dict[str, list] = {}


@contextmanager
def target_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of output ``path`` (a file beside it); refuse if another process holds it.

    Re-entrant within a process, so a command can hold it across training and the save.
    """
    key = os.path.abspath(path)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    try:
        import fcntl
    except ImportError:  # no flock (Windows): atomic renames still keep the target whole
        yield
        return
    ensure_parent(key)
    lock = Path(key).parent / f".{Path(key).name}{_TAG}lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OutputError(f"{path} is being written by another edgetune process; wait for it to finish "
                          f"or choose another output path") from None
    _held[key] = [fd, 1]
    try:
        _test_hook("locked")
        yield
    finally:
        del _held[key]
        os.close(fd)


def _is_locked_elsewhere(path: Path) -> bool:
    """True if another process holds the lock of ``path`` right now."""
    key = os.path.abspath(path)
    if key in _held:
        return False
    lock = Path(key).parent / f".{Path(key).name}{_TAG}lock"
    try:
        import fcntl
        fd = os.open(lock, os.O_RDWR)
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases a lock this probe took
    return False


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_stale(path: str | os.PathLike) -> None:
    """Remove edgetune's temporaries beside ``path`` (and inside it, for a directory) that a
    killed process left: named by a process that is gone, or directory sets of ``path`` while
    this process holds its lock (no other writer can be using them)."""
    path = Path(path)
    pat = re.compile(re.escape(f".{path.name}{_TAG}") + r"(tmp|new|old)-(\d+)-[0-9a-f]+(\.tmp)?$")
    places = [(path.parent, pat)]
    if path.is_dir() and not path.is_symlink():
        places.append((path, re.compile(r"\..+" + re.escape(_TAG) + r"tmp-(\d+)-[0-9a-f]+\.tmp$")))
    for where, rx in places:
        try:
            entries = list(os.scandir(where))
        except OSError:
            continue
        for e in entries:
            m = rx.match(e.name)
            if not m:
                continue
            pid = int(m.group(2) if rx is pat else m.group(1))
            is_dir_set = rx is pat and m.group(1) != "tmp"
            if pid == os.getpid():
                continue
            # a directory set under a lock this process holds has no live writer; otherwise
            # a temporary is stale when the process named in it is gone
            if not (is_dir_set and os.path.abspath(path) in _held) and _pid_alive(pid):
                continue
            if rx is pat and m.group(1) == "old" and not path.exists():
                continue  # the only copy of the model: recover_dir puts it back
            if is_dir_set and _is_locked_elsewhere(path):
                continue
            try:
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path, ignore_errors=True)
                else:
                    os.unlink(e.path)
            except OSError:
                pass


# ---------------------------------------------------------------------- directory sets
def _asides(path: Path, kind: str) -> list[Path]:
    pat = re.compile(re.escape(f".{path.name}{_TAG}{kind}-") + r"\d+-[0-9a-f]+$")
    try:
        found = [Path(e.path) for e in os.scandir(path.parent) if pat.match(e.name) and e.is_dir()]
    except OSError:
        return []
    return sorted(found, key=lambda p: p.stat().st_mtime)


def recover_dir(path: str | os.PathLike) -> Path:
    """The directory to read for ``path``: ``path`` itself, or, if a save was killed in the
    instant between moving the old directory aside and the new one into place, the old one
    (moved back when no writer holds the lock)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return path
    aside = _asides(path, "old")
    if not aside:
        return path
    if not _is_locked_elsewhere(path):
        try:
            os.rename(aside[-1], path)
            fsync_dir(path.parent)
            return path
        except OSError:
            pass
    return aside[-1]


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux") or os.environ.get("EDGETUNE_TEST_NO_EXCHANGE"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot; rename instead
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_dir_atomic(path: str | os.PathLike, files: dict[str, bytes], *, carry_over: bool = True,
                     overwrite: bool = True) -> Path:
    """Write the files of a model or adapter directory as one set.

    The new set is written into a hidden directory beside ``path``, fsynced, then swapped
    with the old directory, so that a reader (or a crash) sees the old set or the new one,
    never a mix. Other files in an existing directory are carried over (hard links) unless
    ``carry_over`` is False. A name may hold sub-folders (``"a/adapter_config.json"``).
    Without ``overwrite``, a ``path`` that already holds a model or adapter is refused.
    """
    def fill(new: Path) -> None:
        subdirs = sorted({str(Path(name).parent) for name in files} - {"."})
        for sub in subdirs:
            (new / sub).mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            fd = os.open(new / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                         0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            _test_hook("file-written")
        for sub in subdirs:
            fsync_dir(new / sub)

    def refuse_existing(p: Path) -> None:
        if not overwrite and is_model_dir(p):
            raise UsageError(f"{p} already holds a model or adapter; pass overwrite=True (--force) to replace it")

    tops = {Path(name).parts[0] for name in files}
    return replace_dir_atomic(path, fill, keep=(lambda name: name not in tops) if carry_over else None,
                              check=refuse_existing)


def replace_dir_atomic(path: str | os.PathLike, fill: Callable[[Path], None], *,
                       keep: Callable[[str], bool] | None = None,
                       check: Callable[[Path], None] | None = None) -> Path:
    """Put a new directory at ``path`` in one step: ``fill(new)`` writes it into a hidden
    directory beside ``path``, which is then exchanged with the old one atomically (or, where
    the file system cannot exchange, renamed in two steps that ``recover_dir`` completes after
    a crash). Holds ``path``'s lock throughout; ``check(path)`` runs under that lock before
    anything is written (to refuse an existing output). Entries of the old directory for which
    ``keep(name)`` is true are carried over (hard links); with ``keep`` None nothing is.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a directory")
    ensure_parent(path)
    with target_lock(path):
        recover_dir(path)
        clean_stale(path)
        if check is not None:
            check(path)
        new = path.parent / f".{path.name}{_TAG}new-{os.getpid()}-{secrets.token_hex(4)}"
        placed = False
        try:
            os.mkdir(new)  # 0777 less the umask, like any directory
            fill(new)
            if keep is not None and path.is_dir():
                for e in os.scandir(path):
                    if keep(e.name) and not (e.name.startswith(".") and _TAG in e.name):
                        if e.is_dir(follow_symlinks=False):
                            shutil.copytree(e.path, new / e.name, symlinks=True, copy_function=_link_or_copy)
                        else:
                            _link_or_copy(e.path, new / e.name)
            fsync_dir(new)
            _test_hook("set-written")
            if not path.exists():
                os.rename(new, path)
                placed = True
            elif _exchange(new, path):
                placed = True  # ``new`` now holds the old set
                fsync_dir(path.parent)
                _test_hook("swapped")
                shutil.rmtree(new, ignore_errors=True)
            else:
                old = path.parent / f".{path.name}{_TAG}old-{os.getpid()}-{secrets.token_hex(4)}"
                os.rename(path, old)
                _test_hook("moved-aside")
                os.rename(new, path)
                placed = True
                fsync_dir(path.parent)
                _test_hook("swapped")
                shutil.rmtree(old, ignore_errors=True)
            fsync_dir(path.parent)
        except BaseException as e:
            if not placed:
                shutil.rmtree(new, ignore_errors=True)
            if isinstance(e, OSError):
                raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
            raise
    return path


def check_not_input(output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], *,
                    option: str = "output", replaced: bool = False) -> None:
    """Refuse an output that equals, contains or lies inside an input (resolved through
    symlinks): writing it would replace or delete what the command reads. ``inputs`` maps a
    name for the message (e.g. "--model") to a path; None entries are skipped. For a
    directory that is ``replaced`` whole, the current directory counts as an input too: it
    would be swapped away under the user's feet."""
    out = os.path.realpath(output)
    named = {"the current directory": os.getcwd()} if replaced else {}
    named.update({k: v for k, v in inputs.items() if v is not None and str(v) != "-"})
    for name, i in named.items():
        real = os.path.realpath(i)
        if out == real:
            raise UsageError(f"{option} {output} is {name} ({i}); refusing to write an output over an input")
        if real.startswith(out.rstrip(os.sep) + os.sep):
            raise UsageError(f"{option} {output} contains {name} ({i}); refusing to replace a directory that "
                             f"holds an input")
        if name != "the current directory" and out.startswith(real.rstrip(os.sep) + os.sep) and os.path.isdir(real):
            raise UsageError(f"{option} {output} lies inside {name} ({i}); write outputs elsewhere")


def _link_or_copy(src: str, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def is_model_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` holds an edgetune model or adapter (what --force protects)."""
    path = Path(path)
    return any((path / n).exists() for n in ("config.json", "model.safetensors", "adapter_config.json",
                                             "adapter_model.safetensors"))


def read_json_config(directory: Path, config_name: str, weights_name: str, kind: str
                     ) -> tuple[dict[str, Any], Path, Path]:
    """Check that a model/adapter directory holds both its files and parse its JSON config.

    Returns (config, config path, weights path); raises ModelFileError naming the problem.
    """
    directory = recover_dir(directory)
    cfg_path, w_path = directory / config_name, directory / weights_name
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ModelFileError(f"{directory} is not {kind}: {p.name} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelFileError(f"{cfg_path}: not a JSON object")
    if not isinstance(cfg.get("format_version", 0), int):
        raise ModelFileError(f"{cfg_path}: format_version must be a whole number")
    return cfg, cfg_path, w_path



def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def check_config_field(cfg: dict[str, Any], cfg_path: Path, name: str, ok: Callable[[Any], bool],
                       expected: str, *, required: bool = False) -> None:
    """Raise ModelFileError naming ``cfg_path`` and field ``name`` unless ``ok(value)``.

    A missing field passes unless ``required``; ``expected`` says what the field should hold.
    """
    if name not in cfg:
        if required:
            raise ModelFileError(f"{cfg_path}: field '{name}' is missing (expected {expected})")
        return
    value = cfg[name]
    if not ok(value):
        shown = json.dumps(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ModelFileError(f"{cfg_path}: field '{name}' must be {expected}, got {shown}")


def check_input_std(std: Any, w_path: Path) -> None:
    """A model's ``input.std`` divides every input: each entry must be a positive number."""
    import numpy as np

    if std is not None and not np.all(np.asarray(std) > 0):
        bad = int(np.argmin(np.asarray(std)))
        raise ModelFileError(f"{w_path}: tensor 'input.std' must be positive (it divides the inputs), but entry "
                             f"{bad} is {float(np.asarray(std)[bad])}")


def check_model_config(cfg: dict[str, Any], cfg_path: Path) -> None:
    """The fields a model loader reads: sizes, activation, labels (float and int8 alike)."""
    from .nn.activations import ACTIVATIONS

    check_config_field(cfg, cfg_path, "sizes",
                       lambda v: isinstance(v, list) and len(v) >= 2 and all(_is_int(s) and s >= 1 for s in v),
                       "a list of at least 2 positive whole numbers (input, ..., outputs)", required=True)
    check_config_field(cfg, cfg_path, "activation", lambda v: isinstance(v, str) and v in ACTIVATIONS,
                       f"one of {', '.join(ACTIVATIONS)}")
    n_out = cfg["sizes"][-1]
    check_config_field(cfg, cfg_path, "labels",
                       lambda v: v is None or (isinstance(v, list) and len(v) == n_out
                                               and all(isinstance(s, str) for s in v)),
                       f"a list of {n_out} class names (strings), one per output")
    check_config_field(cfg, cfg_path, "weights_sha256", lambda v: isinstance(v, str), "a hex digest (string)")


def check_adapter_config(cfg: dict[str, Any], cfg_path: Path) -> None:
    """The fields ``FineTuner.load_adapter`` reads from an edgetune adapter config."""
    check_config_field(cfg, cfg_path, "method", lambda v: isinstance(v, str), "a method name (string)",
                       required=True)
    check_config_field(cfg, cfg_path, "r", lambda v: _is_int(v) and v >= 1, "a whole number >= 1")
    check_config_field(cfg, cfg_path, "lora_alpha", lambda v: v is None or (_is_number(v) and v > 0),
                       "a positive number or null")
    check_config_field(cfg, cfg_path, "train_last_bias", lambda v: isinstance(v, bool), "true or false")
    check_config_field(cfg, cfg_path, "scheme", lambda v: v is None or isinstance(v, str), "a string or null")
    check_config_field(cfg, cfg_path, "qas", lambda v: v is None or isinstance(v, bool), "true, false or null")
    check_config_field(cfg, cfg_path, "base_model_sizes",
                       lambda v: isinstance(v, list) and all(_is_int(s) for s in v), "a list of whole numbers")
    check_config_field(cfg, cfg_path, "base_model_digest", lambda v: v is None or isinstance(v, str),
                       "a string or null")
