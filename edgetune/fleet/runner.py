"""Starting fleets: on Flower's simulation engine, or as real Flower processes.

``simulate``: the ServerApp and K virtual SuperNodes on Flower's simulation engine (Ray),
one Ray actor, so every virtual device of a run lives in one process with its FineTuner.

``serve`` / ``join``: Flower's deployment engine. ``serve`` starts a SuperLink (one port:
its Fleet, Control and ServerApp APIs share it in Flower 1.41), writes a small Flower App
whose components are edgetune's ``server_app`` and ``client_app``, submits it as a run
with ``flwr run``, waits for the ServerApp's results and stops the SuperLink. ``join``
starts a SuperNode for one device; the SuperNode starts a ClientApp process per message.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import EdgetuneError, UsageError
from . import require_flwr


class FleetError(EdgetuneError):
    """A fleet process failed or timed out."""


def _not_the_simulation_deprecation(record) -> bool:
    """Flower 1.41 warns that ``run_simulation`` is deprecated on every simulation; the user
    of ``edgetune fleet simulate`` cannot act on it (docs/fleet.md says so)."""
    return "run_simulation" not in record.getMessage()


def _quiet_flower(verbose: bool) -> None:
    import logging

    if not verbose:
        flwr_log = logging.getLogger("flwr")
        flwr_log.setLevel(logging.WARNING)
        if _not_the_simulation_deprecation not in flwr_log.filters:
            flwr_log.addFilter(_not_the_simulation_deprecation)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def simulate(spec, *, clients: int, defaults: dict[str, Any], verbose: bool = False) -> dict[str, Any]:
    """Run ``spec`` (a ``ServerSpec``) with ``clients`` virtual devices; returns the results."""
    require_flwr()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs asked for: nothing to override
    from dataclasses import replace

    from flwr.simulation import run_simulation

    from .apps import build_client_app, build_server_app

    _quiet_flower(verbose)
    with tempfile.TemporaryDirectory(prefix="edgetune-fleet-") as tmp:
        out = Path(tmp) / "results.json"
        spec = replace(spec, json_path=str(out))
        client_defaults = {"state-dir": str(Path(tmp) / "devices"), **defaults}
        cpus = max(1, os.cpu_count() or 1)
        backend = {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
                   "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                                 "logging_level": "error" if not verbose else "info", "log_to_driver": verbose}}
        run_simulation(server_app=build_server_app(spec), client_app=build_client_app(client_defaults),
                       num_supernodes=clients, backend_config=backend, verbose_logging=verbose)
        if not out.is_file():
            raise FleetError("the simulation ended without results (see the log above)")
        return json.loads(out.read_text())


# ---------------------------------------------------------------- deployment

def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"expected HOST:PORT, e.g. 127.0.0.1:9092, got {text!r}")
    return host.strip("[]"), int(port)


def check_port_free(address: str) -> None:
    """Refuse now, naming it, a port another process holds (the SuperLink would fail later)."""
    import errno

    host, port = parse_address(address)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"{address}: cannot resolve the host ({e.strerror or e})") from None
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # like the SuperLink: connections of a stopped server waiting out TIME_WAIT do not count,
        # a process listening there does
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise FleetError(f"{address}: the port is in use by another process; stop it or choose another "
                                 f"--address") from None
            raise FleetError(f"{address}: cannot listen there ({e.strerror or e})") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if not found:
        raise FleetError(f"cannot find Flower's '{name}' command; is Flower installed? ({_install_hint()})")
    return found


def _install_hint() -> str:
    from . import INSTALL_HINT
    return INSTALL_HINT


def _log_size(log: Path) -> int:
    try:
        return log.stat().st_size
    except OSError:
        return 0


def _log_reason(log: Path | None, since: int = 0) -> str:
    """The last error a Flower process wrote to ``log`` after byte ``since`` (its last lines if
    none says error)."""
    if log is None:
        return ""
    try:
        with open(log, "rb") as f:
            f.seek(max(since, f.seek(0, os.SEEK_END) - 8192))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if "error" in ln.lower()]
    picked = errors[-2:] if errors else lines[-2:]
    return f": {' / '.join(picked)[-600:]}" if picked else ""


def _wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float, log: Path | None = None,
               since: int = 0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise FleetError(f"{Path(proc.args[0]).name} exited with code {proc.returncode} before listening "
                             f"on {host}:{port}{_log_reason(log, since)}" + (f" (log: {log})" if log else ""))
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise FleetError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def _die_with_parent() -> None:
    """In a child before exec: on Linux, receive SIGTERM when the parent dies, even by SIGKILL,
    so that a killed ``fleet server`` or ``fleet client`` leaves no SuperLink or SuperNode behind."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _child_kwargs() -> dict[str, Any]:
    kw: dict[str, Any] = {"start_new_session": True}
    if sys.platform.startswith("linux"):
        kw["preexec_fn"] = _die_with_parent
    return kw


