"""The compiled engine's own C test program: warnings, sanitizers, and another architecture.

tests/c/test_core.c runs every method kind and optimizer on a small deterministic network
and checks what must hold exactly. Here it is built with -Wall -Wextra -Werror, with
AddressSanitizer and UndefinedBehaviorSanitizer, and for aarch64 (run under qemu-aarch64),
whose losses must match the host's within 1e-5. The Python engine tests also run once
against a sanitizer build of the library.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgetune import core

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "edgetune" / "core"
PROGRAM = ROOT / "tests" / "c" / "test_core.c"
LIB_SOURCES = [CORE / s for s in core.SOURCES if s != "et_clock.c"]
FLAGS = ["-std=c99", "-O2", "-ffp-contract=fast", "-fno-wrapv", f"-I{CORE}"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not found: install the Debian package {package}")
    return path


def _build(tmp_path: Path, cc: str, name: str, extra: list[str]) -> Path:
    out = tmp_path / name
    cmd = [cc, *FLAGS, *extra, str(PROGRAM), *map(str, LIB_SOURCES), "-lm", "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def _run(cmd: list[str]) -> dict[str, list[float]]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "1 passed, 0 failed", lines[-5:]
    assert not any(line.startswith("FAIL") for line in lines)
    losses = {}
    for line in lines[:-1]:
        words = line.split()
        losses[" ".join(w for w in words if not _is_number(w))] = [float(w) for w in words if _is_number(w)]
    return losses


def _is_number(w: str) -> bool:
    try:
        float(w)
        return True
    except ValueError:
        return False


@pytest.fixture(scope="module")
def host_losses(tmp_path_factory) -> dict[str, list[float]]:
    tmp = tmp_path_factory.mktemp("c")
    cc = _need("gcc", "gcc")
    return _run([str(_build(tmp, cc, "test_core", []))])


def test_sources_compile_without_warnings(tmp_path):
    cc = _need("gcc", "gcc")
    for src in [*LIB_SOURCES, CORE / "et_clock.c", PROGRAM]:
        r = subprocess.run([cc, *FLAGS, "-Wall", "-Wextra", "-Werror", "-c", str(src), "-o", str(tmp_path / "o.o")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{src.name}: {r.stderr}"


def test_c_program_on_the_host(host_losses):
    assert len(host_losses) >= 60  # 5 activations x 3 optimizers x the methods
    assert all(len(v) == 4 for v in host_losses.values())


def test_c_program_under_sanitizers(tmp_path, host_losses):
    cc = _need("gcc", "gcc")
    losses = _run([str(_build(tmp_path, cc, "test_core_san", SANITIZE))])
    assert losses.keys() == host_losses.keys()


def test_aarch64_build_gives_the_same_losses(tmp_path, host_losses):
    cc = _need("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")
    qemu = _need("qemu-aarch64", "qemu-user")
    exe = _build(tmp_path, cc, "test_core_aarch64", ["-static"])
    losses = _run([qemu, str(exe)])
    assert losses.keys() == host_losses.keys()
    for name, values in losses.items():
        for a, b in zip(values, host_losses[name]):
            assert abs(a - b) <= 1e-5 * abs(b), (name, values, host_losses[name])


def test_python_engine_tests_under_sanitizers(tmp_path):
    """The binding and every Python-driven path (int8, caches, sparse, CNNs) against an ASan/UBSan library."""
    cc = _need("gcc", "gcc")
    lib = tmp_path / "libedgetune_core_san.so"
    sources = [CORE / s for s in core.SOURCES]
    r = subprocess.run([cc, *FLAGS, *SANITIZE, "-fPIC", "-shared", '-DET_BUILD_FLAGS="sanitized"',
                        *map(str, sources), "-lm", "-o", str(lib)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    runtimes = [subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
                for name in ("libasan.so", "libubsan.so")]
    env = {**os.environ, "EDGETUNE_CORE_LIB": str(lib), "LD_PRELOAD": " ".join(runtimes),
           "ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    check = "import edgetune.core as c; assert 'sanitized' in c.info()['build'], c.info()"
    r = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        str(ROOT / "tests" / "test_core_engine.py"), str(ROOT / "tests" / "test_core_cnn.py"),
                        str(ROOT / "tests" / "test_core_fused.py")],
                       env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout


def test_missing_library_falls_back_to_numpy_with_one_warning(tmp_path):
    bogus = tmp_path / "not_a_library.so"
    bogus.write_bytes(b"this is not a shared library")
    code = """
import warnings, numpy as np, edgetune as et
from edgetune.errors import UsageError
bb = et.Backbone.build([5, 8, 2], seed=0)
x = np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32); y = (x[:, 0] > 0).astype(int)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    for _ in range(3):
        t = et.FineTuner(bb, "skip2-lora", epochs=2).fit(x, y)
        assert t.history_.engine == "numpy"
msgs = [str(m.message) for m in w if issubclass(m.category, RuntimeWarning)]
assert len(msgs) == 1 and "does not load" in msgs[0], msgs
try:
    et.FineTuner(bb, "skip2-lora", epochs=1, engine="c").fit(x, y)
    raise SystemExit("engine='c' should have been refused")
except UsageError as e:
    assert "does not load" in str(e)
# the sizes of C memory come from C only: without it the planner says why, it does not guess
from edgetune.memory import core_workspace_bytes, plan_device_memory
from edgetune.methods import make_method
for call in (lambda: core_workspace_bytes([5, 8, 2], "skip", batch=4, n_params=10),
             lambda: plan_device_memory(make_method("skip2-lora", bb), batch_size=4, max_samples=10)):
    try:
        call()
        raise SystemExit("a C figure without the compiled engine should have been refused")
    except UsageError as e:
        assert "computed by the compiled engine" in str(e) and "does not load" in str(e), str(e)
print("ok")
"""
    env = {**os.environ, "EDGETUNE_CORE_LIB": str(bogus)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
    exe = [sys.executable, "-m", "edgetune"]
    r = subprocess.run([*exe, "info"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "NOT available" in r.stdout and "does not load" in r.stdout
    r = subprocess.run([*exe, "--engine", "c", "methods"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0  # listing methods trains nothing
