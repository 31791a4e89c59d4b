"""Fleets on Flower itself: the simulation engine, and real SuperLink/SuperNode processes on loopback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from edgetune import Backbone  # noqa: E402
from edgetune.fleet.aggregate import fedavg  # noqa: E402
from edgetune.fleet.device import DeviceTrainer, TrainSpec, global_tensors  # noqa: E402
from edgetune.fleet.partition import make_fleet  # noqa: E402
from edgetune.fleet.runner import free_port  # noqa: E402

from .conftest import DATA_DIR  # noqa: E402

EDGETUNE = [sys.executable, "-m", "edgetune"]


@pytest.fixture(scope="module")
def fan_model(tmp_path_factory, private_cache):
    out = tmp_path_factory.mktemp("fleet") / "model"
    subprocess.run(EDGETUNE + ["pretrain", "--task", "damage1", "--data-dir", str(DATA_DIR), "--out", str(out),
                               "--hidden", "32,32", "--epochs", "20", "--quiet"], check=True, timeout=120,
                   capture_output=True)
    return out


def test_simulation_learns_keeps_the_cache_and_rejects_a_bad_device(fan_model, tmp_path):
    out = tmp_path / "sim.json"
    r = subprocess.run(EDGETUNE + ["fleet", "simulate", "--task", "damage1", "--data-dir", str(DATA_DIR),
                                   "--model", str(fan_model), "--clients", "3", "--rounds", "2",
                                   "--partition", "by-room", "--epochs", "5", "--fault", "2:norm",
                                   "--json", str(out), "--quiet"], capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    rounds = res["rounds"]
    assert [x["round"] for x in rounds] == [1, 2]
    # the global adapter, trained by two devices, lifts the noisy-room test accuracy
    assert rounds[-1]["accuracy"] > res["accuracy_before"] + 0.1
    # the misbehaving device is rejected every round and never among the averaged clients
    for x in rounds:
        assert x["clients"] == sorted(x["clients"], key=x["clients"].index) and "noisy-stretch2" not in x["clients"]
        assert [rej["device"] for rej in x["rejected"]] == ["noisy-stretch2"]
        assert "norm" in x["rejected"][0]["reason"]
    # after its first round no device runs its backbone again
    assert all(v > 0 for v in rounds[0]["client_cache_misses"].values())
    assert all(v == 0 for v in rounds[1]["client_cache_misses"].values())
    # bytes: the adapter's tensors, per device and direction (32-32 backbone, 512 inputs, 2 classes, rank 1)
    adapter = 4 * ((512 + 2) + (32 + 2) + (32 + 2))
    assert res["adapter_bytes"] == adapter
    assert rounds[0]["bytes_down"] == 3 * adapter and rounds[0]["bytes_up"] == 3 * adapter
    assert set(rounds[0]["client_accuracy"]) == {"noisy-stretch0", "noisy-stretch1", "noisy-stretch2"}
    assert res["totals"]["rejected"] == 2


def _start(cmd, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
        except ProcessLookupError:
            pass


def test_deployment_on_loopback_averages_only_the_good_devices(fan_model, tmp_path):
    """A real SuperLink + ServerApp and three SuperNodes; one sends NaN. The server's
    global adapter after two rounds is recomputed here from the two good devices alone."""
    port = free_port()
    out = tmp_path / "server.json"
    server = _start(EDGETUNE + ["fleet", "server", "--model", str(fan_model), "--rounds", "2", "--min-clients", "3",
                                "--address", f"127.0.0.1:{port}", "--insecure", "--epochs", "3",
                                "--round-timeout", "60", "--json", str(out), "--quiet"], tmp_path / "server.log")
    clients = []
    try:
        for i in range(3):
            cmd = EDGETUNE + ["fleet", "client", "--model", str(fan_model), "--task", "damage1", "--data-dir",
                              str(DATA_DIR), "--partition", f"{i}/3", "--partition-by", "by-room",
                              "--server", f"127.0.0.1:{port}", "--insecure", "--state-dir", str(tmp_path / f"dev{i}")]
            if i == 2:
                cmd += ["--fault", "nan"]
            clients.append(_start(cmd, tmp_path / f"client{i}.log"))
        server.wait(timeout=150)
        assert server.returncode == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        for p in clients + [server]:
            _stop(p)
    res = json.loads(out.read_text())
    assert [x["round"] for x in res["rounds"]] == [1, 2]
    for x in res["rounds"]:
        assert sorted(x["clients"]) == ["noisy-stretch0", "noisy-stretch1"]
        assert x["rejected"] == [{"device": "noisy-stretch2", "reason": "tensor 'skip.0.lora_A' contains NaN or inf"}]
    assert all(v == 0 for v in res["rounds"][1]["client_cache_misses"].values())
    # recompute the two rounds from the good devices only: exactly the server's global adapter
    model = Backbone.load(fan_model)
    spec = TrainSpec(method="skip2-lora", epochs=3)
    fleet = make_fleet("damage1", DATA_DIR, "by-room", 3)
    devs = [DeviceTrainer(model, fleet.devices[i], spec) for i in (0, 1)]
    g = global_tensors(model, spec)
    for _ in range(2):
        ups = [d.train(g)[0] for d in devs]
        g = fedavg(ups, [len(d.data.y_train) for d in devs])
    state = Path(str(out) + ".state") / "server" / "global.npz"
    with np.load(state) as z:
        for k, v in g.items():
            np.testing.assert_allclose(z[k], v, rtol=1e-5, atol=1e-7)
    # no process of the fleet is left running
    time.sleep(0.5)
    assert all(p.poll() is not None for p in clients + [server])


# ---------------------------------------------------------------- TLS, a killed device, a restarted server

def _certificates(d: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it, made here."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    d.mkdir(parents=True, exist_ok=True)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    out = {}
    cas = []
    for label in ("ca", "other-ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(f"edgetune test {label}")).issuer_name(
            name(f"edgetune test {label}")).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
        out[label] = d / f"{label}.pem"
        out[label].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        cas.append((key, cert))
    ca_key, ca_cert = cas[0]
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False).sign(ca_key, hashes.SHA256()))
    out["cert"], out["key"] = d / "server.pem", d / "server.key"
    out["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out["key"].write_bytes(pem_key(key))
    return out


def _device_keys(d: Path, names) -> dict[str, Path]:
    """An ECDSA P-384 key pair per device in OpenSSH format (what ssh-keygen -t ecdsa -b 384 writes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for n in names:
        key = ec.generate_private_key(ec.SECP384R1())
        (d / n).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
        (d / f"{n}.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                    serialization.PublicFormat.OpenSSH))
        out[n] = d / n
    return out


def _client_cmd(model, i: int, k: int, port: int, state: Path, *extra: str) -> list[str]:
    return EDGETUNE + ["fleet", "client", "--model", str(model), "--task", "damage1", "--data-dir", str(DATA_DIR),
                       "--partition", f"{i}/{k}", "--partition-by", "by-room", "--server", f"127.0.0.1:{port}",
                       "--state-dir", str(state), *extra]


def _server_cmd(model, port: int, out: Path, rounds: int, min_clients: int, *extra: str) -> list[str]:
    return EDGETUNE + ["fleet", "server", "--model", str(model), "--rounds", str(rounds), "--min-clients",
                       str(min_clients), "--address", f"127.0.0.1:{port}", "--epochs", "2", "--json", str(out),
                       "--quiet", *extra]


def _log(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.is_file() else ""


def test_tls_fleet_admits_only_known_devices(fan_model, tmp_path):
    """Server and devices over TLS with a CA made here, and only devices whose public keys the
    server was given may join. Refused, never training, exiting non-zero: a device with an
    unknown key, one with no key, one trusting another CA, and one connecting without TLS."""
    c = _certificates(tmp_path / "pki")
    keys = _device_keys(tmp_path / "keys", ["dev0", "dev1", "stranger"])
    port = free_port()
    out = tmp_path / "server.json"
    server = _start(_server_cmd(fan_model, port, out, 2, 2, "--ssl-certfile", str(c["cert"]), "--ssl-keyfile",
                                str(c["key"]), "--ssl-ca-certfile", str(c["ca"]), "--round-timeout", "60",
                                "--device-keys", f"{keys['dev0']}.pub", f"{keys['dev1']}.pub"),
                    tmp_path / "server.log")
    procs = [server]
    tls = ("--root-certificates", str(c["ca"]))
    try:
        good = [_start(_client_cmd(fan_model, i, 6, port, tmp_path / f"dev{i}", *tls, "--device-key",
                                   str(keys[f"dev{i}"])), tmp_path / f"client{i}.log") for i in (0, 1)]
        refused = {
            2: _client_cmd(fan_model, 2, 6, port, tmp_path / "dev2", *tls, "--device-key", str(keys["stranger"])),
            3: _client_cmd(fan_model, 3, 6, port, tmp_path / "dev3", *tls),
            4: _client_cmd(fan_model, 4, 6, port, tmp_path / "dev4", "--root-certificates", str(c["other-ca"])),
            5: _client_cmd(fan_model, 5, 6, port, tmp_path / "dev5", "--insecure"),
        }
        bad = {n: _start(cmd + ["--max-wait", "15"], tmp_path / f"client{n}.log") for n, cmd in refused.items()}
        procs += good + list(bad.values())
        server.wait(timeout=150)
        assert server.returncode == 0, _log(tmp_path / "server.log")
        for n, p in bad.items():
            p.wait(timeout=60)
            assert p.returncode != 0, _log(tmp_path / f"client{n}.log")
    finally:
        for p in procs:
            _stop(p)
    res = json.loads(out.read_text())
    assert res["tls"] is True and res["device_keys"] == 2
    assert [x["round"] for x in res["rounds"]] == [1, 2]
    for x in res["rounds"]:
        assert sorted(x["clients"]) == ["noisy-stretch0", "noisy-stretch1"] and x["updated"]
        assert sorted(x["client_accuracy"]) == ["noisy-stretch0", "noisy-stretch1"]
    assert res["totals"]["rounds"] == 2
    # the refused devices never trained
    for n in refused:
        assert not (tmp_path / f"dev{n}" / "device").exists(), n
    # the same server again with dev1's key left out: dev1 is refused now, dev0 still joins
    server = _start(_server_cmd(fan_model, port, out, 1, 1, "--ssl-certfile", str(c["cert"]), "--ssl-keyfile",
                                str(c["key"]), "--ssl-ca-certfile", str(c["ca"]), "--round-timeout", "60",
                                "--device-keys", f"{keys['dev0']}.pub"), tmp_path / "server2.log")
    procs = [server]
    try:
        dev0 = _start(_client_cmd(fan_model, 0, 6, port, tmp_path / "dev0", *tls, "--device-key", str(keys["dev0"])),
                      tmp_path / "client0b.log")
        dev1 = _start(_client_cmd(fan_model, 1, 6, port, tmp_path / "dev1", *tls, "--device-key", str(keys["dev1"]),
                                  "--max-wait", "15"), tmp_path / "client1b.log")
        procs += [dev0, dev1]
        server.wait(timeout=150)
        assert server.returncode == 0, _log(tmp_path / "server2.log")
        dev1.wait(timeout=60)
        assert dev1.returncode != 0, _log(tmp_path / "client1b.log")
    finally:
        for p in procs:
            _stop(p)
    res = json.loads(out.read_text())
    assert res["device_keys"] == 1 and [x["clients"] for x in res["rounds"]] == [["noisy-stretch0"]]


def test_device_keys_are_checked_before_anything_starts(fan_model, tmp_path):
    c = _certificates(tmp_path / "pki")
    keys = _device_keys(tmp_path / "keys", ["dev0"])
    tls = ["--ssl-certfile", str(c["cert"]), "--ssl-keyfile", str(c["key"]), "--ssl-ca-certfile", str(c["ca"])]
    cases = [
        (["--insecure", "--device-keys", f"{keys['dev0']}.pub"], "needs TLS"),
        (tls + ["--device-keys", str(keys["dev0"])], "is a private key"),
        (tls + ["--device-keys", str(c["ca"])], "not an OpenSSH ECDSA public key"),
        (tls + ["--device-keys", str(tmp_path / "missing.pub")], "device key not found"),
    ]
    for extra, msg in cases:
        r = subprocess.run(_server_cmd(fan_model, free_port(), tmp_path / "o.json", 1, 1, *extra),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and msg in r.stderr, (extra, r.stderr[-500:])
    r = subprocess.run(_client_cmd(fan_model, 0, 1, free_port(), tmp_path / "d", "--insecure", "--device-key",
                                   str(keys["dev0"])), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs --root-certificates" in r.stderr
    r = subprocess.run(_client_cmd(fan_model, 0, 1, free_port(), tmp_path / "d", "--root-certificates", str(c["ca"]),
                                   "--device-key", f"{keys['dev0']}.pub"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "is not a private key" in r.stderr
    assert not (tmp_path / "o.json.state").exists() and not (tmp_path / "d").exists()


def _saved_rounds(state: Path) -> list[dict]:
    """The rounds the server has checkpointed so far (its --state-dir)."""
    try:
        return json.loads((state / "server" / "server.json").read_text())["results"]["rounds"]
    except (OSError, ValueError, KeyError):
        return []


def _wait_for(cond, timeout: float, what: str, procs=()) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, f"{what}: a process exited early ({dead[0].args[3:5]}, code {dead[0].returncode})"
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _kill_hard(p: subprocess.Popen) -> None:
    """SIGKILL, as a power cut would: the process gets no chance to clean up."""
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(10)


def test_a_device_killed_mid_run_rejoins_with_its_cache(fan_model, tmp_path):
    """Three devices; one is SIGKILLed as the round after its first starts. That round completes with
    the other two; restarted with the same --state-dir the device rejoins later rounds
    without running its backbone again (cache misses 0)."""
    port = free_port()
    out = tmp_path / "server.json"
    state = tmp_path / "server-state"
    server = _start(_server_cmd(fan_model, port, out, 5, 2, "--insecure", "--min-replies", "2",
                                "--round-timeout", "20", "--state-dir", str(state)), tmp_path / "server.log")
    procs = [server]
    try:
        clients = [_start(_client_cmd(fan_model, i, 3, port, tmp_path / f"dev{i}", "--insecure"),
                          tmp_path / f"client{i}.log") for i in range(3)]
        procs += clients
        _wait_for(lambda: any("noisy-stretch2" in r["clients"] for r in _saved_rounds(state)), 90,
                  "a round with all three devices", procs)
        _kill_hard(clients[2])  # the next round's messages are on their way to it
        # started again at once: it registers as a new node while that round runs without it
        again = _start(_client_cmd(fan_model, 2, 3, port, tmp_path / "dev2", "--insecure"),
                       tmp_path / "client2-again.log")
        procs.append(again)
        server.wait(timeout=150)
        assert server.returncode == 0, _log(tmp_path / "server.log")
    finally:
        for p in procs:
            _stop(p)
    res = json.loads(out.read_text())
    rounds = res["rounds"]
    assert [x["round"] for x in rounds] == [1, 2, 3, 4, 5]
    assert all(x["updated"] for x in rounds)  # every round averaged at least --min-replies updates
    first = min(x["round"] for x in rounds if "noisy-stretch2" in x["clients"])  # round 1, or 2 if it came late
    killed = rounds[first]  # the round that began as it was killed
    assert "noisy-stretch2" not in killed["clients"], [(x["round"], x["clients"], x["failed"]) for x in rounds]
    assert sorted(killed["clients"]) == ["noisy-stretch0", "noisy-stretch1"]
    back = [x for x in rounds[first + 1:] if "noisy-stretch2" in x["clients"]]
    assert back, [(x["round"], x["clients"], x["failed"]) for x in rounds]
    # the device's first round filled its cache; after the restart it reads it from --state-dir
    assert rounds[first - 1]["client_cache_misses"]["noisy-stretch2"] > 0
    assert all(x["client_cache_misses"]["noisy-stretch2"] == 0 for x in back)
    assert all(x["client_cache_hits"]["noisy-stretch2"] > 0 for x in back)
    _no_fleet_left(tmp_path)  # the killed client's SuperNode went with it


def _fleet_processes(root: Path) -> list[str]:
    """Processes still running whose Flower home lies under ``root`` (SuperLink, SuperNodes,
    ServerApp, ClientApps all inherit FLWR_HOME from edgetune)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(e.startswith(b"FLWR_HOME=" + str(root).encode()) for e in env):
            found.append(f"{d.name}: {cmd[:200]}")
    return found


def _no_fleet_left(root: Path, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while _fleet_processes(root) and time.monotonic() < end:
        time.sleep(0.3)
    assert not _fleet_processes(root), _fleet_processes(root)


def test_a_restarted_server_resumes_and_the_devices_reconnect(fan_model, tmp_path):
    """The server is SIGKILLed after a round; started again with the same --state-dir it
    resumes after the checkpointed rounds, the running devices reconnect, and the final
    results hold the rounds trained before the restart unchanged."""
    port = free_port()
    out = tmp_path / "server.json"
    state = tmp_path / "server-state"
    cmd = _server_cmd(fan_model, port, out, 4, 2, "--insecure", "--round-timeout", "30", "--state-dir", str(state))
    server = _start(cmd, tmp_path / "server.log")
    procs = [server]
    try:
        procs += [_start(_client_cmd(fan_model, i, 2, port, tmp_path / f"dev{i}", "--insecure"),
                         tmp_path / f"client{i}.log") for i in range(2)]
        _wait_for(lambda: len(_saved_rounds(state)) >= 1, 90, "the first checkpointed round", procs)
        _kill_hard(server)
        before = _saved_rounds(state)
        with np.load(state / "server" / "global.npz") as z:
            checkpoint = {k: z[k] for k in z.files}
        # the killed server's SuperLink goes with it: the port is free again
        _wait_for(lambda: _port_free(port), 20, "the killed server's port to close")
        again = _start(cmd, tmp_path / "server-again.log")
        procs.append(again)
        again.wait(timeout=150)
        assert again.returncode == 0, _log(tmp_path / "server-again.log")
    finally:
        for p in procs:
            _stop(p)
    res = json.loads(out.read_text())
    assert [x["round"] for x in res["rounds"]] == [1, 2, 3, 4]
    k = len(before)
    assert 1 <= k < 4 and res["resumed_after_round"] == k
    assert res["rounds"][:k] == before  # what the devices trained before the restart is kept
    for x in res["rounds"]:
        assert sorted(x["clients"]) == ["noisy-stretch0", "noisy-stretch1"] and x["updated"]
    # the devices kept their caches across the server's restart
    assert all(v == 0 for x in res["rounds"][1:] for v in x["client_cache_misses"].values())
    # the global adapter went on from the checkpoint: it moved from there, and not back to the start
    with np.load(state / "server" / "global.npz") as z:
        final = {n: z[n] for n in z.files}
    assert set(final) == set(checkpoint) and any(not np.array_equal(final[n], checkpoint[n]) for n in final)
    _no_fleet_left(tmp_path)


def _port_free(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True