def _on_signals(handler) -> dict:
    """Install ``handler`` for SIGTERM and SIGINT (main thread only); returns the old handlers."""
    old = {}
    for s in (signal.SIGTERM, signal.SIGINT):
        try:
            old[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread
            break
    return old


def stop_process(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    """Stop a process started in its own session, and everything it started: the whole
    process group, also when its leader has already exited (a SuperNode that gave up leaves
    its SuperExec behind otherwise). Once the group is gone the process is marked, and later
    calls do nothing (its id may belong to another process group by then)."""
    if proc is None or getattr(proc, "_group_gone", False):
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        end = time.monotonic() + grace
        while time.monotonic() < end:
            proc.poll()
            os.killpg(proc.pid, 0)  # raises once every process of the group has exited
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(grace)
    except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
        pass
    proc.poll()
    try:
        os.killpg(proc.pid, 0)
    except (ProcessLookupError, PermissionError):
        proc._group_gone = True  # type: ignore[attr-defined]


APP_MODULE = '''"""The Flower App that edgetune submits: its components are edgetune's fleet apps."""
from edgetune.fleet import apps as _apps

server_app = _apps.server_app  # assigned here: Flower checks the names statically
client_app = _apps.client_app
'''


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a TOML basic string: JSON's escapes are valid TOML


def write_flower_app(app_dir: Path, spec_json: str) -> Path:
    """A minimal Flower App (pyproject.toml + one module) whose run config holds ``spec``."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "edgetune_fleet_app.py").write_text(APP_MODULE)
    (app_dir / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgetune-fleet"
version = "1.0.0"
description = "edgetune fleet: small adapters fine-tuned on many devices"
license = "MIT"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "edgetune"

[tool.flwr.app.components]
serverapp = "edgetune_fleet_app:server_app"
clientapp = "edgetune_fleet_app:client_app"

[tool.flwr.app.config]
spec = {_toml_str(spec_json)}
""")
    return app_dir


def _write_connection(flwr_home: Path, address: str, root_certificates: str | None) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    tls = f"root-certificates = {_toml_str(str(Path(root_certificates).resolve()))}" if root_certificates \
        else "insecure = true"
    (flwr_home / "config.toml").write_text(f"""[superlink]
default = "edgetune"

[superlink.edgetune]
address = {_toml_str(address)}
{tls}
""")


def _superlink_cmd(host: str, port: int, database: Path, tls: dict[str, str] | None, auth: bool) -> list[str]:
    cmd = [_tool("flower-superlink"), "--host", host, "--port", str(port), "--database", str(database),
           "--disable-runtime-dependency-installation"]
    if tls:
        cmd += ["--ssl-certfile", tls["cert"], "--ssl-keyfile", tls["key"], "--ssl-ca-certfile", tls["ca"]]
    else:
        cmd += ["--insecure"]
    if auth:
        if not tls:
            raise UsageError("device keys need TLS (Flower authenticates devices only over TLS)")
        cmd += ["--enable-supernode-auth"]
    return cmd


def _flwr_json(args: list[str], env: dict[str, str], cwd: Path) -> tuple[bool, dict[str, Any], str]:
    try:
        sub = subprocess.run([_tool("flwr"), *args, "--format", "json"], env=env, capture_output=True, text=True,
                             timeout=120, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise FleetError(f"'flwr {' '.join(args)}' did not answer within 120 s") from None
    try:
        out = json.loads(sub.stdout)
    except ValueError:
        out = {}
    return sub.returncode == 0 and bool(out.get("success")), out, (sub.stdout + sub.stderr).strip()


def register_devices(keys: list[str], *, state_dir: Path, tls: dict[str, str], host: str = "127.0.0.1",
                     log=print) -> None:
    """Make ``keys`` (the devices' public key files) exactly the devices the SuperLink admits.

    Done on a SuperLink of our own on a free port of ``host`` (the address the server's own
    ``flwr`` commands use, which its certificate must name), over the same database, before
    the fleet's SuperLink listens: a device that connects early never meets a SuperLink that
    has not registered it yet (Flower refuses an unregistered device at once, and its
    SuperNode exits). Keys registered by an earlier run and no longer given are unregistered
    (their node ids are kept in ``device-keys.json`` in the state directory).
    """
    home = state_dir / "flwr-register"
    env = _flower_env(home)
    port = free_port(host)
    _write_connection(home, f"{host}:{port}", tls["ca"])
    book_path = state_dir / "device-keys.json"
    try:
        book: dict[str, int] = json.loads(book_path.read_text()) if book_path.is_file() else {}
    except (OSError, ValueError):
        book = {}
    # a key is its type and its base64 body; the comment after them may change
    wanted = {" ".join(Path(k).read_text().split()[:2]): k for k in keys}
    since = _log_size(state_dir / "superlink.log")
    with open(state_dir / "superlink.log", "ab") as logf:
        link = subprocess.Popen(_superlink_cmd(host, port, state_dir / "superlink.db", tls, True), env=env,
                                stdout=logf, stderr=subprocess.STDOUT, cwd=state_dir, **_child_kwargs())
        try:
            _wait_port(host, port, link, 60, state_dir / "superlink.log", since)
            for text, node in list(book.items()):
                if text not in wanted:
                    ok, _, msg = _flwr_json(["supernode", "unregister", str(node), "edgetune"], env, state_dir)
                    if not ok and "not found" not in msg.lower():
                        raise FleetError(f"unregistering a device no longer given failed: {msg[-1500:]}")
                    del book[text]
            for text, key in wanted.items():
                ok, out, msg = _flwr_json(["supernode", "register", key, "edgetune"], env, state_dir)
                if ok:
                    book[text] = int(out["node-id"])
                elif "already in use" not in msg.lower():
                    raise FleetError(f"registering the device key {key} failed: {msg[-1500:]}")
        finally:
            stop_process(link)
    from ..io_atomic import write_json_atomic
    write_json_atomic(book_path, book)
    log(f"{len(wanted)} device key(s) registered: only those devices may join")


def serve(spec, *, address: str, state_dir: Path, tls: dict[str, str] | None, timeout: float,
          device_keys: list[str] | None = None, log=print) -> dict[str, Any]:
    """Start a SuperLink on ``address``, submit the fleet run, wait for its results.
    With ``device_keys`` (public keys; TLS required) only those devices may join."""
    require_flwr()
    host, port = parse_address(address)
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = state_dir / "flwr-home"
    env = _flower_env(flwr_home)
    results_path = Path(spec.json_path).resolve() if spec.json_path else state_dir / "results.json"
    from dataclasses import replace
    spec = replace(spec, json_path=str(results_path), state_dir=str(state_dir / "server"))
    done_marker = state_dir / "server" / "server.json"
    if done_marker.is_file():
        try:
            if json.loads(done_marker.read_text()).get("finished"):
                done_marker.unlink()  # a finished run is not resumed: this is a new one
        except (OSError, ValueError):
            pass
    if not done_marker.is_file():
        # A new run starts from a fresh SuperLink database. The last run's devices may still be
        # listed online there for a minute after they stopped (Flower waits two heartbeats),
        # and the first round would be sent to them and fail. A resumed run keeps the database:
        # its devices are still connected.
        for f in ("superlink.db", "superlink.db-shm", "superlink.db-wal", "device-keys.json"):
            (state_dir / f).unlink(missing_ok=True)
    if results_path.exists():
        results_path.unlink()
    app_dir = write_flower_app(state_dir / "app", spec.to_json())
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    _write_connection(flwr_home, f"{connect_host}:{port}", tls.get("ca") if tls else None)
    cmd = _superlink_cmd(host, port, state_dir / "superlink.db", tls, bool(device_keys))
    if device_keys:
        register_devices(device_keys, state_dir=state_dir, tls=tls, host=connect_host, log=log)
    since = _log_size(state_dir / "superlink.log")
    logf = open(state_dir / "superlink.log", "ab")
    link = None

    def stop(signum, _frame):
        raise SystemExit(128 + signum)  # the finally below stops the SuperLink
    old = _on_signals(stop)
    try:
        link = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=state_dir,
                                **_child_kwargs())
        _wait_port(connect_host, port, link, 60, state_dir / "superlink.log", since)
        log(f"SuperLink listening on {host}:{port} (log: {state_dir / 'superlink.log'})")
        sub = subprocess.run([_tool("flwr"), "run", str(app_dir), "edgetune", "--format", "json"], env=env,
                             capture_output=True, text=True, timeout=120, cwd=state_dir)
        try:
            ok = bool(json.loads(sub.stdout).get("success"))
        except ValueError:
            ok = False
        if sub.returncode != 0 or not ok:
            raise FleetError(f"flwr run failed ({sub.returncode}): {(sub.stdout + sub.stderr).strip()[-2000:]}")
        log(f"run submitted: {sub.stdout.strip()[-300:]}")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if results_path.is_file():
                return json.loads(results_path.read_text())
            if link.poll() is not None:
                raise FleetError(f"the SuperLink exited with code {link.returncode} before the last round "
                                 f"(log: {state_dir / 'superlink.log'})")
            time.sleep(0.5)
        raise FleetError(f"no results after {timeout:.0f} s (log: {state_dir / 'superlink.log'})")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        stop_process(link)
        logf.close()


REFUSED = "Exit Code: 305"  # what flower-supernode prints when it cannot connect or is not activated


def _relay(proc: subprocess.Popen) -> bool:
    """Copy a SuperNode's output to ours as it comes; True if it said it could not connect or
    was refused (Flower's exit code 305; the process itself exits with 1 either way)."""
    refused = False
    out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, b""):
        refused = refused or REFUSED.encode() in line
        if out is not None:
            try:
                out.write(line)
                out.flush()
            except (OSError, ValueError):  # our output is gone (a closed pipe): keep draining theirs
                out = None
    return refused


