"""edgetune fleet: fine-tune one adapter across many devices with Flower."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ._common import check_outputs, info, non_negative_int, positive_float, positive_int, write_json

NAME = "fleet"
HELP = "fine-tune across many devices with Flower (simulate, server, client)"
DESCRIPTION = """Federated fine-tuning of small adapters (skip2-lora, lora-*, ft-last, ft-bias) on
Flower: each device fine-tunes the global adapter on its own data for some epochs per
round, keeping its skip-cache between rounds; the server screens the updates (NaN, wrong
shapes, absurd norms are rejected and logged) and averages them. Needs the fleet extra:
pip install "edgetune[fleet]". See docs/fleet.md.

examples:
  edgetune fleet simulate --task har --data-dir ../shared/data --model runs/har-model \\
      --clients 8 --rounds 5 --method skip2-lora --partition by-subject --json fleet.json
  edgetune fleet server --model runs/har-model --method skip2-lora --rounds 5 --min-clients 2 \\
      --address 0.0.0.0:9092 --insecure --json fleet.json
  edgetune fleet client --model runs/har-model --task har --data-dir ../shared/data \\
      --partition 0/2 --partition-by by-subject --server 192.168.1.10:9092 --insecure"""
ORDER = 60
OUTLIER_FACTOR = 20.0


def _factor(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v == 0 or 1 <= v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be 0 (off) or a number >= 1, got {text}")
    return v


def _train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (sent by the server to every device each round)")
    g.add_argument("--method", default="skip2-lora",
                   help="skip2-lora (default), skip-lora, lora-all, lora-last, ft-last or ft-bias")
    g.add_argument("--rank", type=positive_int, default=1, help="LoRA rank R (default 1)")
    g.add_argument("--epochs", type=positive_int, default=20, help="local epochs per round (default 20)")
    g.add_argument("--batch-size", type=positive_int, default=20, help="mini-batch size (default 20)")
    g.add_argument("--lr", type=positive_float, default=0.01, help="learning rate (default 0.01)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed of the initial adapter and shuffling")
    g.add_argument("--aggregation", choices=["fedavg", "product"], default="fedavg",
                   help="fedavg: average A and B apart, weighted by samples (default); product: average the "
                        "products B A and refactor them to rank R by SVD")
    g.add_argument("--personal", choices=["none", "bias"], default="none",
                   help="bias: each device keeps its own last-layer bias, never sent (default none)")
    g.add_argument("--no-keep-cache", dest="keep_cache", action="store_false",
                   help="start every round from a fresh FineTuner (to measure what the kept skip-cache saves)")
    g.add_argument("--max-update-norm", type=positive_float, default=100.0,
                   help="reject an update farther than this (L2) from the global adapter (default 100)")
    g.add_argument("--outlier-factor", type=_factor, default=OUTLIER_FACTOR, metavar="X",
                   help=f"with 3 or more updates, reject one farther than X times the median distance "
                        f"(default {OUTLIER_FACTOR:g}; 0 turns the rule off)")
    g.add_argument("--min-replies", type=positive_int, default=1,
                   help="fewer acceptable updates in a round than this and the global adapter stays (default 1)")


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH ('-' for stdout)")
    p.add_argument("--quiet", action="store_true", help="print only the result")
    p.add_argument("--verbose", action="store_true", help="show Flower's own log")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="fleet_command", metavar="ACTION", parser_class=type(p))
    sim = sub.add_parser("simulate", help="a whole fleet on Flower's simulation engine, in this process",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="K virtual devices and the server on Flower's simulation engine (Ray).")
    sim.add_argument("--task", required=True, help="har, damage1, damage2 or an .npz task file")
    sim.add_argument("--data-dir", metavar="DIR", help="where the built-in data sets are")
    sim.add_argument("--model", required=True, metavar="DIR", help="the pre-trained model every device holds")
    sim.add_argument("--clients", type=positive_int, required=True, help="number of devices K")
    sim.add_argument("--rounds", type=positive_int, default=5, help="rounds (default 5)")
    sim.add_argument("--partition", choices=["iid", "by-subject", "by-room"], default="iid",
                     help="which samples each device holds: iid, by-subject (har: one person per device), "
                          "by-room (damage1/2: stretches of the noisy-room recordings)")
    sim.add_argument("--fault", action="append", default=[], metavar="I:KIND",
                     help="make device I misbehave (KIND nan, shape or norm), to see the server reject it")
    _train_args(sim)
    _output_args(sim)

    srv = sub.add_parser("server", help="the fleet's server: a Flower SuperLink and the ServerApp",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="""Start a Flower SuperLink on --address (all of Flower's APIs share that one
port) and run the fleet's ServerApp on it; exits 0 after the last round. With --state-dir,
the global adapter is saved after every round and a restarted server resumes there.""")
    srv.add_argument("--model", required=True, metavar="DIR", help="the pre-trained model (the devices hold the same)")
    srv.add_argument("--rounds", type=positive_int, default=5, help="rounds (default 5)")
    srv.add_argument("--min-clients", type=positive_int, default=2,
                     help="devices that must be connected before a round starts (default 2)")
    srv.add_argument("--address", default="0.0.0.0:9092", metavar="HOST:PORT",
                     help="where the SuperLink listens (default 0.0.0.0:9092)")
    srv.add_argument("--task", help="optional: evaluate the global adapter on this task's test split each round "
                                    "(else: the devices' own test data, weighted)")
    srv.add_argument("--data-dir", metavar="DIR", help="where the built-in data sets are (with --task)")
    srv.add_argument("--state-dir", metavar="DIR", help="checkpoints and Flower's files (default: PATH.state "
                                                        "next to --json, else ./edgetune-fleet-server)")
    srv.add_argument("--round-timeout", type=positive_float, default=600.0,
                     help="seconds to wait for a round's replies; late devices are left out (default 600)")
    srv.add_argument("--timeout", type=positive_float, default=24 * 3600.0, help="give up after this many seconds")
    srv.add_argument("--device-keys", nargs="+", metavar="PUB",
                     help="admit only devices holding the private key of one of these public keys (OpenSSH "
                          "ECDSA, e.g. from ssh-keygen -t ecdsa -b 384); needs TLS; anyone who reaches the port and "
                          "trusts the CA can still register a key (docs/fleet.md)")
    _tls_server_args(srv)
    _train_args(srv)
    _output_args(srv)

    cli = sub.add_parser("client", help="one device: a Flower SuperNode running the fleet's ClientApp",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="""Start a Flower SuperNode for one device, connected to the server at --server.
