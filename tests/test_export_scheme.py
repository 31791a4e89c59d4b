"""`--scheme S|auto` on `edgetune export` and `edgetune plan --target`: the sparse update's
scheme given or chosen for the *device program's* RAM (every scheme planned with
plan_device_memory for the target: the compiled engine's arena, statics and stack, weights in
flash), recorded in export.json, and trained by the exported program exactly as FineTuner
trains that scheme (host: bit for bit; Cortex-M4 under QEMU: within float rounding), inside
the budget once linked."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

import edgetune as et
from edgetune.cli import main
from edgetune.export.targets import get_target
from edgetune.memory import plan_device_memory
from edgetune.methods import make_method
from edgetune.quant import quantize

from .conftest import DATA_DIR
from .test_export import last_json, make, needs, sections

#: A small 1-D CNN: 6 layers with weights (conv, depthwise + pointwise in a residual block, conv, dense x2).
ARCH = "conv:8:9:4:4,relu,maxpool:2,res(dwconv:3:1:1,relu,conv:8:1),conv:16:5:2:2,relu,avgpool:2,flatten,dense:32,relu"
#: A budget between the smallest and the largest scheme's device plan for that CNN (int8, batch 4, 120
#: samples on a Cortex-M4: 158 KB for everything since the int8 sparse update keeps int8 inputs and masks,
#: 283 KB before), so the choice is a choice.
BUDGET = 128 * 1024
TRAIN = ["--batch-size", "4", "--epochs", "3", "--test-samples", "60", "--auto-epochs", "3"]


@pytest.fixture(scope="module")
def fan():
    if not (DATA_DIR / "cooling-fan").is_dir():
        pytest.fail(f"the shared data sets are expected at {DATA_DIR}")
    return et.load_task("damage1-1d", DATA_DIR), ["--task", "damage1-1d", "--data-dir", str(DATA_DIR)]


@pytest.fixture(scope="module")
def cnn(fan, tmp_path_factory):
    task = fan[0]
    model, _ = et.pretrain(task.x_pretrain, task.y_pretrain, arch=ARCH, labels=task.labels, epochs=4, lr=0.02)
    return model.save(tmp_path_factory.mktemp("cnn") / "model")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """An MLP task small enough for the whole search on every call."""
    d = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    xs = {s: rng.normal(size=(n, 16)).astype(np.float32) for s, n in [("pretrain", 80), ("finetune", 80), ("test", 40)]}
    ys = {s: (x[:, 0] + x[:, 1] > 0).astype(int) for s, x in xs.items()}
    np.savez(d / "t.npz", **{f"x_{s}": x for s, x in xs.items()}, **{f"y_{s}": y for s, y in ys.items()})
    et.Backbone.build([16, 24, 12, 2], seed=0).fit_normalizer(xs["pretrain"]).save(d / "m")
    return d


def run_cli(*argv: str) -> int:
    return main([*argv, "--quiet"])


def replica(backbone, task, man):
    """The exported configuration on the Python package's compiled engine: loss and test accuracy."""
    tr, te = man["train_indices"], man["test_indices"]
    tuner = et.FineTuner(backbone, "sparse", scheme=man["scheme"], epochs=man["epochs"], seed=man["seed"],
                         batch_size=man["batch_size"], lr=man["lr"], engine="c")
    tuner.fit(task.x_finetune[tr], task.y_finetune[tr])
    return tuner.history_.final_loss, tuner.score(task.x_test[te], task.y_test[te])


def device_plan(backbone, scheme, target, man):
    t = get_target(target)
    return plan_device_memory(make_method("sparse", backbone, scheme=scheme), batch_size=man["batch_size"],
                              max_samples=man["max_samples"], optimizer=man["optimizer"],
                              store_samples=t.kind != "mcu", pointer_bytes=t.pointer_bytes, statics=t.statics,
                              stack=t.stack)


