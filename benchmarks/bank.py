"""An adapter bank on real domain sequences: forgetting, routing, novelty, mixing, budget.

For each domain sequence (``fan-rooms``: the cooling fan's rooms and fans; ``har-subjects``:
HAR subjects; see edgetune/data/domains.py) a backbone is pre-trained, then the domains
are learned one after another by

    sequential skip2-lora   one adapter, fine-tuned domain after domain (warm start)
    sequential lora-all     lora-all, merged into the backbone after each domain
    bank (oracle)           an AdapterBank told each sample's domain
    bank (routed)           the same bank routing each sample itself (and over 10 samples)

and the accuracy matrix R (R[i][j] = test accuracy on domain j after learning domain i),
mean accuracy, backward transfer (BWT), routing accuracy and the AUROC of the bank's
novelty score for a domain never learned are reported; then every detector, the routing
cost against a cached skip2-lora step, mixing for a new domain with 5/20/100 labels, and
the accuracy cost of fitting a flash budget.

    python -m benchmarks.bank --out docs/bank.md      # both sequences (about a minute)
    python -m benchmarks.bank --sequence fan-rooms    # one, to stdout
"""
from __future__ import annotations

import argparse
import io
import shlex
import sys
import time

import numpy as np

from ._util import REPO, machine_info

WINDOW = 10
MIX_LABELS = (5, 20, 100)


def _acc_matrix(evaluate, domains) -> np.ndarray:
    return np.array([[evaluate(i, d) for d in domains] for i in range(len(domains))])


def bwt(r: np.ndarray) -> float:
    """Backward transfer: mean over earlier domains of (final accuracy - accuracy just after learning)."""
    t = len(r)
    return float(np.mean([r[-1, i] - r[i, i] for i in range(t - 1)])) if t > 1 else 0.0