It runs until stopped (Ctrl-C): it reconnects when the server restarts and takes part in
every round the server starts. The device's skip-cache and personal tensors are kept in
--state-dir, so a restarted client does not run its backbone again.""")
    cli.add_argument("--model", required=True, metavar="DIR", help="the pre-trained model (the server's)")
    cli.add_argument("--task", required=True, help="har, damage1, damage2 or an .npz task file")
    cli.add_argument("--data-dir", metavar="DIR", help="where the built-in data sets are")
    cli.add_argument("--partition", required=True, metavar="I/K", help="this device is number I of K (0-based)")
    cli.add_argument("--partition-by", choices=["iid", "by-subject", "by-room"], default="iid",
                     help="how the task's data are split over the K devices (default iid)")
    cli.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address")
    cli.add_argument("--state-dir", metavar="DIR", help="this device's cache and state (default ./edgetune-device-I-of-K)")
    cli.add_argument("--runtime-port", type=positive_int, metavar="PORT",
                     help="local port of the SuperNode's ClientApp API on 127.0.0.1 (default: a free one)")
    cli.add_argument("--root-certificates", metavar="PEM", help="CA certificate to verify the server (TLS)")
    cli.add_argument("--insecure", action="store_true", help="connect without TLS")
    cli.add_argument("--device-key", metavar="KEY",
                     help="this device's private key, when the server admits only known devices (--device-keys); "
                          "needs --root-certificates")
    cli.add_argument("--max-wait", type=positive_float, metavar="SECONDS",
                     help="try to reach the server and be admitted for at most this many seconds, then exit with "
                          "code 1 (a TLS handshake that fails, a key the server does not know); default: keep trying")
    cli.add_argument("--fault", choices=["nan", "shape", "norm"],
                     help="send a bad update every round (to test the server's defences)")
    cli.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _tls_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS (give all three, or --insecure)")
    g.add_argument("--ssl-certfile", metavar="PEM", help="the server's certificate")
    g.add_argument("--ssl-keyfile", metavar="PEM", help="the server's private key")
    g.add_argument("--ssl-ca-certfile", metavar="PEM", help="the CA certificate the devices trust")
    g.add_argument("--insecure", action="store_true", help="no TLS (only on a trusted network)")


def _train_spec(args: argparse.Namespace):
    from ..fleet.device import TrainSpec

    return TrainSpec(method=args.method, rank=args.rank, epochs=args.epochs, batch_size=args.batch_size,
                     lr=args.lr, seed=args.seed, personal=args.personal, keep_cache=args.keep_cache)


def _check_model(path: str) -> None:
    from ..quant import load_any

    load_any(path)  # a missing or damaged model fails here, before any process starts


def _print_results(res: dict[str, Any]) -> None:
    out = sys.stdout
    before = res.get("accuracy_before")
    print(f"{res['method']} ({res['aggregation']}), adapter {res['adapter_bytes']} B per device and direction "
          f"(whole model {res['whole_model_bytes']} B)", file=out)
    if before is not None:
        print(f"  accuracy before  {before:.4f}", file=out)
    for r in res["rounds"]:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        secs = r["client_train_seconds_mean"]
        misses = sum(r["client_cache_misses"].values())
        rej = f", {len(r['rejected'])} rejected" if r["rejected"] else ""
        print(f"  round {r['round']:3d}  accuracy {acc}  clients {len(r['clients'])}{rej}  up {r['bytes_up']} B  "
              f"down {r['bytes_down']} B  train {'-' if secs is None else f'{secs:.3f}'} s/device  "
              f"cache misses {misses}", file=out)


def _emit(args: argparse.Namespace, res: dict[str, Any]) -> None:
    if args.json == "-":
        from ._common import dumps_compact
        print(dumps_compact(res))
        return
    if not args.quiet:
        _print_results(res)
    write_json(args.json, res)


def _faults(items: list[str], clients: int) -> dict[int, str]:
    out = {}
    for item in items:
        i, _, kind = item.partition(":")
        if not i.isdigit() or int(i) >= clients or kind not in ("nan", "shape", "norm"):
            raise UsageError(f"--fault {item}: expected I:KIND with 0 <= I < {clients} and KIND nan, shape or norm")
        out[int(i)] = kind
    return out


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "fleet_command", None):
        raise UsageError("choose an action: edgetune fleet simulate | server | client (see --help)")
    from ..fleet import require_flwr

    require_flwr()
    json_out = getattr(args, "json", None)
    if json_out and json_out != "-":
        check_outputs(json_out, args=args)
    return {"simulate": _simulate, "server": _server, "client": _client}[args.fleet_command](args)


def _simulate(args: argparse.Namespace) -> int:
    from ..fleet.apps import ServerSpec
    from ..fleet.partition import make_fleet
    from ..fleet.runner import simulate

    spec_train = _train_spec(args)
    faults = _faults(args.fault, args.clients)
    _check_model(args.model)
    fleet = make_fleet(args.task, args.data_dir, args.partition, args.clients, seed=args.seed)
    info(args, fleet.describe())
    spec = ServerSpec(model=str(Path(args.model).resolve()), train=spec_train, rounds=args.rounds,
                      min_clients=args.clients, aggregation=args.aggregation, task=args.task,
                      data_dir=args.data_dir, max_update_norm=args.max_update_norm, min_replies=args.min_replies,
                      outlier_factor=args.outlier_factor or None,
                      extra={"engine": "flower-simulation", "partition": args.partition, "clients": args.clients,
                             "devices": [d.name for d in fleet.devices]})
    defaults: dict[str, Any] = {"model": spec.model, "task": args.task, "partition": args.partition,
                                "partition-seed": args.seed}
    if args.data_dir:
        defaults["data-dir"] = str(Path(args.data_dir).resolve())
    if faults:
        defaults["faults"] = faults
    res = simulate(spec, clients=args.clients, defaults=defaults, verbose=args.verbose)
    _emit(args, res)
    return 0


def _server(args: argparse.Namespace) -> int:
    from ..fleet.apps import ServerSpec
    from ..fleet.runner import parse_address, serve

    parse_address(args.address)
    tls = None
    given = [args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile]
    if any(given):
        if not all(given):
            raise UsageError("TLS needs --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile together")
        if args.insecure:
            raise UsageError("--insecure contradicts the TLS files given")
        for f in given:
            if not Path(f).is_file():
                raise UsageError(f"TLS file not found: {f}")
        _check_server_tls(args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile)
        tls = {"cert": str(Path(args.ssl_certfile).resolve()), "key": str(Path(args.ssl_keyfile).resolve()),
               "ca": str(Path(args.ssl_ca_certfile).resolve())}
    elif not args.insecure:
        raise UsageError("give the TLS files (--ssl-certfile, --ssl-keyfile, --ssl-ca-certfile) or --insecure")
    keys = None
    if args.device_keys:
        if tls is None:
            raise UsageError("--device-keys needs TLS (Flower authenticates devices only over TLS)")
        keys = [_public_key(k) for k in args.device_keys]
    _check_model(args.model)
    spec_train = _train_spec(args)
    state = args.state_dir or (f"{args.json}.state" if args.json and args.json != "-" else "edgetune-fleet-server")
    _check_state_dir(state)
    from ..fleet.runner import check_port_free
    from ..fleet.state import load_server_state

    load_server_state(Path(state) / "server")  # a damaged checkpoint is refused now, not after --timeout
    check_port_free(args.address)
    spec = ServerSpec(model=str(Path(args.model).resolve()), train=spec_train, rounds=args.rounds,
                      min_clients=args.min_clients, aggregation=args.aggregation, task=args.task,
                      data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None,
                      json_path=str(Path(args.json).resolve()) if args.json and args.json != "-" else None,
                      round_timeout=args.round_timeout, max_update_norm=args.max_update_norm,
                      outlier_factor=args.outlier_factor or None,
                      min_replies=args.min_replies, extra={"engine": "flower-deployment", "address": args.address,
                                                           "tls": tls is not None,
                                                           "device_keys": len(keys) if keys else None})
    res = serve(spec, address=args.address, state_dir=Path(state), tls=tls, timeout=args.timeout,
                device_keys=keys, log=lambda s: info(args, s))
    if args.json == "-":
        _emit(args, res)
    elif not args.quiet:
        _print_results(res)
    return 0


def _check_state_dir(path: str) -> None:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"--state-dir {path} is a file; give a directory (it holds the fleet's state)")


def _ssl_reason(e: Exception) -> str:
    text = str(e)
    if "KEY_VALUES_MISMATCH" in text:
        return "the private key does not belong to the certificate"
    if "PEM" in text or "NO_START_LINE" in text or "NO_CERTIFICATE" in text:
        return "not a PEM file of the expected kind"
    return text


def _check_ca(path: str, option: str) -> None:
    """A CA certificate file, loaded as TLS will load it (a garbage file fails here, with its name)."""
    import ssl

    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError, ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{option} {path}: not a CA certificate ({_ssl_reason(e)})") from None


def _check_server_tls(cert: str, key: str, ca: str) -> None:
    """The server's certificate and key, loaded together as TLS will load them: garbage, a key
    of another certificate or an encrypted key are named here, not as a port in use later."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError, ValueError) as e:
        raise UsageError(f"--ssl-certfile {cert} / --ssl-keyfile {key}: {_ssl_reason(e)} (an encrypted key is "
                         f"not supported)") from None
    _check_ca(ca, "--ssl-ca-certfile")