def join(*, server: str, node_config: dict[str, Any], state_dir: Path, root_certificates: str | None,
         runtime_port: int | None, max_wait: float | None = None, device_key: str | None = None, log=print) -> int:
    """Run a SuperNode for one device until it is stopped; returns its exit code.

    A SuperNode that the server refuses exits at once (Flower does not retry an activation).
    That happens to a device that comes back within a minute of dying while the SuperLink
    still lists it online (with device keys, its node id is fixed by its key), and to a
    device whose key is not registered. The SuperNode is then started again, with a backoff
    of 2 s doubling to 30 s, until ``max_wait`` seconds have passed since the start (or for
    ever without ``max_wait``, as Flower's own reconnection does).
    """
    require_flwr()
    parse_address(server)
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    env = _flower_env(state_dir / "flwr-home")
    port = runtime_port or free_port()
    cfg = " ".join(f"{k}={_toml_str(v) if isinstance(v, str) else v}" for k, v in node_config.items())
    base = [_tool("flower-supernode"), "--superlink", server, "--host", "127.0.0.1", "--port", str(port),
            "--node-config", cfg]
    base += ["--root-certificates", root_certificates] if root_certificates else ["--insecure"]
    if device_key:
        base += ["--auth-supernode-private-key", device_key]
    deadline = None if max_wait is None else time.monotonic() + max_wait
    current: list[subprocess.Popen] = []

    def forward(signum, _frame):
        for p in current:
            stop_process(p)
        raise SystemExit(128 + signum)
    old = _on_signals(forward)
    delay = 2.0
    log(f"SuperNode for device {node_config.get('partition-id')}/{node_config.get('num-partitions')} "
        f"connecting to {server} (ClientApp API on 127.0.0.1:{port})")
    try:
        while True:
            cmd = list(base)
            if deadline is not None:
                cmd += ["--max-wait-time", f"{max(1.0, deadline - time.monotonic()):.1f}"]
            proc = subprocess.Popen(cmd, env=env, cwd=state_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    **_child_kwargs())
            current[:] = [proc]
            seen: list[bool] = []
            relay = threading.Thread(target=lambda p=proc: seen.append(_relay(p)), daemon=True)
            relay.start()
            rc = proc.wait()
            stop_process(proc)  # what the SuperNode started (its SuperExec) goes with it
            relay.join(10)
            refused = bool(seen and seen[0])
            if rc == 0 or not refused:
                return rc
            if deadline is not None and time.monotonic() + delay >= deadline:
                return rc
            why = " (is this device's public key among the server's --device-keys?)" if device_key else ""
            log(f"the server refused this device or could not be reached{why}; trying again in {delay:.0f} s")
            time.sleep(delay)
            delay = min(2 * delay, 30.0)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p in current:
            stop_process(p)
