"""Data location, `edgetune data` and the verified download path (local server, file://)."""
from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from edgetune.cli import main
from edgetune.data import fetch as fetch_mod
from edgetune.data.fetch import FAN_MANIFEST, HAPT_ACCEPTED, fetch, remote_files
from edgetune.data.locate import default_data_dir, find_dataset, search_dirs
from edgetune.errors import DataError, UsageError

from .conftest import DATA_DIR as DATA

needs_data = pytest.mark.skipif(not (DATA / "cooling-fan").is_dir(), reason=f"real data not at {DATA}")
TWO = ["12cm_hmlo_normal_noisy_1.zip", "8cm_o_normal_silentA.zip"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("EDGETUNE_DATA", raising=False)


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        if self.path.startswith("/truncated/"):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    _Handler.requests = []
    handler = lambda *a, **k: _Handler(*a, directory=str(root), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ---------------------------------------------------------------- locate

def test_search_order(tmp_path, monkeypatch):
    assert search_dirs() == [(default_data_dir(), "user cache")]
    assert default_data_dir() == tmp_path / "xdg" / "edgetune" / "data"
    monkeypatch.setenv("EDGETUNE_DATA", str(tmp_path / "env"))
    assert [s for _, s in search_dirs()] == ["$EDGETUNE_DATA", "user cache"]
    assert search_dirs(tmp_path / "explicit") == [(tmp_path / "explicit", "--data-dir")]


@needs_data
def test_env_then_cache(tmp_path, monkeypatch):
    cache_hapt = default_data_dir() / "hapt"
    cache_hapt.mkdir(parents=True)
    shutil.copy(DATA / "hapt" / "HAPT-RawData.zip", cache_hapt)
    monkeypatch.setenv("EDGETUNE_DATA", str(DATA))
    assert find_dataset("hapt").source == "$EDGETUNE_DATA"
    monkeypatch.setenv("EDGETUNE_DATA", str(tmp_path / "empty"))
    found = find_dataset("hapt")
    assert (found.path, found.source) == (cache_hapt / "HAPT-RawData.zip", "user cache")
    with pytest.raises(DataError, match="--data-dir"):  # an explicit folder is the only place looked
        find_dataset("hapt", tmp_path / "empty")


def test_unknown_dataset_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown data set 'mnist'"):
        find_dataset("mnist")
    with pytest.raises(UsageError, match="unknown data set"):
        remote_files("mnist")


# ---------------------------------------------------------------- download

def test_manifest_matches_the_published_copies():
    if not (DATA / "cooling-fan").is_dir():
        pytest.skip("real data not found")
    on_disk = sorted(p.name for p in (DATA / "cooling-fan").glob("*.zip"))
    assert on_disk == sorted(FAN_MANIFEST) and len(on_disk) == 42
    for name in TWO:
        size, digest = FAN_MANIFEST[name]
        p = DATA / "cooling-fan" / name
        assert p.stat().st_size == size and fetch_mod.sha256_file(p) == digest
    assert fetch_mod.sha256_file(DATA / "hapt" / "HAPT-RawData.zip") in HAPT_ACCEPTED


@needs_data
def test_fetch_cooling_fan_from_local_server(tmp_path, server):
    root, base = server
    for name in TWO:
        shutil.copy(DATA / "cooling-fan" / name, root / name)
    dest = tmp_path / "data"
    paths = fetch("cooling-fan", dest, base + "/", only=TWO, progress=False)
    assert paths == [dest / "cooling-fan" / n for n in sorted(TWO)]
    for name in TWO:
        assert (dest / "cooling-fan" / name).read_bytes() == (DATA / "cooling-fan" / name).read_bytes()
    assert leftovers(dest) == sorted(TWO)  # no temporary files
    assert sorted(_Handler.requests) == sorted(f"/{n}" for n in TWO)
    # Present and verified: nothing is downloaded again.
    fetch("cooling-fan", dest, base, only=TWO, progress=False)
    assert len(_Handler.requests) == 2
    # The fetched folder is usable by the loader.
    from edgetune.data.fan import list_recordings
    assert [r.name for r in list_recordings(dest)] == sorted(n[:-4] for n in TWO)


@needs_data
def test_fetch_hapt_from_file_url(tmp_path):
    url = (DATA / "hapt" / "HAPT-RawData.zip").as_uri()
    paths = fetch("hapt", tmp_path / "d", url, progress=False)
    assert paths == [tmp_path / "d" / "hapt" / "HAPT-RawData.zip"]
    assert hashlib.sha256(paths[0].read_bytes()).hexdigest() in HAPT_ACCEPTED
    assert find_dataset("hapt", tmp_path / "d").path == paths[0]


def test_checksum_mismatch_leaves_nothing(tmp_path, server):
    root, base = server
    (root / TWO[0]).write_bytes(b"not the published zip")
    dest = tmp_path / "data"
    with pytest.raises(DataError, match="checksum mismatch") as e:
        fetch("cooling-fan", dest, base, only=[TWO[0]], progress=False)
    assert FAN_MANIFEST[TWO[0]][1] in str(e.value)
    assert hashlib.sha256(b"not the published zip").hexdigest() in str(e.value)
    assert leftovers(dest) == []


def test_existing_damaged_file_is_replaced(tmp_path, server):
    root, base = server
    src = tmp_path / "good.zip"
    src.write_bytes(b"mirror content")
    digest = hashlib.sha256(b"mirror content").hexdigest()
    (root / "hapt.zip").write_bytes(b"mirror content")
    dest = tmp_path / "data" / "hapt" / "HAPT-RawData.zip"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"half a file")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fetch_mod, "HAPT_ACCEPTED", {digest: 14})
        fetch("hapt", tmp_path / "data", base + "/hapt.zip", progress=False)
    assert dest.read_bytes() == b"mirror content"


