"""Hostile input as a table: each case is a command line run against a small world of real
files (a model, an adapter, a task, a checkpoint), with the exit code it must give, a piece
of the message it must print, no traceback, the files it must leave unchanged, and no
temporary left behind.

A case that needs more than a command line (killed processes, two processes at once, the
Python API) is a test function further down; they check the same four things.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import edgetune as et
from edgetune.cli import main
from edgetune.errors import UsageError
from tests.conftest import toy_task

ROOT = Path(__file__).resolve().parents[1]

#: Names of temporaries that a finished command must not leave (lock files may stay).
LEFTOVER = re.compile(r"\.edgetune-(tmp|new|old)-|\.old-\d+$|\.tmp$")

#: What every case may read and must never change.
INPUTS = ("model", "adapter", "task.npz", "other-model")
CHECKPOINT = ("ck", ".ck.edgetune-history")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """The world each case starts from (copied per case)."""
    root = tmp_path_factory.mktemp("world")
    x0, y0 = toy_task(n=90, d=7, classes=3, seed=1)
    x1, y1 = toy_task(n=70, d=7, classes=3, seed=1, shift=0.7)
    np.savez(root / "task.npz", x_pretrain=x0, y_pretrain=y0, x_finetune=x1[:40], y_finetune=y1[:40],
             x_test=x1[40:], y_test=y1[40:])
    model, _ = et.pretrain(x0, y0, hidden=[6], epochs=2)
    model.save(root / "model")
    other, _ = et.pretrain(x0, y0, hidden=[6], epochs=2, seed=5)  # same shape, other weights
    other.save(root / "other-model")
    et.FineTuner(model, "skip2-lora", epochs=1).fit(x1, y1).save_adapter(root / "adapter")
    (root / "afile").write_text("a file, not a directory\n")
    cwd = os.getcwd()
    try:
        os.chdir(root)
        assert main(FINETUNE + ["--checkpoint", "ck", "--checkpoint-every", "1"]) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def world(pristine, tmp_path, monkeypatch) -> Path:
    w = tmp_path / "w"
    shutil.copytree(pristine, w, symlinks=True)
    monkeypatch.chdir(w)
    monkeypatch.delenv("EDGETUNE_TEST_HOOK", raising=False)
    return w


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` (not following links) with a digest of its bytes or link target."""
    out: dict[str, str] = {}
    if path.is_symlink():
        return {".": "link:" + os.readlink(path)}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    for p in sorted(path.rglob("*")) if path.is_dir() else []:
        rel = str(p.relative_to(path))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file() and not p.name.endswith(".edgetune-lock"):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if LEFTOVER.search(p.name)]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@dataclass
class Case:
    name: str
    argv: list[str]
    exit: int
    says: str = ""                               # a piece of the message on stderr
    setup: Callable[[Path], None] | None = None
    protect: tuple[str, ...] = INPUTS + CHECKPOINT  # must be unchanged afterwards
    absent: tuple[str, ...] = ()                 # must not exist afterwards

    def __str__(self) -> str:
        return self.name


EXPORT = ["export", "--model", "model", "--method", "skip2-lora", "--target", "host", "--no-toolchain-check",
          "--quiet"]
FINETUNE = ["finetune", "--task", "task.npz", "--model", "model", "--method", "skip2-lora", "--epochs", "2",
            "--quiet"]


def _move_model_into_box(w: Path) -> None:
    (w / "box").mkdir()
    shutil.copytree(w / "model", w / "box" / "model")


def _edit_checkpoint(field: str, value, *, resign: bool = False) -> Callable[[Path], None]:
    """Change one metadata field of the world's checkpoint; ``resign`` also recomputes the
    checksum, as someone who knows the format would: the values must then be checked too."""
    def edit(w: Path) -> None:
        from edgetune.checkpoint import _digest
        from edgetune.safetensors import load_file, save_file

        tensors, meta = load_file(w / "ck")
        meta = {**meta, field: value}
        if resign:
            meta["sha256"] = _digest(tensors, meta)
        save_file(tensors, w / "ck", meta)
    return edit


def _edit_history(w: Path) -> None:
    journal = w / ".ck.edgetune-history"
    journal.write_bytes(journal.read_bytes().replace(b'"epoch": 2', b'"epoch": 7'))


