"""Hostile archives, each imported as root and as the unprivileged test user.

For every archive: nothing appears outside the store (a unique token names whatever
the archive tries to create, and it is looked for everywhere it could land), a refusal
names the offending entry, and the store lists no image, keeps no layer and no work
directory from a refused import. Archives sbx imports after neutralising an entry (a
device node, a setuid binary) must show the neutralised result and a note naming it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

IMPORT_SCRIPT = r"""
import json, os, sys
from sandbox import rootfs
from sandbox.errors import SbxError
out = {}
try:
    image = rootfs.import_image(sys.argv[1], "hostile")
    lowerdirs = rootfs.image_lowerdirs("hostile")
    out.update(ok=True, notes=list(image.notes), lowerdirs=lowerdirs)
except SbxError as exc:
    out.update(ok=False, error=str(exc), kind=type(exc).__name__,
               entry=getattr(exc, "entry", None))
store = rootfs.Store()
out["images"] = [image.name for image in rootfs.list_images()]
out["tmp"] = sorted(os.listdir(store.tmp)) if store.tmp.exists() else []
out["layers"] = sorted(os.listdir(store.layers)) if store.layers.exists() else []
print(json.dumps(out))
"""


# --- archive building ---------------------------------------------------------------


def member(name, kind=tarfile.REGTYPE, data=b"", mode=0o644, linkname="", uid=0):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.uid, info.gid = (
        kind,
        mode,
        linkname,
        uid,
        0,
    )
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3
    return info, data


def write_tar(path: Path, members, compress=False) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    raw = buffer.getvalue()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    path.chmod(0o644)
    return path


def oci_tar(path: Path, layer_members) -> Path:
    """An OCI image layout, as a tar, with one layer made of `layer_members`."""
    layout = io.BytesIO()
    blobs = {}

    def blob(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return "sha256:" + digest

    layer_path = path.with_suffix(".layer")
    write_tar(layer_path, layer_members)
    layer = blob(layer_path.read_bytes())
    config = blob(b"{}")
    manifest = blob(
        json.dumps(
            {
                "schemaVersion": 2,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config,
                    "size": 2,
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer,
                        "size": layer_path.stat().st_size,
                    }
                ],
            }
        ).encode()
    )
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest,
                "size": len(blobs[manifest[7:]]),
            }
        ],
    }
    files = [
        ("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
        ("index.json", json.dumps(index).encode()),
    ]
    files += [(f"blobs/sha256/{d}", data) for d, data in blobs.items()]
    with tarfile.open(fileobj=layout, mode="w") as archive:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    path.write_bytes(layout.getvalue())
    path.chmod(0o644)
    return path


def hostile_archives(work: Path, token: str) -> dict:
    """name -> (archive path, entry the refusal must name, or None if it is imported
    with the entry neutralised)."""
    out_tmp = f"tmp/{token}"
    cases = {
        "dotdot": ([member("../" * 12 + out_tmp, data=b"x")], "../" * 12 + out_tmp),
        "dotdot-inside": (
            [
                member("a", tarfile.DIRTYPE, mode=0o755),
                member(f"a/../../{token}", data=b"x"),
            ],
            f"a/../../{token}",
        ),
        "absolute": ([member(f"/tmp/{token}", data=b"x")], f"/tmp/{token}"),
        "symlink-to-tmp": (
            [
                member("evil", tarfile.SYMTYPE, linkname="/tmp"),
                member(f"evil/{token}", data=b"x"),
            ],
            f"evil/{token}",
        ),
        "symlink-chain-up": (
            [
                member("up", tarfile.SYMTYPE, linkname=".."),
                member("up/" * 10 + out_tmp, data=b"x"),
            ],
            "up/" * 10 + out_tmp,
        ),
        "symlink-then-dir": (
            [
                member("evil", tarfile.SYMTYPE, linkname="/tmp"),
                member(f"evil/{token}", tarfile.DIRTYPE, mode=0o755),
            ],
            f"evil/{token}",
        ),
        "hardlink-passwd": (
            [member(f"p-{token}", tarfile.LNKTYPE, linkname="/etc/passwd")],
            f"p-{token}",
        ),
        "hardlink-passwd-dotdot": (
            [member(f"p-{token}", tarfile.LNKTYPE, linkname="../" * 12 + "etc/passwd")],
            f"p-{token}",
        ),
        "hardlink-through-symlink": (
            [
                member("etc", tarfile.SYMTYPE, linkname="/etc"),
                member(f"p-{token}", tarfile.LNKTYPE, linkname="etc/passwd"),
            ],
            f"p-{token}",
        ),
        "symlink-then-file-of-same-name": (
            [
                member(token, tarfile.SYMTYPE, linkname=f"/tmp/{token}"),
                member(token, data=b"replaced"),
            ],
            None,
        ),
        "char-device": ([member(f"dev/{token}", tarfile.CHRTYPE, mode=0o666)], None),
        "fifo": ([member(f"{token}.fifo", tarfile.FIFOTYPE)], None),
        "setuid-root-binary": (
            [
                member(f"bin/{token}", data=b"\x7fELF", mode=0o4755),
                member(f"bin/{token}-g", data=b"x", mode=0o2755),
            ],
            None,
        ),
    }
    archives = {
        name: (write_tar(work / f"{name}.tar", members), bad)
        for name, (members, bad) in cases.items()
    }
    archives["oci-layer-dotdot"] = (
        oci_tar(
            work / "oci-layer-dotdot.tar", [member("../" * 12 + out_tmp, data=b"x")]
        ),
        "../" * 12 + out_tmp,
    )
    return archives


# --- running an import as a caller -------------------------------------------------


@pytest.fixture
def work(caller):
    """A scratch directory both callers can read, with a store owned by the caller."""
    top = Path(tempfile.mkdtemp(prefix="sbx-rootfs-hostile-"))
    top.chmod(0o755)
    data_home = top / "data"
    data_home.mkdir()
    os.chown(data_home, caller.uid, caller.gid)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def import_as(caller, work: Path, archive: Path) -> dict:
    env = caller.env() | {"XDG_DATA_HOME": str(work / "data"), "HOME": str(caller.home)}
    command = [sys.executable, "-c", IMPORT_SCRIPT, str(archive)]
    if caller.uid != os.geteuid():
        command = [
            "setpriv",
            f"--reuid={caller.uid}",
            f"--regid={caller.gid}",
            "--init-groups",
            *command,
        ]
    done = subprocess.run(
        command,
        env=env,
        cwd=str(work / "data"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def places_named(token: str, work: Path, caller) -> list[str]:
    """Every file or link called `token` (or starting with it) where an escape could
    put one."""
    found = []
    for top in (Path("/"), Path("/tmp"), Path("/etc"), caller.home, Path.cwd()):
        found += [str(p) for p in top.glob(f"{token}*")]
    store_layers = work / "data" / "sbx" / "rootfs" / "layers"
    for dirpath, dirnames, filenames in os.walk(work):
        if Path(dirpath).is_relative_to(store_layers):
            continue  # inside an imported image is where entries belong
        found += [os.path.join(dirpath, n) for n in dirnames + filenames if token in n]
    return found


def passwd_state():
    st = os.stat("/etc/passwd")
    return hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest(), st.st_nlink


# --- the tests -----------------------------------------------------------------------


def test_hostile_archives_are_refused_or_neutralised(caller, work):
    token = f"sbx-hostile-{secrets.token_hex(6)}"
    before = passwd_state()
    for name, (archive, bad_entry) in hostile_archives(work, token).items():
        result = import_as(caller, work, archive)
        assert places_named(token, work, caller) == [], name
        assert passwd_state() == before, name
        assert result["tmp"] == [], name
        if bad_entry is not None:
            assert not result["ok"], name
            assert result["kind"] == "ImportRefused", (name, result)
            assert result["entry"] == bad_entry, (name, result)
            assert repr(bad_entry) in result["error"], (name, result)
            assert "\n" not in result["error"]
            assert result["images"] == [] and result["layers"] == [], name
        else:
            assert result["ok"], (name, result)
            check_neutralised(name, token, result)
            remove_as(caller, work)


def check_neutralised(name: str, token: str, result: dict) -> None:
    layer = Path(result["lowerdirs"][0])
    if name in ("char-device", "fifo"):
        assert [n for n in os.listdir(layer) if token in n] in ([], ["dev"]), name
        assert not os.path.lexists(layer / "dev" / token)
        assert any(token in note for note in result["notes"]), result["notes"]
    elif name == "setuid-root-binary":
        for binary in (layer / "bin" / token, layer / "bin" / f"{token}-g"):
            st = os.stat(binary)
            assert st.st_mode & 0o6000 == 0 and st.st_mode & 0o777 == 0o755
        assert sum(token in note for note in result["notes"]) == 2
    elif name == "symlink-then-file-of-same-name":
        assert not (layer / token).is_symlink()
        assert (layer / token).read_bytes() == b"replaced"


def remove_as(caller, work: Path) -> None:
    env = caller.env() | {"XDG_DATA_HOME": str(work / "data"), "HOME": str(caller.home)}
    script = "from sandbox import rootfs; rootfs.remove_image('hostile')"
    command = [sys.executable, "-c", script]
    if caller.uid != os.geteuid():
        command = [
            "setpriv",
            f"--reuid={caller.uid}",
            f"--regid={caller.gid}",
            "--init-groups",
            *command,
        ]
    subprocess.run(command, env=env, check=True, timeout=60, cwd="/")


def test_imported_files_belong_to_the_importer(caller, work):
    archive = hostile_archives(work, f"sbx-own-{secrets.token_hex(4)}")
    result = import_as(caller, work, archive["setuid-root-binary"][0])
    for dirpath, dirnames, filenames in os.walk(result["lowerdirs"][0]):
        for name in dirnames + filenames:
            assert os.lstat(os.path.join(dirpath, name)).st_uid == caller.uid


@pytest.mark.parametrize("cut", ["half", "trailer"])
def test_truncated_gzip_leaves_nothing(caller, work, cut):
    members = [member(f"f{i}", data=os.urandom(4096)) for i in range(30)]
    archive = write_tar(work / "good.tar.gz", members, compress=True)
    raw = archive.read_bytes()
    archive = work / "truncated.tar.gz"
    archive.write_bytes(raw[: len(raw) // 2] if cut == "half" else raw[:-4])
    archive.chmod(0o644)
    result = import_as(caller, work, archive)
    assert not result["ok"] and result["kind"] == "UsageError"
    assert "truncated" in result["error"] and str(archive) in result["error"]
    assert result["images"] == [] and result["layers"] == [] and result["tmp"] == []


def test_docker_manifest_pointing_outside_is_refused(caller, work):
    layout = io.BytesIO()
    manifest = json.dumps(
        [
            {
                "Config": "c.json",
                "RepoTags": ["x:1"],
                "Layers": ["../../../../../etc/passwd"],
            }
        ]
    ).encode()
    with tarfile.open(fileobj=layout, mode="w") as archive:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        archive.addfile(info, io.BytesIO(manifest))
    path = work / "docker.tar"
    path.write_bytes(layout.getvalue())
    path.chmod(0o644)
    result = import_as(caller, work, path)
    assert not result["ok"] and "outside the layout" in result["error"]
    assert result["images"] == [] and result["layers"] == [] and result["tmp"] == []