def _public_key(path: str) -> str:
    """A device's public key file, checked to be one line of OpenSSH ECDSA before Flower sees it."""
    f = Path(path)
    if not f.is_file():
        raise UsageError(f"device key not found: {path}")
    if f.stat().st_size > 4096:
        raise UsageError(f"{path} is not a public key (over 4 KB)")
    try:
        text = f.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the public key {path}: {e}") from None
    if "PRIVATE KEY" in text:
        raise UsageError(f"{path} is a private key: give the device's public key (.pub); the private key stays "
                         f"on the device")
    if not text.startswith("ecdsa-sha2-nistp") or "\n" in text:
        raise UsageError(f"{path} is not an OpenSSH ECDSA public key (make one with: ssh-keygen -t ecdsa -b 384 "
                         f"-N '' -f device0)")
    return str(f.resolve())


def _client(args: argparse.Namespace) -> int:
    from ..fleet.partition import parse_partition_arg
    from ..fleet.runner import join, parse_address

    i, k = parse_partition_arg(args.partition)
    parse_address(args.server)
    if args.root_certificates and args.insecure:
        raise UsageError("--insecure contradicts --root-certificates")
    if not args.root_certificates and not args.insecure:
        raise UsageError("give --root-certificates (TLS) or --insecure")
    if args.root_certificates and not Path(args.root_certificates).is_file():
        raise UsageError(f"TLS file not found: {args.root_certificates}")
    if args.root_certificates:
        _check_ca(args.root_certificates, "--root-certificates")
    if args.device_key:
        if not args.root_certificates:
            raise UsageError("--device-key needs --root-certificates (Flower authenticates devices only over TLS)")
        key = Path(args.device_key)
        if not key.is_file():
            raise UsageError(f"device key not found: {args.device_key}")
        if key.stat().st_size > 16384 or b"PRIVATE KEY" not in key.read_bytes():
            raise UsageError(f"{args.device_key} is not a private key (the server holds the .pub; the device "
                             f"gives the private key, e.g. device0 from ssh-keygen -t ecdsa -b 384 -N '' -f device0)")
    _check_model(args.model)
    from ..data.task import BUILTIN_TASKS

    if args.task not in BUILTIN_TASKS and not Path(args.task).is_file():
        raise UsageError(f"unknown task '{args.task}': use one of {', '.join(sorted(BUILTIN_TASKS))} or an .npz file")
    state_arg = args.state_dir or f"edgetune-device-{i}-of-{k}"
    _check_state_dir(state_arg)
    from ..fleet.partition import make_fleet

    # the device's data as the ClientApp will split them: a bad --partition-by or task fails now
    make_fleet(args.task, args.data_dir, args.partition_by, k)
    state = Path(state_arg).resolve()
    node_config: dict[str, Any] = {"model": str(Path(args.model).resolve()),
                                   "task": args.task if args.task in BUILTIN_TASKS else str(Path(args.task).resolve()),
                                   "partition-id": i, "num-partitions": k, "partition": args.partition_by,
                                   "state-dir": str(state / "device")}
    if args.data_dir:
        node_config["data-dir"] = str(Path(args.data_dir).resolve())
    if args.fault:
        node_config["fault"] = args.fault
    return join(server=args.server, node_config=node_config, state_dir=state,
                root_certificates=str(Path(args.root_certificates).resolve()) if args.root_certificates else None,
                runtime_port=args.runtime_port, max_wait=args.max_wait,
                device_key=str(Path(args.device_key).resolve()) if args.device_key else None,
                log=lambda s: info(args, s))