def _model_with_std(value: float) -> Callable[[Path], None]:
    """A copy of the model ('badstd') whose input.std has ``value`` in one entry, checksum updated."""
    def setup(w: Path) -> None:
        from edgetune.safetensors import load_file, save_file

        shutil.copytree(w / "model", w / "badstd")
        tensors, meta = load_file(w / "badstd" / "model.safetensors")
        tensors["input.std"] = tensors["input.std"].copy()
        tensors["input.std"][2] = value
        save_file(tensors, w / "badstd" / "model.safetensors", meta)
        _resign(w / "badstd", "config.json", "model.safetensors", "weights_sha256")
    return setup


def _resign(d: Path, config: str, weights: str, field: str, **changes) -> None:
    cfg = json.loads((d / config).read_text())
    cfg.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del cfg[k]
    cfg[field] = hashlib.sha256((d / weights).read_bytes()).hexdigest()
    (d / config).write_text(json.dumps(cfg))


def _adapter_as_int32(w: Path) -> None:
    from edgetune.safetensors import load_file, save_file

    shutil.copytree(w / "adapter", w / "intadapter")
    tensors, meta = load_file(w / "intadapter" / "adapter_model.safetensors")
    save_file({k: (v * 1000).astype(np.int32) for k, v in tensors.items()}, w / "intadapter" / "adapter_model.safetensors",
              meta)
    _resign(w / "intadapter", "adapter_config.json", "adapter_model.safetensors", "adapter_sha256")


def _adapter_without_sizes(w: Path) -> None:
    shutil.copytree(w / "adapter", w / "nosizes")
    _resign(w / "nosizes", "adapter_config.json", "adapter_model.safetensors", "adapter_sha256",
            base_model_sizes=None)


def _peft_adapter_targeting(targets) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        model = et.Backbone.load(w / "model")
        et.FineTuner(model, "lora-all").save_adapter(w / "peft", format="peft")
        cfg = json.loads((w / "peft" / "adapter_config.json").read_text())
        cfg["target_modules"] = targets
        (w / "peft" / "adapter_config.json").write_text(json.dumps(cfg))
    return setup


EVALUATE = ["evaluate", "--task", "task.npz", "--model", "model", "--quiet"]

RESUME = FINETUNE + ["--checkpoint", "ck", "--checkpoint-every", "1"]