def _fmt_matrix(r: np.ndarray, names: list[str], lower_only: bool = False) -> list[str]:
    lines = ["| after learning \\ test on | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for i, row in enumerate(r):
        cells = ["-" if (lower_only and j > i) else f"{v:.3f}" for j, v in enumerate(row)]
        lines.append(f"| {names[i]} | " + " | ".join(cells) + " |")
    return lines


def run_sequence(name: str, data_dir: str, seed: int, out) -> dict:
    import edgetune as et
    from edgetune.bank import DETECTORS, auroc
    from edgetune.data.domains import load_sequence

    def emit(text: str = "") -> None:
        print(text, file=out, flush=True)

    seq = load_sequence(name, data_dir)
    d = seq.defaults
    names = [dom.name for dom in seq.domains]
    unseen = seq.unseen[0]
    t0 = time.perf_counter()
    bb, _ = et.pretrain(seq.x_pretrain, seq.y_pretrain, hidden=d["hidden"], labels=seq.labels,
                        epochs=d["pretrain_epochs"], seed=seed)
    opts = dict(epochs=d["epochs"], lr=d["lr"], batch_size=d["batch_size"], seed=seed)
    res: dict = {"sequence": name, "domains": names, "unseen": unseen.name, "description": seq.description}

    # -- sequential baselines: one adapter (or one merged model) carried from domain to domain
    seq_tuner = et.FineTuner(bb, "skip2-lora", **opts)
    r_seq = np.zeros((len(names), len(names)))
    model = bb
    r_lora = np.zeros_like(r_seq)
    for i, dom in enumerate(seq.domains):
        seq_tuner.fit(dom.x_train, dom.y_train)
        r_seq[i] = [seq_tuner.score(t.x_test, t.y_test) for t in seq.domains]
        tuner = et.FineTuner(model, "lora-all", **opts).fit(dom.x_train, dom.y_train)
        model = tuner.merged()
        r_lora[i] = [et.FineTuner(model, "lora-last").score(t.x_test, t.y_test) for t in seq.domains]

    # -- the bank, domain after domain
    bank = et.AdapterBank(bb, "skip2-lora", **opts)
    r_oracle = np.full_like(r_seq, np.nan)
    r_routed = np.zeros_like(r_seq)
    r_window = np.zeros_like(r_seq)
    frozen: dict[str, dict[str, bytes]] = {}
    identical = True
    for i, dom in enumerate(seq.domains):
        bank.learn(dom.name, dom.x_train, dom.y_train)
        for n, blobs in frozen.items():  # earlier adapters must be bit-identical
            identical &= bank.tuner(n).adapter_files() == blobs
        frozen[dom.name] = bank.tuner(dom.name).adapter_files()
        for j, t in enumerate(seq.domains):
            if j <= i:
                r_oracle[i, j] = bank.score(t.x_test, t.y_test, domain=t.name)
            r_routed[i, j] = bank.score(t.x_test, t.y_test)
            r_window[i, j] = bank.score(t.x_test, t.y_test, window=WINDOW)
    routing = {n: float(np.mean(bank.route(t.x_test) == n)) for n, t in zip(names, seq.domains)}
    routing_w = {n: float(np.mean(bank.route(t.x_test, window=WINDOW) == n)) for n, t in zip(names, seq.domains)}
    x_known = np.concatenate([t.x_test for t in seq.domains])
    au = auroc(bank.novelty(x_known), bank.novelty(unseen.x_test))
    flagged_unseen = float(np.mean(bank.is_novel(unseen.x_test)))
    flagged_known = float(np.mean(bank.is_novel(x_known)))
    rows = {
        "sequential skip2-lora": r_seq, "sequential lora-all (merged)": r_lora,
        "bank, oracle domain": r_oracle, "bank, routed per sample": r_routed,
        f"bank, routed over {WINDOW} samples": r_window,
    }
    summary = {k: {"mean_accuracy": float(np.mean(r[-1])), "bwt": bwt(r)} for k, r in rows.items()}
    res.update(summary=summary, routing=routing,
               matrices={k: [[None if np.isnan(v) else float(v) for v in row] for row in r] for k, r in rows.items()},
               routing_window=routing_w, auroc_unseen=au, earlier_adapters_identical=bool(identical),
               novel_flagged_unseen=flagged_unseen, novel_flagged_known=flagged_known)

    emit(f"## {name}\n")
    emit(f"{seq.description}. Train/test sizes per domain: "
         + ", ".join(f"{t.name} {len(t.y_train)}/{len(t.y_test)}" for t in seq.domains)
         + f"; unseen {unseen.name} {len(unseen.y_test)} test samples. skip2-lora, {d['epochs']} epochs, "
           f"lr {d['lr']}, batch {d['batch_size']}, seed {seed}.\n")
    emit("| after the last domain | mean accuracy | backward transfer |")
    emit("|---|---|---|")
    for k, v in summary.items():
        emit(f"| {k} | {v['mean_accuracy']:.4f} | {v['bwt']:+.4f} |")
    emit("")
    emit(f"Routing accuracy per sample (over {WINDOW} samples): "
         + ", ".join(f"{n} {routing[n]:.3f} ({routing_w[n]:.3f})" for n in names)
         + f"; mean {np.mean(list(routing.values())):.3f} ({np.mean(list(routing_w.values())):.3f}). "
         f"Novelty AUROC, unseen {unseen.name} against the known domains' test samples: {au:.3f}; "
         f"flagged novel by the stored thresholds: {flagged_unseen:.3f} of {unseen.name}, "
         f"{flagged_known:.3f} of the known domains. Earlier adapters bit-identical after every "
         f"learn: {'yes' if identical else 'NO'}.\n")
    confusion = np.array([[np.sum(bank.route(t.x_test) == n) for n in names] for t in seq.domains])
    res["routing_confusion"] = confusion.tolist()
    emit("Where each domain's test samples are routed (rows: the true domain):\n")
    emit("| true \\ routed to | " + " | ".join(names) + " |")
    emit("|---|" + "---|" * len(names))
    for n, row in zip(names, confusion):
        emit(f"| {n} | " + " | ".join(str(int(v)) for v in row) + " |")
    emit("")
    # a stream that changes domain every 100 samples: how the window trades lag for noise
    block = 100
    xs, owners = [], []
    for start in range(0, max(len(t.y_test) for t in seq.domains), block):
        for t in seq.domains:
            if start < len(t.y_test):
                xs.append(t.x_test[start:start + block])
                owners += [t.name] * len(xs[-1])
    stream, owners = np.concatenate(xs), np.array(owners, dtype=object)
    stream_acc = {w: float(np.mean(bank.route(stream, window=w) == owners)) for w in (1, 5, 10, 25)}
    res["stream_routing"] = stream_acc
    emit(f"A stream that changes domain every {block} samples ({len(stream)} samples): routing accuracy "
         + ", ".join(f"window {w}: {a:.3f}" for w, a in stream_acc.items()) + ".\n")
    for k in ("sequential skip2-lora", "sequential lora-all (merged)", "bank, oracle domain", "bank, routed per sample"):
        emit(f"R, {k}:\n")
        for line in _fmt_matrix(rows[k], names, lower_only=(k == "bank, oracle domain")):
            emit(line)
        emit("")

    # -- every detector on the final bank's adapters
    emit(f"Detectors (features: the frozen skip-cache rows; component: one mean per class or per domain); "
         f"routed accuracy = mean test accuracy over the domains, oracle {summary['bank, oracle domain']['mean_accuracy']:.4f}:\n")
    emit("| components | features | detector | routing acc. | over 10 | routed accuracy | AUROC unseen | detector bytes |")
    emit("|---|---|---|---|---|---|---|---|")
    det_rows = []
    for comp in ("class", "domain"):
        for feat in ("input", "hidden", "last"):
            for det in DETECTORS:
                if det == "energy" and (feat, comp) != ("input", "class"):
                    continue  # energy reads the adapters' logits, not the features
                b = et.AdapterBank(bb, "skip2-lora", detector=det, features=feat, components=comp, **opts)
                for t in seq.domains:
                    b.add_adapter(t.name, bank.tuner(t.name), t.x_train, t.y_train)
                ra = np.mean([np.mean(b.route(t.x_test) == t.name) for t in seq.domains])
                rw = np.mean([np.mean(b.route(t.x_test, window=WINDOW) == t.name) for t in seq.domains])
                acc = np.mean([b.score(t.x_test, t.y_test) for t in seq.domains])
                a = auroc(b.novelty(x_known), b.novelty(unseen.x_test))
                nb = b.nbytes()
                det_bytes = nb["shared"] + sum(v["statistics"] for v in nb["per_domain"].values())
                label = "-" if det == "energy" else feat
                emit(f"| {comp if det != 'energy' else '-'} | {label} | {det} | {ra:.3f} | {rw:.3f} | {acc:.4f} | "
                     f"{a:.3f} | {det_bytes} |")
                det_rows.append({"components": comp, "features": feat, "detector": det, "routing": float(ra),
                                 "routing_window": float(rw), "accuracy": float(acc), "auroc": float(a),
                                 "bytes": det_bytes})
    res["detectors"] = det_rows
    emit("")

    # -- cost: routing a sample against one cached skip2-lora training step
    rows_all = bank.taps(x_known)
    t_route = _time(lambda: bank._route_rows(rows_all, 1, count=False)) / len(rows_all)
    one = rows_all[:1]
    t_route_one = _time(lambda: bank._route_rows(one, 1, count=False), number=200)
    dom0 = seq.domains[0]
    ft = et.FineTuner(bb, "skip2-lora", **{**opts, "epochs": 30}).fit(dom0.x_train, dom0.y_train)
    later = [e.seconds for e in ft.history_.epochs[1:]]
    steps = int(np.ceil(len(dom0.y_train) / d["batch_size"]))
    t_step = float(np.min(later)) / steps  # minima: the machine is shared, noise only adds time
    f = bank.n_features
    m = sum(len(e.counts) for e in bank.domains_.values())
    sizes = bb.sizes
    # rank 1, non-zero blocks only: u = A h and grad A (B x D each), logits, grad B and grad u (B x n x out each)
    step_macs = d["batch_size"] * (2 * sum(sizes[:-1]) + 3 * bb.n_layers * sizes[-1])
    route_macs = m * f
    res["cost"] = {"route_seconds_per_sample_batched": t_route, "route_seconds_one_sample": t_route_one,
                   "cached_step_seconds": t_step, "ratio_batched": t_route / t_step,
                   "ratio_one_sample": t_route_one / t_step, "route_macs": route_macs, "step_macs": step_macs}
    emit(f"Routing cost (default detector, {m} components x {f} features = {route_macs} multiply-adds a "
         f"sample; a cached rank-1 skip2-lora step of batch {d['batch_size']} is about {step_macs}, ratio "
         f"{route_macs / step_macs:.2f}): measured {t_route * 1e6:.2f} us a sample routed in a batch, "
         f"{t_route_one * 1e6:.1f} us for one sample alone (NumPy call overhead), against "
         f"{t_step * 1e6:.1f} us for one cached training step on the compiled engine: ratios "
         f"{t_route / t_step:.3f} and {t_route_one / t_step:.2f}.\n")

    # -- mixing for a new domain with few labels
    rng = np.random.default_rng(seed)
    emit(f"Mixing for the unseen domain {unseen.name} with k labelled samples (drawn at random from its "
         f"training half; test on its test half; mean of 3 draws):\n")
    emit("| k | bank routed (no labels) | soft mix (no labels) | mixing coefficients trained | fresh skip2-lora adapter |")
    emit("|---|---|---|---|---|")
    mix_rows = []
    base_routed = bank.score(unseen.x_test, unseen.y_test)
    base_soft = bank.score(unseen.x_test, unseen.y_test, mix="soft")
    for k in MIX_LABELS:
        accs_mix, accs_fresh = [], []
        for rep in range(3):
            pick = rng.choice(len(unseen.y_train), size=min(k, len(unseen.y_train)), replace=False)
            xs, ys = unseen.x_train[pick], unseen.y_train[pick]
            b = bank.copy()
            b.learn_mix("new", xs, ys)
            accs_mix.append(b.score(unseen.x_test, unseen.y_test, domain="new"))
            fresh = et.FineTuner(bb, "skip2-lora", **{**opts, "seed": seed + rep}).fit(xs, ys)
            accs_fresh.append(fresh.score(unseen.x_test, unseen.y_test))
        mix_rows.append({"k": k, "routed": base_routed, "soft": base_soft, "mix": float(np.mean(accs_mix)),
                         "fresh": float(np.mean(accs_fresh))})
        emit(f"| {k} | {base_routed:.3f} | {base_soft:.3f} | {np.mean(accs_mix):.3f} | {np.mean(accs_fresh):.3f} |")
    res["mixing"] = mix_rows
    soft_known = np.mean([bank.score(t.x_test, t.y_test, mix="soft") for t in seq.domains])
    emit(f"\nSoft mixing on the known domains: mean accuracy {soft_known:.4f} (routed "
         f"{summary['bank, routed per sample']['mean_accuracy']:.4f}).\n")
    res["soft_known"] = float(soft_known)

    # -- budget: one domain fewer than the bank holds
    nb = bank.nbytes()
    per = nb["per_domain"]
    emit("Bytes (float32 on a device): per domain "
         + ", ".join(f"{n} {v['adapter']} adapter + {v['statistics']} statistics" for n, v in per.items())
         + f"; shared detector {nb['shared']}; total {nb['total']}.\n")
    budget = nb["total"] - min(v["total"] for v in per.values())
    emit(f"A flash budget of {budget} bytes (one domain less):\n")
    emit("| strategy | steps | mean accuracy over the domains (routed) | bytes |")
    emit("|---|---|---|---|")
    before = summary["bank, routed per sample"]["mean_accuracy"]
    emit(f"| none (over budget) | - | {before:.4f} | {nb['total']} |")
    budget_rows = []
    for strategy in ("merge", "drop"):
        b = bank.copy()
        steps_done = b.fit_budget(budget, strategy=strategy)
        acc = float(np.mean([b.score(t.x_test, t.y_test) for t in seq.domains]))
        emit(f"| {strategy} | {'; '.join(steps_done)} | {acc:.4f} | {b.nbytes()['total']} |")
        budget_rows.append({"strategy": strategy, "steps": steps_done, "accuracy": acc, "bytes": b.nbytes()["total"]})
    res["budget"] = {"bytes": nb, "limit": budget, "rows": budget_rows}
    emit("")
    res["seconds"] = time.perf_counter() - t0
    return res


def _time(fn, number: int = 5) -> float:
    """The fastest of 15 timings of ``number`` calls, per call."""
    fn()
    times = []
    for _ in range(15):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t) / number)
    return float(np.min(times))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequence", action="append", choices=["fan-rooms", "har-subjects"],
                    help="domain sequence (repeatable; default both)")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the report (markdown) here, e.g. docs/bank.md")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args(argv)
    from edgetune.threads import set_blas_threads
    set_blas_threads(1)
    buf = io.StringIO()

    class Tee:
        def write(self, s):
            sys.stdout.write(s)
            buf.write(s)

        def flush(self):
            sys.stdout.flush()

    out = Tee()
    shown = [a for a in (["--out", args.out] if args.out else [])] + \
        [x for s in (args.sequence or []) for x in ("--sequence", s)] + \
        (["--seed", str(args.seed)] if args.seed else [])
    cmd = "python -m benchmarks.bank" + "".join(f" {shlex.quote(a)}" for a in shown)
    print(HEADER.format(cmd=cmd), file=out)
    results = [run_sequence(s, args.data_dir, args.seed, out) for s in (args.sequence or ["fan-rooms", "har-subjects"])]
    print("## Against the targets\n", file=out)
    print("| sequence | BWT, oracle (target exactly 0) | BWT, routed (target >= -0.01) | mean accuracy routed - oracle "
          "(target within 1 point) | routing / cached step, batched (target: a small fraction) |", file=out)
    print("|---|---|---|---|---|", file=out)
    for r in results:
        sm = r["summary"]
        o, ro = sm["bank, oracle domain"], sm["bank, routed per sample"]
        gap = ro["mean_accuracy"] - o["mean_accuracy"]
        print(f"| {r['sequence']} | {o['bwt']:+.4f} ({'met' if o['bwt'] == 0 else 'missed'}) | "
              f"{ro['bwt']:+.4f} ({'met' if ro['bwt'] >= -0.01 else 'missed'}) | "
              f"{gap * 100:+.2f} points ({'met' if gap >= -0.01 else 'missed'}) | "
              f"{r['cost']['ratio_batched']:.3f} in NumPy, {r['cost']['ratio_one_sample']:.1f} for a lone sample "
              f"(multiply-adds: {r['cost']['route_macs'] / r['cost']['step_macs']:.2f}) |", file=out)
    print("\nA lone sample routed from Python pays NumPy's call overhead (tens of microseconds); a device "
          "would route in C, which is not written yet (the multiply-add ratio is what it would cost).\n", file=out)
    info = machine_info()
    print("Machine: " + ", ".join(f"{k} {info[k]}" for k in ("cpu", "python", "numpy") if k in info)
          + f"; {sum(r['seconds'] for r in results):.0f} s for the whole run.", file=out)
    if args.out:
        from edgetune.io_atomic import write_bytes_atomic
        write_bytes_atomic(args.out, buf.getvalue().encode())
    if args.json:
        from edgetune.io_atomic import write_json_atomic
        write_json_atomic(args.json, results)
    return 0


