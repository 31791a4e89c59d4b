"""Download the data sets from their public homes, verified and written atomically.

- ``cooling-fan``: the zips of ``DATA/`` in the public GitHub repository
  ``matutani/cooling-fan`` (Sunaga, Kondo, Matsutani), pinned to the commit that added them,
  each checked against the SHA-256 in :data:`FAN_MANIFEST`.
- ``hapt``: the UCI archive of "Smartphone-Based Recognition of Human Activities and
  Postural Transitions" (data set 341), saved as ``hapt/HAPT-RawData.zip`` (the loader
  finds ``RawData/`` inside it).

Every file goes to a temporary file beside its target, is hashed while it streams, and is
renamed into place only after its size and SHA-256 match; a failed or interrupted download
leaves nothing behind. ``url`` replaces the public home (a mirror, or a ``file://`` URL):
for ``cooling-fan`` it is the folder URL the zip names are appended to.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..errors import DataError, UsageError
from ..io_atomic import fsync_dir
from ..progress import Progress
from .locate import DATASET_NAMES, ENV_DATA, HAPT_ZIP, default_data_dir

FAN_HOME = "https://github.com/matutani/cooling-fan"
FAN_BASE_URL = ("https://raw.githubusercontent.com/matutani/cooling-fan/"
                "ebc35d096fd7365c66ea8c0cd74d00c22d8d1345/DATA/")
HAPT_HOME = ("https://archive.ics.uci.edu/dataset/341/"
             "smartphone+based+recognition+of+human+activities+and+postural+transitions")
HAPT_URL = ("https://archive.ics.uci.edu/static/public/341/"
            "smartphone+based+recognition+of+human+activities+and+postural+transitions.zip")

# name -> (bytes, sha256) of every zip in the published DATA/ folder.
FAN_MANIFEST: dict[str, tuple[int, str]] = {
    "12cm_h_normal_noisy.zip": (940913, "27a7a76beb1f421fe424b37ab61fcd997e2f01af6d3599695166fd2dba937b79"),
    "12cm_h_normal_silentA.zip": (934837, "37126a469ccd94d497070dd4446a78dd031ff2337252d4281cb6ae52930b7505"),
    "12cm_h_normal_silentB.zip": (935099, "be46b1e94ad0bd325da1b1de900ed646b24f234537526edf07fc11a84f826939"),
    "12cm_hmlo_damage1_noisy_1.zip": (731223, "7795fd2741062d5c51ffb4b01927ca7ea4d5352eb6b6f1efc65c1c2f8007be0d"),
    "12cm_hmlo_damage1_noisy_2.zip": (731122, "b268d5b8cc2b742f60a01ee765267b0084d50a29ccc358adf30d379cb2acfd55"),
    "12cm_hmlo_damage1_silentA_1.zip": (713404, "eb41e3d247dccf1ba26eea1717f35ce142d0f704817eb30233bb0d58d701715d"),
    "12cm_hmlo_damage1_silentA_2.zip": (713889, "3c00a833387b05ccf2558d37fa564e747dcfa0bf0719a9ca3747e487ec2b0eb1"),
    "12cm_hmlo_damage1_silentB_1.zip": (714654, "9c6d20cb1362d176b897b4067a3914b10a364e8e0dffbbd9207384f7957cf9b9"),
    "12cm_hmlo_damage1_silentB_2.zip": (714585, "2784a5e76710e906bc74b02cf0cde28de2047ff63d93342fe61c540cc28501eb"),
    "12cm_hmlo_damage2_noisy_1.zip": (730518, "9cce3d67746930fbc31cb332ff70ced1a43f23aefbc36da924c4e12650ba4983"),
    "12cm_hmlo_damage2_noisy_2.zip": (730887, "9fee65602474a321328ba4103135bf42de47b5f14eac150a7ab4b451679d37c1"),
    "12cm_hmlo_damage2_silentA_1.zip": (715466, "84f31ef22fa241fae8cd96dcb251ac9b5be4297739288bcdf1feca1b8f8fb03d"),
    "12cm_hmlo_damage2_silentA_2.zip": (717398, "01ef93c3e1e7473b218011c2ecfd89b16908732b7dae281aa8581b76c00bff2c"),
    "12cm_hmlo_damage2_silentB_1.zip": (717165, "756bbcb86107d747ef530e4fd1cf92f084f832779e8d90d4918938180f94eece"),
    "12cm_hmlo_damage2_silentB_2.zip": (716003, "49d5b6bba0ed63c9f2bb06012ef505568db809dca47b23cffddf1661526b0a4b"),
    "12cm_hmlo_normal_noisy_1.zip": (730469, "8266c411194f6aa71b814d1c1c43c141425c0a825c7600e0e943864eaa17a285"),
    "12cm_hmlo_normal_noisy_2.zip": (731192, "3ea395d09681c054de21bd6c94161bc92be268df5e1f1630de2dce76d788b7e8"),
    "12cm_hmlo_normal_silentA_1.zip": (715589, "5a2b0281bf97e0849001c4cea456b2bb670a463ce1acacc22288d55cdf817f0f"),
    "12cm_hmlo_normal_silentA_2.zip": (716208, "c70961379f2020b76ad48d575703278f238b6f6b4a11cf6cc28f5e447fe002ad"),
    "12cm_hmlo_normal_silentB_1.zip": (715577, "a7ef8a52e9b80ff32550d5491b1594166a484fc5dfc7a614f5a757964ce62217"),
    "12cm_hmlo_normal_silentB_2.zip": (715090, "801f826ae209a15fa4a4f2bceb851455a101604c7626f4dc853e0c7717ef6fbb"),
    "12cm_l_normal_noisy.zip": (931909, "957d3186a3492244ae0856a90febcae095f534f5f1f0a42b9a7a158ee5f70c70"),
    "12cm_l_normal_silentA.zip": (919587, "c07ab515e3844e247cd966100ab5d3f62f473a5a899f6f67adc4a7ac158b23ac"),
    "12cm_l_normal_silentB.zip": (921698, "c2c9723614d1eb3359c65181530b2c6766725d4b6fdd3025cc493ca40f73a330"),
    "12cm_m_normal_noisy.zip": (937079, "4a42f093de248a8e25e3b36fb1fe042b88098bed7ec3ed0946ce644e9156854a"),
    "12cm_m_normal_silentA.zip": (927444, "f0a6ca35b2cf72c4da5b5a6e13d25e2b430554031f09427eedbd552ac7900b0f"),
    "12cm_m_normal_silentB.zip": (925543, "e2c3570975eeef8a834e3a7de02f863624007394bf5626677578f5def15519ab"),
    "12cm_o_normal_noisy.zip": (906554, "f8fcacdd99238d57224298ea009b7d3a1e6bf1aedd60779b0b34fa853df19539"),
    "12cm_o_normal_silentA.zip": (859765, "7202a8ee1c30cd791c68aec4339d9d3bd7232b6228eba87ffd24435682ea6117"),
    "12cm_o_normal_silentB.zip": (859595, "5493d2643f258002029f46819d39ef210b971704094e6865daf66ccd6f6a1870"),
    "14cm_h_normal_silentA.zip": (928261, "0faee6e21937ae70e3a98f66e6f9cb7691c890f00365fa0e6955cd63345e6bbd"),
    "14cm_hmlo_normal_silentA_1.zip": (714603, "1324e46f80444fd4b577947bbe4e45c2fa082fa869f083bd1ac0ae00a518bedb"),
    "14cm_hmlo_normal_silentA_2.zip": (713424, "e3c7194cf7bf56b5c417ae9adfe2d60f91ff6713b9faf55760c46101f2db3b04"),
    "14cm_l_normal_silentA.zip": (918705, "3e349e9f4e3aff5e7e3a405a27861ef3855cc480686441cdac7ab788d10e9b25"),
    "14cm_m_normal_silentA.zip": (925928, "3ced1ecbb7212e39e4c82dbc5360022205193ffd8871a7d6d65b0b974f01dfd3"),
    "14cm_o_normal_silentA.zip": (859653, "001741bc24aa22d2e1903549922aa3e1232fc511653f5cdb52b04b2ae892be5a"),
    "8cm_h_normal_silentA.zip": (930603, "e2839be6c97051f2a51e0c188e413ecd5a5fdadae49eeaa7059f9a3a91c3562e"),
    "8cm_hmlo_normal_silentA_1.zip": (714666, "662b9ace503fd01e2a50ba7420509aadaae568caddea9842b2d907d3bb300d9a"),
    "8cm_hmlo_normal_silentA_2.zip": (715452, "43335af03dc8386533d52ec3902344b03d4d4a8a105ac858a1a6fd4398599590"),
    "8cm_l_normal_silentA.zip": (923395, "4cb877c2dbd8068d6ed55e1f625f5a216d0f68cb3cdfbaa5116ff35279355cbc"),
    "8cm_m_normal_silentA.zip": (925494, "a4decefd8cf4cca2e902e334e48ef8dec48cf363bd3a98a290785b738f3ee6b7"),
    "8cm_o_normal_silentA.zip": (859375, "3b32200c687af27e7a1ec4a3c5d24da72ef278d7550368073ea0ae77db163b20"),
}

# Accepted HAPT archives: the UCI archive (the public record of its size and hash) and the
# RawData-only re-export that edgetune's own tests use (RawData/ + activity_labels.txt).
HAPT_ACCEPTED: dict[str, int] = {
    "4ac4ae064227c07045a99551876b54d204837e995e298b6488559e209b3deb09": 79_596_192,
    "16b465cebeecd202cbdf2140a7d5d371d872201dc004cc17fe9af79451338c15": 22_061_281,
}

CHUNK = 1 << 16
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RemoteFile:
    target: str                # path under the data dir, e.g. "cooling-fan/x.zip"
    url: str
    sha256: frozenset[str]     # accepted digests
    size: int                  # expected bytes (for the progress bar when the server is silent)


def fetch_target_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Where ``fetch`` writes: ``data_dir``, else ``$EDGETUNE_DATA``, else the user cache."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_DATA, "").strip()
    return Path(env).expanduser() if env else default_data_dir()


def remote_files(name: str, url: str | None = None, only: Iterable[str] | None = None) -> list[RemoteFile]:
    """The files that make up data set ``name``, downloaded from ``url`` or its public home."""
    if name not in DATASET_NAMES:
        raise UsageError(f"unknown data set '{name}': use one of {', '.join(DATASET_NAMES)}")
    if name == "hapt":
        if only:
            raise UsageError("hapt is a single file; 'only' applies to cooling-fan")
        size = max(HAPT_ACCEPTED.values()) if url is None else min(HAPT_ACCEPTED.values())
        return [RemoteFile(f"hapt/{HAPT_ZIP}", url or HAPT_URL, frozenset(HAPT_ACCEPTED), size)]
    names = sorted(FAN_MANIFEST)
    if only is not None:
        wanted = list(only)
        unknown = sorted(set(wanted) - set(FAN_MANIFEST))
        if unknown:
            raise UsageError(f"not a cooling-fan file: {', '.join(unknown)}")
        names = [n for n in names if n in set(wanted)]
    base = url or FAN_BASE_URL
    if not base.endswith("/"):
        base += "/"
    return [RemoteFile(f"cooling-fan/{n}", base + urllib.parse.quote(n),
                       frozenset([FAN_MANIFEST[n][1]]), FAN_MANIFEST[n][0]) for n in names]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str, data_dir: str | os.PathLike | None = None, url: str | None = None, *,
          only: Iterable[str] | None = None, force: bool = False, progress: bool | None = None,
          log: Callable[[str], None] | None = None) -> list[Path]:
    """Download data set ``name`` into the data dir; return the paths of its files.

    Files already present with the right checksum are kept unless ``force``. Raises
    DataError on a network failure, an HTTP error, a short download or a checksum
    mismatch, leaving no partial file behind."""
    files = remote_files(name, url, only)
    root = fetch_target_dir(data_dir)
    say = log or (lambda _msg: None)
    out: list[Path] = []
    todo: list[RemoteFile] = []
    for rf in files:
        target = root / rf.target
        if target.is_file() and not force and sha256_file(target) in rf.sha256:
            out.append(target)
        else:
            todo.append(rf)
    if len(todo) < len(files):
        say(f"{len(files) - len(todo)} of {len(files)} file(s) already present and verified")
    if todo:
        total = sum(rf.size for rf in todo)
        # Folders this fetch creates are removed again if it fails and leaves them empty.
        made = [d for d in {(root / rf.target).parent for rf in todo} | {root} if not d.exists()]
        try:
            with Progress(total, f"fetch {name}", enabled=progress) as bar:
                for rf in todo:
                    out.append(download(rf, root / rf.target, bar))
        except BaseException:
            for d in sorted(made, key=lambda p: len(p.parts), reverse=True):
                try:
                    d.rmdir()  # only if empty
                except OSError:
                    pass
            raise
        say(f"downloaded {len(todo)} file(s) into {root / files[0].target.split('/')[0]}")
    return sorted(out)


def download(rf: RemoteFile, target: Path, bar: Progress | None = None) -> Path:
    """Stream ``rf.url`` to ``target`` through a verified temporary file."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as e:
        raise DataError(f"cannot write into {target.parent} ({e.strerror or e})") from None
    try:
        h = hashlib.sha256()
        got = 0
        with os.fdopen(fd, "wb") as f:
            try:
                req = urllib.request.Request(rf.url, headers={"User-Agent": "edgetune-fetch"})
                with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                    length = resp.headers.get("Content-Length")
                    expected = int(length) if length and length.isdigit() else None
                    while True:
                        block = resp.read(CHUNK)
                        if not block:
                            break
                        f.write(block)
                        h.update(block)
                        got += len(block)
                        if bar is not None:
                            bar.update(len(block), postfix=target.name)
            except urllib.error.HTTPError as e:
                raise DataError(f"download of {rf.url} failed: HTTP {e.code} {e.reason}") from None
            except urllib.error.URLError as e:
                raise DataError(f"download of {rf.url} failed: {e.reason}; check the network "
                                f"connection, or pass --url (a mirror) or --data-dir (a local copy)"
                                ) from None
            except (http.client.HTTPException, OSError) as e:
                raise DataError(f"download of {rf.url} broke off after {got} bytes "
                                f"({type(e).__name__}: {e}); run the command again") from None
            if expected is not None and got != expected:
                raise DataError(f"download of {rf.url} is truncated: got {got} of {expected} bytes; "
                                f"run the command again")
            digest = h.hexdigest()
            if digest not in rf.sha256:
                want = " or ".join(sorted(rf.sha256))
                raise DataError(f"checksum mismatch for {rf.url}: sha256 {digest} ({got} bytes), "
                                f"expected {want}; the file was not saved")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(target.parent)
    return target


def status(data_dir: str | os.PathLike | None = None) -> list[dict]:
    """For each data set: where it was found (or None), from which setting, and its size."""
    from .locate import dataset_size, find_dataset
    rows = []
    for name in DATASET_NAMES:
        row = {"name": name, "path": None, "source": None, "bytes": 0,
               "home": FAN_HOME if name == "cooling-fan" else HAPT_HOME}
        try:
            found = find_dataset(name, data_dir)
        except DataError:
            rows.append(row)
            continue
        row.update(path=str(found.path), source=found.source, bytes=dataset_size(found))
        if name == "cooling-fan":
            present = {p.name for p in found.path.glob("*.zip")}
            row["files"] = f"{len(present & set(FAN_MANIFEST))}/{len(FAN_MANIFEST)} zips"
        rows.append(row)
    return rows
