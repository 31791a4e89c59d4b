"""edgetune detect: fit, score, adapt, stream (on stdin and on a FIFO), and its errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from edgetune.data.anomaly import AnomalyTask


def _cli(*args, stdin=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "edgetune", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    r = np.random.default_rng(0)
    mix = r.normal(size=(3, 8))
    normal = lambda n, shift=0.0: r.normal(size=(n, 3)) @ mix + 0.1 * r.normal(size=(n, 8)) + shift
    x_test = np.vstack([normal(100, 3.0), normal(100, 3.0) + 4 * r.normal(size=(100, 8))])
    y_test = np.r_[np.zeros(100), np.ones(100)].astype(np.int64)
    x_old = np.vstack([normal(50), normal(50) + 4 * r.normal(size=(50, 8))])
    task = AnomalyTask("toy", normal(400), x_test, y_test, x_adapt=normal(300, 3.0),
                       extra_tests={"old": (x_old, y_test[::2])})
    path = tmp_path_factory.mktemp("task") / "toy.npz"
    task.save_npz(path)
    return path


@pytest.fixture(scope="module")
def fitted(task_file, tmp_path_factory):
    d = tmp_path_factory.mktemp("det")
    r = _cli("detect", "fit", "--task", task_file, "--out", d / "m", "--transform", "none", "--hidden", "24",
             "--json", d / "fit.json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return d


def test_fit_score_adapt(task_file, fitted):
    fit = json.loads((fitted / "fit.json").read_text())
    assert fit["train_samples"] == 400 and fit["threshold"] > 0
    r = _cli("detect", "score", "--model", fitted / "m", "--task", task_file, "--json", "-")
    assert r.returncode == 0, r.stderr
    before = json.loads(r.stdout)
    assert {"auc", "pauc", "threshold", "tpr", "fpr"} <= set(before)
    assert before["fpr"] > 0.9           # the new room looks anomalous before re-learning
    r = _cli("detect", "adapt", "--model", fitted / "m", "--task", task_file, "--out", fitted / "m2", "--quiet")
    assert r.returncode == 0, r.stderr
    after = json.loads(_cli("detect", "score", "--model", fitted / "m2", "--task", task_file, "--json", "-").stdout)
    assert after["environments"] == 2 and after["auc"] > 0.95 and after["fpr"] < 0.2
    assert after["old"]["auc"] > 0.95    # the old room is not forgotten


def _lines(rows):
    return "".join(",".join(f"{v:.6g}" for v in row) + "\n" for row in rows)


def test_stream_on_stdin(fitted, tmp_path):
    rows = np.random.default_rng(1).normal(size=(5, 8))
    text = _lines(rows) + json.dumps({"x": rows[0].tolist()}) + "\n" + "nan" + ",0" * 7 + "\n"
    r = _cli("detect", "stream", "--model", fitted / "m", "--json", tmp_path / "s.json", "--quiet", stdin=text)
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(out) == 7 and [o["line"] for o in out] == list(range(1, 8))
    assert out[6]["refused"] is True and out[6]["learned"] is False
    assert all(isinstance(o["score"], float) for o in out[:6])
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["samples"] == 7 and summary["refused"] == 1


def test_stream_bad_line_exit_1(fitted):
    r = _cli("detect", "stream", "--model", fitted / "m", stdin="1,2,3\n")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "expected 8 values" in json.loads(r.stdout.splitlines()[0])["error"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_stream_on_a_fifo_answers_each_sample_as_it_arrives(fitted, tmp_path):
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    p = subprocess.Popen([sys.executable, "-m", "edgetune", "detect", "stream", "--model", str(fitted / "m"),
                          "--input", str(fifo), "--quiet", "--out", str(tmp_path / "after")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        rows = np.random.default_rng(2).normal(size=(3, 8))
        got = []
        with open(fifo, "w") as w:
            for row in rows:
                w.write(_lines([row]))
                w.flush()
                line = []
                t = threading.Thread(target=lambda: line.append(p.stdout.readline()))
                t.start()
                t.join(60)
                assert line and line[0], "no answer while the FIFO is still open"
                got.append(json.loads(line[0]))
        assert p.wait(60) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
    assert [g["line"] for g in got] == [1, 2, 3]
    assert (tmp_path / "after" / "detector_config.json").is_file()


def _answer(p):
    """The next line the command writes, or None if none comes within a minute."""
    line = []
    t = threading.Thread(target=lambda: line.append(p.stdout.readline()))
    t.start()
    t.join(60)
    return line[0] if line and line[0] else None


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("source", ["fifo", "stdin"])
def test_stream_no_learn_answers_each_line_before_the_next_is_written(fitted, tmp_path, source):
    """--no-learn on a FIFO and on a stdin pipe: one line written, its answer read while the
    input is still open, then the next line (a refused sample and an unreadable line among
    them); the scores are the detector's score_samples of each line, nothing is learned."""
    from edgetune.stream import AnomalyDetector

    cmd = [sys.executable, "-m", "edgetune", "detect", "stream", "--model", str(fitted / "m"), "--no-learn",
           "--quiet", "--json", str(tmp_path / "s.json")]
    rows = np.random.default_rng(5).normal(size=(4, 8))
    lines = [_lines([rows[0]]), "nan" + ",0" * 7 + "\n", "1,2\n", _lines([rows[1]]),
             json.dumps({"x": rows[2].tolist()}) + "\n", _lines([rows[3]])]
    if source == "fifo":
        fifo = tmp_path / "in.fifo"
        os.mkfifo(fifo)
        p = subprocess.Popen(cmd + ["--input", str(fifo)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    else:
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got = []
    try:
        w = open(fifo, "w") if source == "fifo" else p.stdin
        with w:
            for text in lines:
                w.write(text)
                w.flush()
                answer = _answer(p)
                assert answer, f"no answer to line {len(got) + 1} while the input is still open"
                got.append(json.loads(answer))
        assert p.wait(60) == 1, p.stderr.read()     # the unreadable line
    finally:
        if p.poll() is None:
            p.kill()
    assert [g["line"] for g in got] == [1, 2, 3, 4, 5, 6]
    assert got[1]["refused"] is True and "expected 8 values" in got[2]["error"]
    det = AnomalyDetector.load(fitted / "m")
    sent = [np.array(_lines([r]).strip().split(","), float) for r in rows]
    sent[2] = rows[2]                                # the JSON line carries every digit
    want = det.score_samples(np.vstack(sent))
    scored = [got[i] for i in (0, 3, 4, 5)]
    np.testing.assert_allclose([g["score"] for g in scored], want, rtol=0, atol=1e-12)
    assert [g["alarm"] for g in scored] == [bool(s < -1) for s in want]
    assert not any(g.get("learned") or g.get("drift") for g in got)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["samples"] == 5 and summary["learned"] == 0 and summary["bad_lines"] == 1


def test_stream_no_learn_on_a_file_scores_as_score_samples(fitted, tmp_path):
    """On a file the lines are scored per read, together: the same scores as score_samples on
    all of them, NaN lines refused in place, the detector unchanged (--out saves it as loaded)."""
    from edgetune.stream import AnomalyDetector

    rows = np.random.default_rng(6).normal(size=(300, 8)) * 3
    lines = _lines(rows).splitlines(keepends=True)
    lines[7] = "inf" + ",0" * 7 + "\n"
    path = tmp_path / "in.csv"
    path.write_text("".join(lines))
    r = _cli("detect", "stream", "--model", fitted / "m", "--input", path, "--no-learn", "--quiet",
             "--out", tmp_path / "after")
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(got) == 300 and got[7]["refused"] is True and got[7]["score"] is None
    det = AnomalyDetector.load(fitted / "m")
    keep = [i for i in range(300) if i != 7]
    x = np.vstack([np.array(lines[i].strip().split(","), float) for i in keep])
    np.testing.assert_allclose([got[i]["score"] for i in keep], det.score_samples(x), rtol=0, atol=1e-12)
    assert sum(g["alarm"] is True for g in got) == int((det.score_samples(x) < -1).sum()) > 0
    after = AnomalyDetector.load(tmp_path / "after")
    np.testing.assert_array_equal(after.environments_[0].model.beta_, det.environments_[0].model.beta_)


def test_usage_errors_exit_2(task_file, fitted, tmp_path):
    r = _cli("detect", "fit", "--task", "fan-nope-noisy", "--out", tmp_path / "x")
    assert r.returncode == 2 and "unknown anomaly task" in r.stderr and "Traceback" not in r.stderr
    r = _cli("detect", "fit", "--task", task_file, "--out", fitted / "m")
    assert r.returncode == 2 and "--force" in r.stderr
    r = _cli("detect", "stream", "--model", fitted / "m", "--json", "-", stdin="")
    assert r.returncode == 2
    r = _cli("detect")
    assert r.returncode == 2 and "choose an action" in r.stderr


def test_failures_exit_1(tmp_path, task_file):
    r = _cli("detect", "score", "--model", tmp_path / "missing", "--task", task_file)
    assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr
    noadapt = tmp_path / "t.npz"
    AnomalyTask("t", np.ones((20, 3)) + np.arange(60).reshape(20, 3), np.ones((4, 3)), np.array([0, 1, 0, 1])).save_npz(noadapt)
    assert _cli("detect", "fit", "--task", noadapt, "--out", tmp_path / "d", "--transform", "none").returncode == 0
    r = _cli("detect", "adapt", "--model", tmp_path / "d", "--task", noadapt, "--out", tmp_path / "d2")
    assert r.returncode == 1 and "no x_adapt" in r.stderr


def test_help_of_every_action():
    for action in ("fit", "score", "adapt", "stream", "plan", "export", "tasks"):
        r = _cli("detect", action, "--help")
        assert r.returncode == 0 and "--json" in r.stdout and "--quiet" in r.stdout
    assert "fan-damage1-move" in _cli("detect", "tasks").stdout


def test_plan_states_the_exported_state_and_refuses_an_over_budget(fitted, tmp_path):
    """detect plan: C's own state size per target (the export's plan), the board's RAM or a budget."""
    pytest.importorskip("edgetune.stream.native", reason="needs the compiled engine")
    from edgetune import AnomalyDetector
    from edgetune.export.detector import TARGETS, plan_detector

    r = _cli("detect", "plan", "--model", fitted / "m", "--json", "-")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    det = AnomalyDetector.load(fitted / "m")
    assert [t["target"] for t in got["targets"]] == list(TARGETS)
    for t in got["targets"]:
        assert t["ram_bytes"] == plan_detector(det, t["target"])["ram_bytes"] and t["fits"]
    m4 = next(t for t in got["targets"] if t["target"] == "cortex-m4")
    host = next(t for t in got["targets"] if t["target"] == "host")
    assert m4["state_bytes"] < host["state_bytes"]  # the random weights regenerated, not stored
    # a budget that some targets meet (stack and statics count on a microcontroller)
    budget = min(t["ram_bytes"] for t in got["targets"])
    over = {t["target"] for t in got["targets"] if t["ram_bytes"] > budget}
    assert over and len(over) < len(TARGETS)
    r = _cli("detect", "plan", "--model", fitted / "m", "--budget", budget)
    named = r.stderr.split("error:")[1]
    assert r.returncode == 1 and all(f"{t} (" in named for t in over)
    assert not any(f"{t['target']} (" in named for t in got["targets"] if t["target"] not in over)
    r = _cli("detect", "plan", "--model", fitted / "m", "--target", "riscv32", "--budget", m4["ram_bytes"])
    assert r.returncode == 0 and "riscv32" in r.stdout
    r = _cli("detect", "plan", "--model", fitted / "m", "--environment", "5")
    assert r.returncode == 2 and "--environment 5" in r.stderr


def test_fit_bands(task_file, fitted, tmp_path):
    fit = json.loads((fitted / "fit.json").read_text())
    assert fit["bands"] is None                        # auto: 8 features are not averaged
    r = _cli("detect", "fit", "--task", task_file, "--out", tmp_path / "b", "--transform", "none", "--hidden", "16",
             "--bands", "4", "--json", "-", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bands"] == 4
    cfg = json.loads((tmp_path / "b" / "detector_config.json").read_text())
    assert cfg["params"]["bands"] == 4
    for bad in ("0", "9", "many"):
        r = _cli("detect", "fit", "--task", task_file, "--out", tmp_path / "c", "--bands", bad)
        assert r.returncode == 2 and "--bands" in r.stderr and "Traceback" not in r.stderr


def test_stream_in_the_compiled_loop_gives_learn_ones_lines(fitted, task_file, tmp_path):
    """The lines read together go through learn_rows (the compiled loop): the same lines, keys,
    alarms, changes, learned samples, re-learning and new environment as learn_one on each
    line (--engine numpy, the command's previous path), scores within 1e-4; the same summary."""
    pytest.importorskip("edgetune.stream.native", reason="needs the compiled engine")
    task = np.load(task_file)
    # the old room, then the new one (a change, then with --relearn auto a new environment),
    # with a refused sample, an unreadable line, a blank line and a JSON line among them
    rows = np.vstack([task["x_train"][:60], task["x_adapt"][:250]])
    lines = _lines(rows).splitlines(keepends=True)
    lines[20] = "nan" + ",0" * 7 + "\n"
    lines[40] = "1,2,3\n"
    lines[41] = "\n"
    lines[42] = json.dumps({"x": rows[42].tolist()}) + "\n"
    lines[200] = lines[200].replace(",", " ")
    path = tmp_path / "samples.csv"
    path.write_text("".join(lines))
    got = {}
    for engine in ("numpy", "c"):
        res = _cli("detect", "stream", "--model", fitted / "m", "--input", path, "--relearn", "auto", "--engine", engine,
                   "--json", tmp_path / f"{engine}.json", "--quiet", "--out", tmp_path / engine)
        assert res.returncode == 1, res.stderr                      # the unreadable line
        got[engine] = [json.loads(line) for line in res.stdout.splitlines()]
    one, c = got["numpy"], got["c"]
    assert len(one) == len(c) == len(lines) - 1
    assert any(o.get("drift") for o in one) and any("new_environment" in o for o in one)
    assert any(o.get("refused") for o in one) and any("error" in o for o in one)
    for a, b in zip(one, c):
        assert set(a) == set(b)
        assert {k: v for k, v in a.items() if k != "score"} == {k: v for k, v in b.items() if k != "score"}
        if a.get("score") is None:
            assert b.get("score") is None
        else:
            assert abs(a["score"] - b["score"]) <= 1e-4
    s1, s2 = (json.loads((tmp_path / f"{e}.json").read_text()) for e in ("numpy", "c"))
    for k in ("samples", "alarms", "drifts", "learned", "refused", "bad_lines", "environments"):
        assert s1[k] == s2[k], k


@pytest.mark.parametrize("read_bytes", [1, 3, 1 << 20])
def test_stream_reads_lines_across_reads(tmp_path, monkeypatch, read_bytes):
    """Lines cut anywhere between two reads (a \\r\\n too) come out whole, as text mode reads them."""
    from edgetune.cli import cmd_detect

    data = "1,2\r\n3,4\r5,6\n\n7,\u00e98\n9,10"
    path = tmp_path / "in.csv"
    path.write_bytes(data.encode())
    monkeypatch.setattr(cmd_detect, "READ_BYTES", read_bytes)
    with open(path, "rb") as f:
        got = [line for chunk in cmd_detect._read_chunks(f) for line in chunk]
    with open(path, "r", encoding="utf-8", newline=None) as f:
        want = [line.rstrip("\n") for line in f]
    assert got == want == ["1,2", "3,4", "5,6", "", "7,\u00e98", "9,10"]


def test_lines_parsed_together_as_each_alone():
    """_parse_chunk's NumPy path (all lines well-formed) gives _parse_line's values, and a
    chunk with any bad line falls back to each line alone (its error message per line)."""
    from edgetune.cli.cmd_detect import _parse_chunk, _parse_line

    rows = np.random.default_rng(4).normal(size=(6, 3)) * 10.0 ** np.arange(-3, 3)[:, None]
    clean = [",".join(f"{v:.17g}" for v in r) for r in rows]
    clean[2] = clean[2].replace(",", " ")          # blanks and commas mixed
    clean[3] = "nan, inf ,-inf"
    clean.insert(1, "   ")
    for lines in (clean, clean + ["[1, 2, 3]"], clean + ["1,2"], clean + ["1_0,2,3"]):
        got = _parse_chunk(lines, 3)
        assert len(got) == len(lines) and got[1] is None
        for ln, g in zip(lines, got):
            if not ln.strip():
                continue
            try:
                want = np.array(_parse_line(ln, 3))
            except ValueError as e:
                assert g == str(e)
            else:
                np.testing.assert_array_equal(g, want)