# ----------------------------------------------------------------------------- int8 CNN, auto, Cortex-M4
def test_auto_int8_cnn_plan_and_export_for_a_cortex_m4(cnn, fan, tmp_path):
    """The full path: plan --target --scheme auto --int8 chooses within the budget; export with the
    same options writes that scheme; the M4 build runs it as FineTuner does and links within the
    budget; the host build of the same scheme reaches FineTuner's loss bit for bit."""
    needs(("arm-none-eabi-gcc", "gcc-arm-none-eabi"), ("qemu-system-arm", "qemu-system-arm"), ("cc", "gcc"),
          ("make", "make"))
    task, task_option = fan
    opts = ["--model", str(cnn), "--method", "sparse", "--scheme", "auto", "--int8", "--budget", "128KB",
            "--target", "cortex-m4", *task_option, *TRAIN]
    pj = tmp_path / "plan.json"
    assert run_cli("plan", *opts, "--samples", "120", "--json", str(pj)) == 0
    plan = json.loads(pj.read_text())
    scheme = plan["scheme"]
    assert plan["method"] == "sparse" and plan["memory"]["backbone"] == "int8"
    assert plan["ram_bytes"] == sum(plan["breakdown"].values()) == plan["memory"]["total"] <= BUDGET
    assert f"--scheme {scheme}" in plan["command"]
    # the budget is honoured by the chosen scheme's device plan, and it did constrain the choice
    q = quantize(et.Backbone.load(cnn), task.x_pretrain)
    everything = "b6,w0,w1,w2,w3,w4,w5"
    assert device_plan(q, scheme, "cortex-m4", plan["memory"]).total == plan["ram_bytes"]
    assert device_plan(q, everything, "cortex-m4", plan["memory"]).total > BUDGET
    assert scheme != "b1,w5"  # more than the last layer fits 128 KB
    assert plan["scheme_search"]["contributions"]["train_samples"] + \
        plan["scheme_search"]["contributions"]["val_samples"] == 120  # the program's samples

    out = tmp_path / "m4"
    assert run_cli("export", *opts, "--max-samples", "120", "--out", str(out)) == 0
    man = json.loads((out / "export.json").read_text())
    assert man["method"] == "sparse" and man["scheme"] == scheme and man["qas"] is True
    assert man["backbone"] == "int8" and man["memory"]["total"] == plan["ram_bytes"]
    assert man["scheme_search"]["scheme"] == scheme
    make(out)
    res = last_json(make(out, "run", timeout=300))
    loss, acc = replica(q, task, man)
    assert res["epochs"] == 3 and res["samples"] == 120 and not res["diverged"]
    assert res["final_loss"] == pytest.approx(loss, rel=1e-4)  # FMA on the M4: a few float32 roundings differ
    assert res["accuracy_after"] == pytest.approx(acc, abs=1 / 60 + 1e-9)
    assert res["arena_needed_bytes"] == man["memory"]["arena"]
    s = sections(out / "train.elf")
    ram = s[".data"] + s[".bss"] + s[".stack"]
    assert ram <= BUDGET and abs(ram - plan["ram_bytes"]) <= 0.01 * plan["ram_bytes"], (ram, plan["ram_bytes"])

    host = tmp_path / "host"  # the same scheme, built for this machine: FineTuner's loss (to float32 rounding: ET_PORTABLE_MATH)
    assert run_cli("export", "--model", str(cnn), "--method", "sparse", "--scheme", scheme, "--int8",
                   "--target", "host", *task_option, "--max-samples", "120", "--batch-size", "4", "--epochs", "3",
                   "--test-samples", "60", "--out", str(host)) == 0
    hman = json.loads((host / "export.json").read_text())
    assert hman["scheme"] == scheme and "scheme_search" not in hman
    make(host)
    hres = last_json(subprocess.run([str(host / "train"), "--quiet"], capture_output=True, text=True, timeout=120,
                                    check=True).stdout)
    assert hres["final_loss"] == pytest.approx(loss, rel=1e-6) and hres["accuracy_after"] == acc


# ----------------------------------------------------------------------------- float CNN, explicit scheme
def test_explicit_scheme_on_a_float_cnn_host_program_is_exact(cnn, fan, tmp_path):
    needs(("cc", "gcc"), ("make", "make"))
    task, task_option = fan
    pj = tmp_path / "plan.json"
    common = ["--model", str(cnn), "--scheme", "b3,w3:1/2,w-1", "--target", "host", *task_option,
              "--batch-size", "4", "--epochs", "3", "--test-samples", "60"]
    # --method sparse is the default once --scheme is given to plan --target
    assert run_cli("plan", *common, "--budget", "1MB", "--samples", "120", "--json", str(pj)) == 0
    plan = json.loads(pj.read_text())
    assert plan["method"] == "sparse" and plan["scheme"] == "b3,w3:1/2,w5" and "scheme_search" not in plan
    assert plan["memory"]["label"].startswith("sparse[b3,w3:1/2,w5] (float32")
    out = tmp_path / "dev"
    assert run_cli("export", *common, "--method", "sparse", "--max-samples", "120", "--out", str(out)) == 0
    man = json.loads((out / "export.json").read_text())
    assert man["scheme"] == "b3,w3:1/2,w5" and man["qas"] is False
    assert man["memory"]["total"] == plan["ram_bytes"]
    model = et.Backbone.load(cnn)
    assert device_plan(model, "b3,w3:1/2,w-1", "host", man).total == plan["ram_bytes"]
    make(out)
    res = last_json(subprocess.run([str(out / "train"), "--quiet"], capture_output=True, text=True, timeout=120,
                                   check=True).stdout)
    loss, acc = replica(model, task, man)
    assert res["final_loss"] == pytest.approx(loss, rel=1e-6) and res["accuracy_after"] == acc
    # another scheme trains other parameters: the scheme really reaches the program
    other = et.FineTuner(model, "sparse", epochs=3, seed=0, batch_size=4, lr=man["lr"], engine="c")
    other.fit(task.x_finetune[man["train_indices"]], task.y_finetune[man["train_indices"]])
    assert other.history_.final_loss != loss