def test_http_404(tmp_path, server):
    _, base = server
    with pytest.raises(DataError, match="HTTP 404"):
        fetch("hapt", tmp_path / "data", base + "/nothing-here.zip", progress=False)
    assert leftovers(tmp_path / "data") == []


def test_truncated_download(tmp_path, server):
    _, base = server
    with pytest.raises(DataError, match="truncated|broke off") as e:
        fetch("hapt", tmp_path / "data", base + "/truncated/HAPT-RawData.zip", progress=False)
    assert "1000" in str(e.value)
    assert leftovers(tmp_path / "data") == []


def test_network_failure(tmp_path):
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match="check the network connection"):
        fetch("hapt", tmp_path / "data", f"http://127.0.0.1:{port}/x.zip", progress=False)
    with pytest.raises(DataError, match="failed"):
        fetch("hapt", tmp_path / "data", (tmp_path / "missing.zip").as_uri(), progress=False)
    assert leftovers(tmp_path / "data") == []


def test_fetch_goes_to_env_dir_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETUNE_DATA", str(tmp_path / "env"))
    assert fetch_mod.fetch_target_dir() == tmp_path / "env"
    monkeypatch.delenv("EDGETUNE_DATA")
    assert fetch_mod.fetch_target_dir() == default_data_dir()


@given(st.lists(st.sampled_from(sorted(FAN_MANIFEST)), unique=True, max_size=5),
       st.sampled_from(["http://mirror/x", "http://mirror/x/", "file:///d/cooling%20fan/"]))
def test_remote_files_for_a_subset(names, base):
    files = remote_files("cooling-fan", base, only=names)
    assert [f.target for f in files] == [f"cooling-fan/{n}" for n in sorted(names)]
    for f, n in zip(files, sorted(names)):
        assert f.url == base.rstrip("/") + "/" + n and f.sha256 == {FAN_MANIFEST[n][1]}


def test_remote_files_rejects_unknown_names():
    with pytest.raises(UsageError, match="not a cooling-fan file: x.zip"):
        remote_files("cooling-fan", only=["x.zip"])
    assert remote_files("hapt")[0].url.startswith("https://archive.ics.uci.edu/")
    assert remote_files("cooling-fan")[0].url.startswith(
        "https://raw.githubusercontent.com/matutani/cooling-fan/")


# ---------------------------------------------------------------- CLI

@needs_data
def test_cli_list_and_info(capsys, tmp_path):
    assert main(["data", "list", "--data-dir", str(DATA)]) == 0
    out = capsys.readouterr().out
    assert "cooling-fan" in out and "34.1 MB" in out and "42/42 zips" in out
    assert "22.1 MB" in out and str(DATA / "hapt" / "HAPT-RawData.zip") in out
    assert main(["data", "list", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("missing") == 2 and "edgetune data fetch hapt" in out
    assert main(["data", "info", "damage1", "--data-dir", str(DATA)]) == 0
    out = capsys.readouterr().out
    assert "pretrain 940, finetune 470, test 470, silent 940" in out and "epochs=100" in out


def test_cli_errors(capsys, tmp_path):
    assert main(["data"]) == 2
    assert main(["data", "fetch", "mnist", "--quiet"]) == 2
    assert "unknown data set 'mnist'" in capsys.readouterr().err
    assert main(["data", "info", "har", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "edgetune data fetch hapt" in err and "Traceback" not in err
    assert main(["data", "fetch", "hapt", "--quiet", "--data-dir", str(tmp_path),
                 "--url", (tmp_path / "nope.zip").as_uri()]) == 1
    assert "download of" in capsys.readouterr().err


@needs_data
def test_cli_fetch_file_url(capsys, tmp_path):
    url = (DATA / "hapt" / "HAPT-RawData.zip").as_uri()
    assert main(["data", "fetch", "hapt", "--quiet", "--data-dir", str(tmp_path), "--url", url]) == 0
    assert f"hapt: 1 file(s) in {tmp_path / 'hapt'}" in capsys.readouterr().out
    assert os.path.getsize(tmp_path / "hapt" / "HAPT-RawData.zip") == 22_061_281