CASES = [
    # 1. no output may equal, contain or lie inside an input; --force does not change that
    Case("export --out the model --force", EXPORT + ["--out", "model", "--force"], 2, "is --model"),
    Case("export --out a folder holding the model --force",
         ["export", "--model", "box/model", "--target", "host", "--no-toolchain-check", "--out", "box", "--force"],
         2, "contains --model", setup=_move_model_into_box, protect=INPUTS + CHECKPOINT + ("box",)),
    Case("export --adapter A --out A --force", EXPORT + ["--adapter", "adapter", "--out", "adapter", "--force"],
         2, "is --adapter"),
    Case("export --out inside the model --force", EXPORT + ["--out", "model/proj", "--force"], 2,
         "lies inside --model", absent=("model/proj",)),
    Case("export --out a symlink to the model --force", EXPORT + ["--out", "link", "--force"], 2, "is --model",
         setup=lambda w: os.symlink("model", w / "link"), protect=INPUTS + CHECKPOINT + ("link",)),
    Case("export --out the task file --force", EXPORT + ["--task", "task.npz", "--out", "task.npz", "--force"], 2,
         "is --task"),
    Case("finetune --save-adapter inside the model", FINETUNE + ["--save-adapter", "model/a"], 2,
         "lies inside --model", absent=("model/a",)),
    Case("finetune --save-adapter the model --force", FINETUNE + ["--save-adapter", "model", "--force"], 2,
         "is --model"),
    Case("finetune --json the checkpoint", FINETUNE + ["--checkpoint", "ck2", "--json", "ck2"], 2,
         "is --checkpoint", absent=("ck2",)),
    Case("finetune --checkpoint the task", FINETUNE + ["--checkpoint", "task.npz"], 2, "is --task"),
    Case("pretrain --out the folder holding the task --force",
         ["pretrain", "--task", "box/task.npz", "--out", "box", "--force", "--epochs", "1", "--quiet"], 2,
         "contains --task", setup=lambda w: (w / "box").mkdir() or shutil.copy(w / "task.npz", w / "box"),
         protect=INPUTS + CHECKPOINT + ("box",)),
    Case("plan --json over the model's config", ["plan", "--model", "model", "--budget", "256KB", "--json",
                                                 "model/config.json", "--quiet"], 2, "lies inside --model"),
    # 5. every output checked before anything is written
    Case("export --json under a file", EXPORT + ["--out", "proj", "--json", "afile/x.json"], 1, "afile",
         absent=("proj",), protect=INPUTS + CHECKPOINT + ("afile",)),
    Case("export --json inside --out", EXPORT + ["--out", "proj", "--json", "proj/x.json"], 2, "lies inside --out",
         absent=("proj",)),
    # 8. the current directory
    Case("export --out . --force", EXPORT + ["--out", ".", "--force"], 2, "current directory"),
    Case("export --out .", EXPORT + ["--out", "."], 2, "current directory"),
    Case("finetune --save-adapter . --force", FINETUNE + ["--save-adapter", ".", "--force"], 2,
         "current directory"),
    # 9. unbounded work is refused against the program's bounds and the machine, before any work
    Case("export --epochs 100000000", EXPORT + ["--out", "proj", "--epochs", "100000000"], 2,
         "at most 1000000 epochs", absent=("proj",)),
    Case("export --max-samples 1000000000", EXPORT + ["--out", "proj", "--max-samples", "1000000000"], 1,
         "does not link", absent=("proj",)),
    Case("export --int8 --max-samples 1000000000", EXPORT + ["--out", "proj", "--int8", "--task", "task.npz",
                                                             "--max-samples", "1000000000"], 1,
         "int8 skip-cache alone would be", absent=("proj",)),
    # 11. model and adapter files are checked field by field
    Case("a model whose input_std is 0", ["evaluate", "--task", "task.npz", "--model", "badstd", "--quiet"], 1,
         "'input.std' must be positive", setup=_model_with_std(0.0)),
    Case("a model whose input_std is negative", FINETUNE[:4] + ["badstd"] + FINETUNE[5:], 1,
         "'input.std' must be positive", setup=_model_with_std(-2.0)),
    Case("an adapter of int32 tensors", EVALUATE + ["--adapter", "intadapter"], 1, "holds int32 values",
         setup=_adapter_as_int32),
    Case("an adapter config without base_model_sizes", EVALUATE + ["--adapter", "nosizes"], 1,
         "'base_model_sizes' is missing", setup=_adapter_without_sizes),
    Case("a PEFT adapter whose target_modules name fewer layers", EVALUATE + ["--adapter", "peft"], 1,
         "target_modules", setup=_peft_adapter_targeting(["layers.0"])),
    Case("a PEFT adapter whose target_modules is a regex of no layer", EVALUATE + ["--adapter", "peft"], 1,
         "target_modules", setup=_peft_adapter_targeting("nothing.*")),
    Case("finetune --save-adapter into a symlink loop", FINETUNE + ["--save-adapter", "loop"], 2, "a loop",
         setup=lambda w: os.symlink("loop", w / "loop")),
    Case("finetune --save-adapter a dangling symlink", FINETUNE + ["--save-adapter", "dangling"], 2, "dangling",
         setup=lambda w: os.symlink("nowhere", w / "dangling"), absent=("nowhere",)),
    Case("finetune --json into a symlink loop", FINETUNE + ["--json", "loop"], 2, "a loop",
         setup=lambda w: os.symlink("loop", w / "loop")),
    # 13. messages that name the real problem
    Case("export --out a dangling symlink", EXPORT + ["--out", "dangling"], 2, "dangling or looping",
         setup=lambda w: os.symlink("nowhere", w / "dangling"), absent=("nowhere",)),
    Case("export --out a looping symlink", EXPORT + ["--out", "loop"], 2, "dangling or looping",
         setup=lambda w: os.symlink("loop", w / "loop")),
    Case("export --out under a file", EXPORT + ["--out", "afile/proj"], 1, "afile is a file, not a directory",
         protect=INPUTS + CHECKPOINT + ("afile",)),
    Case("export --flash -1MB", ["export", "--model", "model", "--target", "cortex-m4", "--no-toolchain-check",
                                 "--out", "proj", "--flash", "-1MB"], 2, "--flash must be a positive size",
         absent=("proj",)),
    # 7. checkpoint metadata is covered by the checksum, and its values checked
    *[Case(f"checkpoint with an edited {f}", RESUME, 1, "checksum differs", setup=_edit_checkpoint(f, v))
      for f, v in [("epoch", "999"), ("epoch", "-3"), ("rng", '{"bit_generator": "PCG64"}'),
                   ("best", '{"loss": "x"}'), ("fingerprint", "[]"), ("history_count", "1")]],
    *[Case(f"checkpoint re-signed with {f} {v}", RESUME, 1, "damaged checkpoint metadata",
           setup=_edit_checkpoint(f, v, resign=True))
      for f, v in [("epoch", "999"), ("epoch", "-3"), ("epoch", "x"), ("rng", '{"bit_generator": "PCG64"}'),
                   ("rng", "[1]"), ("best", '{"loss": "x"}'), ("best", "null"), ("fingerprint", "[]"),
                   ("fingerprint", "{"), ("history_count", "-1")]],
    Case("checkpoint re-signed with history_count 1", RESUME, 1, "does not hold the 1 epochs",
         setup=_edit_checkpoint("history_count", "1", resign=True)),
    Case("checkpoint whose history was edited", RESUME, 1, "history file", setup=_edit_history),
    Case("export --budget one byte over the emulated board", EXPORT[:6] + ["cortex-m4", "--no-toolchain-check",
                                                                         "--out", "proj", "--budget", "4194305"],
         2, "4.0 MB (4194305 bytes): the emulated cortex-m4 board has 4.0 MB (4194304 bytes)", absent=("proj",)),
    Case("export --flash one byte over the emulated board", EXPORT[:6] + ["cortex-m4", "--no-toolchain-check",
                                                                        "--out", "proj", "--flash", "4194305"],
         2, "(4194305 bytes): the emulated board has 4.0 MB (4194304 bytes)", absent=("proj",)),
    Case("export an adapter of another backbone", ["export", "--model", "other-model", "--adapter", "adapter",
                                                   "--target", "host", "--no-toolchain-check", "--out", "proj"],
         1, "--no-strict", absent=("proj",)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_case(case: Case, world: Path, capsys):
    if case.setup:
        case.setup(world)
    before = {p: snapshot(world / p) for p in case.protect}
    code, out, err = run_cli(case.argv, capsys)
    assert "Traceback" not in err + out, err
    assert code == case.exit, f"exit {code}, expected {case.exit}: {err}"
    assert case.says in err, err
    assert err.count("error:") == 1 or case.exit == 0, err  # one clear line
    for p in case.protect:
        assert snapshot(world / p) == before[p], f"{p} changed"
    for p in case.absent:
        assert not os.path.lexists(world / p), f"{p} was written"
    assert leftovers(world) == []


# ------------------------------------------------------------------ cases beyond one command line
def _edgetune(args: list[str], cwd: Path, hook: str | None = None, exchange: bool = True, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDGETUNE_TEST_HOOK", None)
    if hook:
        env["EDGETUNE_TEST_HOOK"] = hook
    if not exchange:
        env["EDGETUNE_TEST_NO_EXCHANGE"] = "1"
    return subprocess.Popen([sys.executable, "-m", "edgetune", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _old_project(w: Path) -> None:
    """An existing project the next exports replace (with --force); its marker tells it apart."""
    (w / "proj").mkdir()
    (w / "proj" / "marker.txt").write_text("the old project\n")


@pytest.mark.parametrize("exchange", [True, False])
def test_export_killed_inside_the_swap_loses_nothing_and_the_next_run_cleans_up(world, capsys, exchange):
    """A kill -9 at each step of export's swap leaves the old project or the new one; the next
    export puts a moved-aside project back and removes the dead process's temporaries."""
    steps = ["set-written", "swapped"] + ([] if exchange else ["moved-aside"])
    for step in steps:
        shutil.rmtree(world / "proj", ignore_errors=True)
        _old_project(world)
        p = _edgetune(EXPORT + ["--out", "proj", "--force", "--seed", "3"], world, hook=f"{step}=kill",
                      exchange=exchange)
        p.communicate(timeout=120)
        assert p.returncode == -9, f"{step}: the export was not killed there"
        # the next command sees the old project or the new one, never nothing
        code, _, err = run_cli(EXPORT + ["--out", "proj"], capsys)
        assert code == 2 and "exists" in err and "Traceback" not in err
        old = (world / "proj" / "marker.txt").exists()
        new = (world / "proj" / "export.json").exists()
        assert old != new, f"{step}: the project is {'a mix' if old else 'missing'}"
        assert old == (step in ("set-written", "moved-aside")), step
        code, _, err = run_cli(EXPORT + ["--out", "proj", "--force"], capsys)
        assert code == 0, err
        assert leftovers(world) == [], f"{step}: {leftovers(world)}"


def test_export_puts_back_a_project_an_earlier_version_moved_aside(world, capsys):
    """Earlier exports moved the old project aside as .NAME.old-PID; a crash there left only it."""
    _old_project(world)
    os.rename(world / "proj", world / ".proj.old-999999")
    code, _, err = run_cli(EXPORT + ["--out", "proj"], capsys)
    assert code == 2 and "exists" in err
    assert (world / "proj" / "marker.txt").read_text() == "the old project\n" and leftovers(world) == []


def test_two_exports_to_one_out_without_force_do_not_both_succeed(world, capsys, monkeypatch):
    """A second export to the same --out runs to its end while the first one is planning:
    the first one then refuses (at the lock, or finding the project) instead of replacing it."""
    import edgetune.export as export_pkg
    import edgetune.export.project as project

    real_plan, second = project.plan_export, {}

    def plan_then_let_another_export_run(opts):
        d = real_plan(opts)
        p = _edgetune(EXPORT + ["--out", "proj", "--seed", "2"], world)
        second["code"], second["err"] = p.wait(timeout=120), p.communicate()[1]
        return d

    monkeypatch.setattr(project, "plan_export", plan_then_let_another_export_run)
    monkeypatch.setattr(export_pkg, "plan_export", plan_then_let_another_export_run)
    code, _, err = run_cli(EXPORT + ["--out", "proj", "--seed", "1"], capsys)
    assert second["code"] == 0, second["err"]
    assert code == 2 and "exists" in err and "Traceback" not in err, err
    assert json.loads((world / "proj" / "export.json").read_text())["seed"] == 2
    assert leftovers(world) == []


HOLD_LOCK = """
import sys, time
from edgetune.io_atomic import target_lock
with target_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_finetune_writes_nothing_unless_it_holds_every_output(world, capsys):
    """Another process writing --save-adapter: finetune stops before training, and its --json
    (which would describe this run, not the adapter on disk) is not written."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, "ad", "60"], cwd=world, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_cli(FINETUNE + ["--save-adapter", "ad", "--json", "j.json", "--force"], capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 1 and "another edgetune process" in err and "Traceback" not in err
    assert not (world / "j.json").exists() and not (world / "ad").exists()


def test_save_adapter_replaces_an_adapter_only_with_overwrite(world):
    """The Python API agrees with the command line's --force."""
    model = et.Backbone.load(world / "model")
    before = snapshot(world / "adapter")
    tuner = et.FineTuner(model, "skip2-lora", seed=7)
    with pytest.raises(UsageError, match="overwrite=True"):
        tuner.save_adapter(world / "adapter")
    with pytest.raises(UsageError, match="overwrite=True"):
        tuner.save_adapter(world / "model")  # a model directory is protected the same way
    assert snapshot(world / "adapter") == before
    tuner.save_adapter(world / "adapter", overwrite=True)
    assert snapshot(world / "adapter") != before and leftovers(world) == []
    tuner.save_adapter(world / "fresh")  # a new directory needs nothing


def test_plan_for_a_target_uses_the_epochs_export_uses(world, capsys):
    """One default: a plan that fits is the export's plan (the linked-in shuffles grow with the epochs)."""
    common = ["--model", "model", "--budget", "256KB", "--target", "cortex-m4", "--task", "task.npz"]
    code, out, err = run_cli(["plan", *common, "--json", "plan.json"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["export", *common[:2], *common[4:], "--budget", "256KB", "--out", "proj",
                            "--no-toolchain-check", "--quiet", "--json", "export.json"], capsys)
    assert code == 0, err
    plan, export = (json.loads((world / f).read_text()) for f in ("plan.json", "export.json"))
    assert plan["flash_estimate"] == export["flash_estimate"]
    assert plan["memory"] == export["memory"] and plan["train"]["epochs"] == export["epochs"] == 100


def test_load_adapter_blames_the_caller_for_the_callers_options(world):
    """A bad training option given to load_adapter is the caller's mistake, not adapter_config.json's."""
    from edgetune.errors import ModelFileError

    model = et.Backbone.load(world / "model")
    with pytest.raises(UsageError, match="epochs must be a whole number >= 1, got -5") as e:
        et.FineTuner.load_adapter(model, world / "adapter", epochs=-5)
    assert not isinstance(e.value, ModelFileError) and "adapter_config.json" not in str(e.value)


@pytest.mark.parametrize("engine", ["numpy", "c"])
def test_a_batch_larger_than_the_data_is_the_whole_data_on_both_engines(engine):
    from edgetune import core

    if engine == "c" and not core.available():
        pytest.skip("the compiled engine is not built")
    x, y = toy_task(n=40, d=7, classes=3, seed=2)
    model = et.Backbone.build([7, 6, 3], seed=0)
    huge = et.FineTuner(model, "skip2-lora", batch_size=10 ** 9, epochs=3, engine=engine).fit(x, y)
    whole = et.FineTuner(model, "skip2-lora", batch_size=40, epochs=3, engine=engine).fit(x, y)
    assert [e.loss for e in huge.history_.epochs] == [e.loss for e in whole.history_.epochs]


def test_a_short_optimizer_state_in_a_checkpoint_is_named(world, capsys):
    """A checkpoint re-signed with a cut Adam state: its shapes are named, not two equal key lists."""
    from edgetune.checkpoint import _digest
    from edgetune.safetensors import load_file, save_file

    args = FINETUNE + ["--optimizer", "adam", "--checkpoint", "adam-ck", "--checkpoint-every", "1"]
    assert run_cli(args, capsys)[0] == 0
    tensors, meta = load_file(world / "adam-ck")
    tensors["optimizer.m"] = tensors["optimizer.m"][:3].copy()
    meta["sha256"] = _digest(tensors, meta)
    save_file(tensors, world / "adam-ck", meta)
    code, _, err = run_cli(args, capsys)
    assert code == 1 and "optimizer state 'm' has shape [3], expected" in err and "Traceback" not in err


# ------------------------------------------------------------------ fleets: refused before any process starts
def _flwr() -> bool:
    try:
        import flwr  # noqa: F401
    except ImportError:
        return False
    return True


def _self_signed(w: Path, name: str) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command (Debian package openssl) to make test certificates")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-keyout", str(w / f"{name}.key"), "-out", str(w / f"{name}.pem")], check=True,
                   capture_output=True)


def _tls_pairs(w: Path) -> None:
    _self_signed(w, "a")
    _self_signed(w, "b")


def _damaged_state(server_json: str | None, npz: bytes | None = None) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        (w / "st" / "server").mkdir(parents=True)
        if server_json is not None:
            (w / "st" / "server" / "server.json").write_text(server_json)
        if npz is not None:
            (w / "st" / "server" / "global.npz").write_bytes(npz)
    return setup


def _nan_task(w: Path) -> None:
    with np.load(w / "task.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["x_finetune"] = arrays["x_finetune"].copy()
    arrays["x_finetune"][3, 2] = np.nan
    np.savez(w / "nan-task.npz", **arrays)


def _held_port() -> int:
    """A port this test process listens on (another process, to the server under test)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    _held_port.sockets.append(s)  # kept open until the tests end
    return s.getsockname()[1]


_held_port.sockets = []
ROUND = '{"identity": {}, "results": {"rounds": [{"round": 1}]}}'
SERVER = ["fleet", "server", "--model", "model", "--rounds", "1", "--min-clients", "1", "--timeout", "30", "--quiet"]
CLIENT = ["fleet", "client", "--model", "model", "--task", "task.npz", "--partition", "0/2", "--server",
          "127.0.0.1:9", "--max-wait", "5", "--quiet"]

FLEET_CASES = [
    Case("fleet client with a garbage --root-certificates", CLIENT + ["--root-certificates", "afile"], 2,
         "not a CA certificate"),
    Case("fleet server with a garbage certificate", SERVER + ["--ssl-certfile", "afile", "--ssl-keyfile", "a.key",
                                                            "--ssl-ca-certfile", "a.pem"], 2,
         "not a PEM file", setup=_tls_pairs),
    Case("fleet server with a key of another certificate", SERVER + ["--ssl-certfile", "a.pem", "--ssl-keyfile",
                                                                   "b.key", "--ssl-ca-certfile", "a.pem"], 2,
         "the private key does not belong to the certificate", setup=_tls_pairs),
    Case("fleet server with a garbage CA", SERVER + ["--ssl-certfile", "a.pem", "--ssl-keyfile", "a.key",
                                                   "--ssl-ca-certfile", "afile"], 2, "not a CA certificate",
         setup=_tls_pairs),
    Case("fleet server on an address that does not resolve", SERVER + ["--insecure", "--address",
                                                                     "no-such-host.invalid:9092"], 2,
         "cannot resolve the host"),
    Case("fleet server --json inside the model", SERVER + ["--insecure", "--json", "model/r.json"], 2,
         "lies inside --model", absent=("model/r.json",)),
    Case("fleet server --state-dir a file", SERVER + ["--insecure", "--state-dir", "afile"], 2,
         "--state-dir afile is a file"),
    Case("fleet server with server.json not JSON", SERVER + ["--insecure", "--state-dir", "st"], 1,
         "not readable JSON", setup=_damaged_state("{not json")),
    Case("fleet server with a rounds list of strings", SERVER + ["--insecure", "--state-dir", "st"], 1,
         "'results.rounds' must be a list", setup=_damaged_state('{"identity": {}, "results": {"rounds": ["x"]}}')),
    Case("fleet server with rounds but no global.npz", SERVER + ["--insecure", "--state-dir", "st"], 1,
         "global.npz, the global adapter after round 1, is missing", setup=_damaged_state(ROUND)),
    Case("fleet server with a damaged global.npz", SERVER + ["--insecure", "--state-dir", "st"], 1,
         "global.npz cannot be read", setup=_damaged_state(ROUND, b"PK\x03\x04 not a zip")),
    Case("fleet client --state-dir a file", CLIENT + ["--insecure", "--state-dir", "afile"], 2,
         "--state-dir afile is a file"),
    Case("fleet client with a NaN task", CLIENT[:5] + ["nan-task.npz"] + CLIENT[6:] + ["--insecure"], 1, "NaN",
         setup=_nan_task),
    Case("fleet client --partition-by by-subject on a task without subjects",
         CLIENT + ["--insecure", "--partition-by", "by-subject"], 2, "by-subject"),
]


@pytest.mark.skipif(not _flwr(), reason="needs the fleet extra (pip install edgetune[fleet-device])")
@pytest.mark.parametrize("case", FLEET_CASES, ids=str)
def test_fleet_case(case: Case, world: Path, capsys):
    t0 = time.monotonic()
    test_hostile_case(case, world, capsys)
    assert time.monotonic() - t0 < 20, "refused only after waiting"


@pytest.mark.skipif(not _flwr(), reason="needs the fleet extra (pip install edgetune[fleet-device])")
def test_fleet_server_names_a_port_held_by_another_process(world, capsys):
    port = _held_port()
    t0 = time.monotonic()
    code, _, err = run_cli(SERVER + ["--insecure", "--address", f"127.0.0.1:{port}", "--state-dir", "st"], capsys)
    assert code == 1 and "in use by another process" in err and "Traceback" not in err, err
    assert time.monotonic() - t0 < 20


def test_a_flower_process_that_dies_is_reported_with_its_own_error(tmp_path):
    """Not "(is the port in use?)": the error line the process wrote to its log in this run."""
    from edgetune.fleet.runner import FleetError, _wait_port

    log = tmp_path / "superlink.log"
    log.write_text("ERROR: an earlier run's error\n")
    since = log.stat().st_size
    with open(log, "a") as f:
        f.write("INFO: starting\nERROR: Invalid address: 'no:such:address'\nINFO: exiting\n")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    proc.wait()
    with pytest.raises(FleetError) as e:
        _wait_port("127.0.0.1", 9, proc, 5, log, since)
    assert "Invalid address: 'no:such:address'" in str(e.value) and "earlier run" not in str(e.value)
    assert "is the port in use" not in str(e.value) and str(log) in str(e.value)


def test_sigterm_during_an_export_leaves_no_temporary(world):
    """SIGTERM (a service stopping, a timeout) runs the command's clean-up: the old project stays
    whole and nothing half-written is left beside it."""
    import signal

    _old_project(world)
    p = _edgetune(EXPORT + ["--out", "proj", "--force"], world, hook="set-written=sleep:30")
    deadline = time.time() + 60
    while not list(world.glob(".proj.edgetune-new-*")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and "terminated" in err and "Traceback" not in err, err
    assert (world / "proj" / "marker.txt").exists() and leftovers(world) == []