# ----------------------------------------------------------------------------- MLP
def test_auto_on_an_mlp_host_program(toy, tmp_path):
    needs(("cc", "gcc"), ("make", "make"))
    task_option = ["--task", str(toy / "t.npz")]
    budget = 24 * 1024
    opts = ["--model", str(toy / "m"), "--method", "sparse", "--scheme", "auto", "--target", "host",
            "--budget", "24KB", *task_option, "--batch-size", "8", "--epochs", "4", "--auto-epochs", "2"]
    pj = tmp_path / "plan.json"
    assert run_cli("plan", *opts, "--json", str(pj)) == 0
    plan = json.loads(pj.read_text())
    model = et.Backbone.load(toy / "m")
    assert plan["ram_bytes"] <= budget
    assert device_plan(model, plan["scheme"], "host", plan["memory"]).total == plan["ram_bytes"]
    assert device_plan(model, "b3,w0,w1,w2", "host", plan["memory"]).total > budget  # the budget binds
    out = tmp_path / "dev"
    assert run_cli("export", *opts, "--out", str(out)) == 0
    man = json.loads((out / "export.json").read_text())
    assert man["scheme"] == plan["scheme"] and man["memory"]["total"] == plan["ram_bytes"] <= budget
    make(out)
    res = last_json(subprocess.run([str(out / "train"), "--quiet"], capture_output=True, text=True, timeout=120,
                                   check=True).stdout)
    task = et.load_task(str(toy / "t.npz"))
    loss, acc = replica(model, task, man)
    assert res["final_loss"] == pytest.approx(loss, rel=1e-6) and res["accuracy_after"] == acc


def test_auto_on_an_int8_cnn_without_a_target_points_to_target(cnn, fan, tmp_path, capsys):
    q = quantize(et.Backbone.load(cnn), fan[0].x_pretrain).save(tmp_path / "q")
    assert run_cli("plan", "--model", str(q), "--method", "sparse", "--scheme", "auto", "--budget", "256KB",
                   *fan[1]) == 2
    err = capsys.readouterr().err
    assert "--target" in err and "Traceback" not in err


def test_a_budget_that_holds_no_scheme_stops_before_the_analysis(toy, tmp_path, capsys):
    code = run_cli("plan", "--model", str(toy / "m"), "--method", "sparse", "--scheme", "auto", "--target", "host",
                   "--budget", "4KB", "--task", str(toy / "t.npz"))
    assert code == 1 and "the smallest scheme of the search" in capsys.readouterr().err


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("argv,words", [
    (["export", "--method", "skip2-lora", "--scheme", "b1", "--target", "host"], "--method sparse"),
    (["export", "--method", "lora-all", "--scheme", "auto", "--budget", "64KB", "--target", "host"],
     "--method sparse"),
    (["plan", "--method", "skip2-lora", "--scheme", "b2", "--budget", "64KB", "--target", "host"], "--method sparse"),
    (["plan", "--method", "lora-all", "--scheme", "auto", "--budget", "64KB", "--target", "host"], "--method sparse"),
    (["export", "--method", "sparse", "--scheme", "auto", "--budget", "64KB", "--target", "host", "--no-task"],
     "give --task"),
    (["plan", "--method", "sparse", "--scheme", "auto", "--budget", "64KB", "--target", "cortex-m4", "--no-task"],
     "give --task"),
    (["export", "--method", "sparse", "--scheme", "auto", "--target", "host"], "give --budget"),
    (["plan", "--method", "sparse", "--scheme", "b2", "--budget", "64KB"], "with --target"),
    (["plan", "--method", "sparse", "--scheme", "auto", "--int8", "--budget", "64KB"], "add --target"),
    (["export", "--method", "sparse", "--scheme", "b9,w7", "--target", "host"], "scheme"),
])
def test_refusals_are_usage_errors(argv, words, toy, tmp_path, capsys):
    argv = list(argv)
    task = [] if "--no-task" in argv else ["--task", str(toy / "t.npz")]
    argv = [a for a in argv if a != "--no-task"]
    if argv[0] == "export":
        argv += ["--out", str(tmp_path / "out")]
    assert run_cli(*argv, "--model", str(toy / "m"), *task) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