HEADER = """# Adapter banks: one adapter per domain, and the device picks it

<!-- generated by `{cmd}`; edit benchmarks/bank.py, not this file -->

A device meets several environments. `edgetune.AdapterBank` keeps one small adapter per
domain on one frozen backbone, never touches an earlier adapter when it learns a new one,
and routes every sample to the adapter of the domain it looks like, with a detector on the
frozen features the skip-cache holds.

```python
import edgetune as et
bank = et.AdapterBank(backbone, "skip2-lora", epochs=100)      # FineTuner options for every domain
bank.learn("room-A", x_a, y_a).learn("room-B", x_b, y_b)
bank.route(x)              # each sample's domain name
bank.predict(x)            # route, then apply that domain's adapter (window=10: route over 10 samples)
bank.predict(x, domain="room-A")   # an oracle that is told the domain
bank.novelty(x), bank.is_novel(x)  # high / True: unlike every known domain, learn a new one
bank.learn_mix("room-C", x_few, y_few)  # a new domain with few labels: only mixing coefficients train
bank.nbytes()              # bytes per domain (adapter + statistics) and shared
bank.fit_budget("160KB", strategy="merge")  # or "drop" the least used domain
bank.save("bank"); bank = et.AdapterBank.load("bank", backbone)
```

The command line does the same on `.npz` files (arrays `x`, `y`) or on the built-in domain
sequences (`fan-rooms`, `har-subjects`, described in each section below). A backbone for
`fan-rooms`, pre-trained on the 12 cm fan in room A:

```
python -c "import edgetune as et; from edgetune.data.domains import fan_rooms; \\
s = fan_rooms('../shared/data'); et.pretrain(s.x_pretrain, s.y_pretrain, labels=s.labels)[0].save('runs/fan-model')"
edgetune bank learn    --model runs/fan-model --bank runs/bank --sequence fan-rooms --domain 12cm-noisy \\
                       --data-dir ../shared/data
edgetune bank list     --bank runs/bank --model runs/fan-model
edgetune bank route    --bank runs/bank --model runs/fan-model --data x.npz --window 10 --json -
edgetune bank evaluate --bank runs/bank --model runs/fan-model --sequence fan-rooms --data-dir ../shared/data
```

**On a device: `edgetune bank export`.** The bank becomes a C project (the targets and
Makefile conventions of `edgetune export`, [docs/export.md](export.md): `host`,
`aarch64-linux`, `cortex-m4`, `cortex-m7`, `riscv32`, `riscv32f`) holding the backbone, every
domain's adapter and the detector's statistics as `const` arrays, with the compiled
engine's own C sources. For each sample the program runs the engine's frozen forward pass
(`et_skip_rows`: the skip-cache row), scores the domains with the same linear map as
Python (w_m = P mu_m and c_m, float32), routes over the bank's window (`--window` to change
it; `./bank --window W` on Linux), computes the novelty with a Cholesky factor U of the
precision (U^T U = P, v_m = U mu_m) and the routed domain's threshold, applies the routed
domain's adapter (skip adapters: `et_skip_apply` on the row, a mixed domain adds its
adapters' weighted deltas; `lora-*`: `et_predict`, the forward pass again with the adapter) and
prints one JSON line per sample (routed domain, novelty flag, prediction, logits and
novelty as IEEE bits). `--run` builds and runs it here and checks every sample against
`AdapterBank.route`, `predict` and `is_novel`: identical, logits within 1e-5 (host; 1e-4
on the other targets) of the sample's largest logit (at least 1). Two domains whose scores
agree within 1e-5 of the sample's largest score are a tie, counted apart: float32 sums in
another order may pick either (NumPy itself can, for the same sample in another batch).
Exported: every bank method on float32 backbones, MLP or convolutional (the engine's forward
pass runs every layer kind; a bank on a CNN reads the skip taps, `Backbone.tap_widths`),
detectors `mahalanobis` (the default), `diag`, `centroid`, `relative`; not `energy`, not int8
backbones. The device stores each adapter's whole parameter vector (a skip adapter's A with
its off-block zeros, the layout the engine reads), so a domain takes more bytes than
`nbytes()` counts.

```
edgetune bank export --model runs/fan-model --bank runs/bank --sequence fan-rooms --data-dir ../shared/data \\
                     --target host --out runs/bank-host --run --json -
edgetune bank export --model runs/fan-model --bank runs/bank --sequence fan-rooms --data-dir ../shared/data \\
                     --target cortex-m7 --out runs/bank-m7 --max-samples 150 --run
make -C runs/bank-m7 size
```

The fan-rooms bank (`bank learn` as above for 12cm-silentA, 12cm-silentB, 12cm-noisy and
14cm-silentA, in that order), on the
test halves of its four domains and of the unseen 8 cm fan: on `host` (3000 samples), the
routed domain equal for 2999 and one tie,
predictions and novelty flags equal for all 3000, logits within 6e-7 of the largest logit;
routing accuracy over the 2400 samples of known domains 0.8337 (Python 0.8342: the tie
went the other way). On `cortex-m7` under QEMU (`--max-samples 150`: 150 samples of each of
the five, 750, so that they fit the 2 MB flash beside the bank): every routed domain,
prediction and novelty flag equal, routing accuracy 0.8267 in both. `make size`: flash
1939644 bytes, RAM 20204. Of the flash, the linked-in samples are 1536000 bytes, the
backbone 235792, the shared novelty factor 74120, and each domain 14680 (its adapter's 2124
parameters 8496 bytes; four class components of 192 routing and 192 novelty numbers, their
offsets and owners, and its threshold, 6184), as `bank export` prints them.

`edgetune bank route` reads the bank and leaves it unchanged; with `--save-counts` it adds
the samples routed to each domain to the bank's usage counts (what `fit_budget(...,
strategy="drop")` removes first: the least used) and saves the bank atomically.

**Files.** A bank is a directory: one sub-folder per learned domain holding
`adapter_model.safetensors` + `adapter_config.json` (PEFT's multi-adapter layout; a
`lora-all`/`lora-last` bank writes PEFT's own file format there, so PEFT loads each
adapter; skip adapters have no PEFT equivalent and use edgetune's), `detector.safetensors`
(the component means and the pooled scatter matrix, float64) and `bank.json` (method and
options, detector, domain names, sample counts, novelty thresholds, mixing coefficients,
the backbone's digest and a SHA-256 of every file). It is written as one set; a damaged
`bank.json`, a missing or altered adapter, or another backbone is refused with a
message that names the file.

**The detector** reads the frozen skip-cache row of each sample. Each domain keeps one
mean per class (the class-conditional Gaussians of Lee et al., NeurIPS 2018) with one
pooled covariance shrunk 10% towards its mean variance; a sample goes to the domain of its
nearest mean in Mahalanobis distance. That is a linear map (M means x F features
multiply-adds), since the quadratic term is the same for every domain. The default
(class means, hidden-layer features, `mahalanobis`) was chosen from the tables below: the
best routed accuracy on both sequences. Routing over a window of recent samples is an
option (`window=`), not the default: on a stream that changes domain every 100 samples it
gains about a point on HAR and loses on the fan (the lag after each change costs more
than the noise it removes). `novelty` is the smallest squared distance to any
mean (`relative`: minus the distance to one Gaussian over every domain); `is_novel`
compares it with the 99th percentile of the routed domain's own training samples.

**Mixing** (skip methods): a skip adapter adds `s * sum_k B_k A_k h_k` to the frozen
logits, so `mix="soft"` adds every adapter's term weighted by the detector's domain
probabilities, and `learn_mix` trains only one coefficient per adapter (full-batch gradient
descent on the cross-entropy, from the soft-routing weights), storing 4 bytes per adapter.
**Budget**: `nbytes()` counts what a device stores (float32): each adapter's non-zero
blocks, each domain's class means, and the shared precision matrix (F x F; `diag` keeps F
numbers). `fit_budget` merges the two domains with the closest means (adapter tensors
averaged, weighted by samples; class means pooled) or drops the least routed-to domain,
until the bank fits.

What the numbers below say:
- With the oracle, backward transfer is exactly 0: no adapter changes after it is learned
  (checked bit for bit in every run). One adapter carried from domain to domain forgets.
- Routed, the bank matches the oracle on the fan although only about 83% of samples reach
  their own domain's adapter: the misrouted ones are quiet-room samples sent to another
  quiet-room adapter (room A, room B, the 14 cm fan in room A), which serves them as well;
  no sample is confused with the noisy room. Routing accuracy alone understates routed
  accuracy.
- On HAR, subjects are hard to tell apart from activity features (routing near 50%), and a
  subject's adapter, trained on about 185 windows, is no better for that subject than a
  neighbour's: routed accuracy is above the oracle's, so its "backward transfer" is
  positive. That is a property of this data, not a merit of routing.
- A never-seen domain is only moderately detectable (AUROC below 0.8), and the stored
  thresholds (99th percentile of a domain's own training samples) also flag many test
  samples of known domains, which drift over time: treat `is_novel` as a hint.
- Mixing coefficients learned from 5-100 labels beat no labels but do not replace a fresh
  adapter when the new domain is unlike every learned one (the 8 cm fan).
- The full-covariance detector's shared matrix dominates the bytes (147 KB at F = 192);
  for routing alone a device needs only the M x F products P mu_m, as many numbers as the
  means; novelty needs P itself.
"""

if __name__ == "__main__":
    sys.exit(main())
