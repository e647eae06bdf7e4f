"""Importing real images and looking at them through a real overlay mount.

Each import runs as root and as the unprivileged test user, in a store of its own.
The overlay checks mount the image's lower directories in a user namespace
(util-linux `unshare -Urm`), with a tmpfs upper layer, as the sandbox core does, and
chroot into the result: what a program inside would see. The Debian test builds a
minbase root filesystem with the recipe once per session (debootstrap needs root and
about a minute and a half here) and keeps it in a cache between sessions.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("SBX_TEST_CACHE", "/var/tmp/sbx-test-cache"))
DEBIAN_TARBALL = CACHE / "debian-bookworm-minbase.tar.gz"
DEBIAN_MAX_AGE_S = 7 * 24 * 3600

SCRIPT = r"""
import json, sys
from sandbox import rootfs
from sandbox.errors import SbxError
command, args = sys.argv[1], sys.argv[2:]
try:
    if command == "import":
        image = rootfs.import_image(args[0], args[1], replace=len(args) > 2)
        out = image.to_json() | {"lowerdirs": rootfs.image_lowerdirs(args[1])}
    elif command == "list":
        out = [image.to_json() for image in rootfs.list_images()]
    elif command == "show":
        out = rootfs.show_image(args[0]).to_json()
    elif command == "rm":
        out = rootfs.remove_image(args[0])
    elif command == "verify":
        out = rootfs.verify_image(args[0])
except SbxError as exc:
    out = {"error": str(exc), "kind": type(exc).__name__}
print(json.dumps(out))
"""


# --- helpers -------------------------------------------------------------------------


@pytest.fixture
def work(caller):
    """A scratch directory both callers can read; data/ and mnt/ belong to the
    caller."""
    top = Path(tempfile.mkdtemp(prefix="sbx-rootfs-it-"))
    top.chmod(0o755)
    for sub in ("data", "mnt"):
        (top / sub).mkdir()
        os.chown(top / sub, caller.uid, caller.gid)
    yield top
    subprocess.run(["chmod", "-R", "u+rwx", str(top)], capture_output=True)
    shutil.rmtree(top, ignore_errors=True)


def as_caller(caller, command: list[str]) -> list[str]:
    if caller.uid == os.geteuid():
        return command
    return [
        "setpriv",
        f"--reuid={caller.uid}",
        f"--regid={caller.gid}",
        "--init-groups",
        *command,
    ]


def sbx(caller, work: Path, *args: str):
    env = caller.env() | {"XDG_DATA_HOME": str(work / "data"), "HOME": str(caller.home)}
    done = subprocess.run(
        as_caller(caller, [sys.executable, "-c", SCRIPT, *args]),
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def in_overlay(caller, work: Path, lowerdirs: list[str], shell: str) -> str:
    """Run `shell` (sh -c) chrooted into an overlay of `lowerdirs` with a tmpfs upper
    layer, in a new user and mount namespace; returns its stdout."""
    mnt = work / "mnt"
    setup = (
        f"mount -t tmpfs -o size=16m tmpfs {mnt} && mkdir {mnt}/u {mnt}/w {mnt}/m && "
        f"mount -t overlay overlay -o lowerdir={':'.join(lowerdirs)},"
        f"upperdir={mnt}/u,workdir={mnt}/w {mnt}/m && "
        f'chroot {mnt}/m /bin/sh -c "$1"'
    )
    command = ["unshare", "-Urm", "sh", "-c", setup, "sh", shell]
    done = subprocess.run(
        as_caller(caller, command),
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def tar_of(members: list[tuple[str, bytes | str | None]], mode: str = "w") -> bytes:
    """A tar from (name, data) pairs; data None makes a directory, a str a symlink."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                archive.addfile(info)
            elif isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                archive.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o755 if name.startswith("bin/") else 0o644
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def readable(path: Path) -> Path:
    subprocess.run(["chmod", "-R", "a+rX", str(path)], check=True)
    return path


def busybox_base() -> list[tuple[str, bytes | str | None]]:
    applets = [(f"bin/{name}", "busybox") for name in ("sh", "ls", "cat", "echo")]
    return [
        ("bin", None),
        ("bin/busybox", Path("/bin/busybox").read_bytes()),
        ("tmp", None),
        *applets,
    ]


def oci_layout(top: Path, layers: list[bytes], gzip_layers: bool = True) -> Path:
    """An OCI image layout directory with `layers` (tar bytes), bottom first."""
    import gzip as gz

    blobs = top / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": "sha256:" + digest, "size": len(data)}

    layer_type = "application/vnd.oci.image.layer.v1.tar" + (
        "+gzip" if gzip_layers else ""
    )
    descriptors = [
        blob(gz.compress(layer) if gzip_layers else layer) | {"mediaType": layer_type}
        for layer in layers
    ]
    config = blob(b'{"architecture": "amd64", "os": "linux"}')
    manifest = blob(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config
                | {"mediaType": "application/vnd.oci.image.config.v1+json"},
                "layers": descriptors,
            }
        ).encode()
    )
    (top / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (top / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    manifest
                    | {"mediaType": "application/vnd.oci.image.manifest.v1+json"}
                ],
            }
        )
    )
    return readable(top)


def whiteout_layers() -> list[bytes]:
    lower = tar_of(
        busybox_base()
        + [
            ("etc", None),
            ("etc/gone", b"lower"),
            ("etc/kept", b"lower"),
            ("d", None),
            ("d/old1", b"1"),
            ("d/sub", None),
            ("d/sub/old2", b"2"),
        ]
    )
    upper = tar_of(
        [
            ("etc/.wh.gone", b""),
            ("d", None),
            ("d/.wh..wh..opq", b""),
            ("d/new", b"upper"),
        ]
    )
    return [lower, upper]


# --- tests ---------------------------------------------------------------------------


def test_oci_layout_whiteout_and_opaque_directory_in_a_real_overlay(caller, work):
    layout = oci_layout(work / "oci", whiteout_layers())
    image = sbx(caller, work, "import", str(layout), "wh")
    assert image["source_format"] == "oci" and len(image["source_layers"]) == 2
    seen = in_overlay(
        caller,
        work,
        image["lowerdirs"],
        "ls -A /etc; echo --; ls -A /d; echo --; cat /d/new",
    )
    assert seen.split("--\n") == ["kept\n", "new\n", "upper"]


def test_oci_layout_as_a_tar_and_uncompressed_layers(caller, work):
    layout = oci_layout(work / "oci", whiteout_layers(), gzip_layers=False)
    archive = work / "oci.tar"
    subprocess.run(["tar", "-C", str(layout), "-cf", str(archive), "."], check=True)
    readable(archive)
    image = sbx(caller, work, "import", str(archive), "wh-tar")
    assert image["source_format"] == "oci"
    layer = Path(image["lowerdirs"][0])
    assert sorted(os.listdir(layer / "d")) == ["new"]
    assert not (layer / "etc" / "gone").exists()


def test_docker_save_archive(caller, work):
    lower, upper = whiteout_layers()
    layout = io.BytesIO()
    manifest = json.dumps(
        [
            {
                "Config": "cfg.json",
                "RepoTags": ["wh:latest"],
                "Layers": ["l1/layer.tar", "l2/layer.tar"],
            }
        ]
    ).encode()
    with tarfile.open(fileobj=layout, mode="w") as archive:
        for name, data in [
            ("l1/layer.tar", lower),
            ("l2/layer.tar", upper),
            ("cfg.json", b"{}"),
            ("manifest.json", manifest),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    path = work / "saved.tar"
    path.write_bytes(layout.getvalue())
    readable(path)
    image = sbx(caller, work, "import", str(path), "docker")
    assert image["source_format"] == "docker"
    seen = in_overlay(caller, work, image["lowerdirs"], "ls -A /d /etc")
    assert seen.split() == ["/d:", "new", "/etc:", "kept"]


@pytest.fixture(scope="module")
def busybox_builds():
    """The busybox recipe's output, as a tarball and as a directory."""
    top = Path(tempfile.mkdtemp(prefix="sbx-rootfs-bb-"))
    for out in ("bb.tar.gz", "bb"):
        subprocess.run(
            [str(REPO / "rootfs" / "busybox.sh"), str(top / out)],
            check=True,
            capture_output=True,
        )
    yield readable(top)
    shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("form", ["bb.tar.gz", "bb"])
def test_busybox_recipe_runs_in_an_overlay_and_the_image_is_unchanged(
    caller, work, busybox_builds, form
):
    image = sbx(caller, work, "import", str(busybox_builds / form), "bb")
    assert image["source_format"] == ("directory" if form == "bb" else "tar")
    seen = in_overlay(
        caller,
        work,
        image["lowerdirs"],
        "echo written > /tmp/new && cat /tmp/new && echo x >> /etc/issue"
        " && wc -l < /etc/issue",
    )
    assert seen.split() == ["written", "2"]
    layer = Path(image["lowerdirs"][0])
    assert not (layer / "tmp" / "new").exists()
    assert (layer / "etc" / "issue").read_text().count("\n") == 1
    assert sbx(caller, work, "verify", "bb") is True


def test_identical_trees_are_stored_once_and_removed_with_the_last_image(caller, work):
    first = work / "a.tar"
    first.write_bytes(tar_of(busybox_base() + [("etc", None), ("etc/x", b"x")]))
    readable(first)
    a = sbx(caller, work, "import", str(first), "a")
    b = sbx(caller, work, "import", str(first), "b")
    assert a["layers"] == b["layers"]
    layers = work / "data" / "sbx" / "rootfs" / "layers"
    assert os.listdir(layers) == a["layers"]
    assert [i["name"] for i in sbx(caller, work, "list")] == ["a", "b"]
    sbx(caller, work, "rm", "a")
    assert os.listdir(layers) == a["layers"]
    sbx(caller, work, "rm", "b")
    assert os.listdir(layers) == [] and sbx(caller, work, "list") == []


def test_names_in_use_missing_images_and_replacing(caller, work):
    first = work / "a.tar"
    first.write_bytes(tar_of([("x", b"1")]))
    second = work / "b.tar"
    second.write_bytes(tar_of([("x", b"2")]))
    readable(work)
    a = sbx(caller, work, "import", str(first), "img")
    taken = sbx(caller, work, "import", str(second), "img")
    assert taken["kind"] == "UsageError" and "already exists" in taken["error"]
    replaced = sbx(caller, work, "import", str(second), "img", "replace")
    assert replaced["layers"] != a["layers"]
    layers = work / "data" / "sbx" / "rootfs" / "layers"
    assert os.listdir(layers) == replaced["layers"]  # the old layer was collected
    missing = sbx(caller, work, "show", "nope")
    assert (
        missing["kind"] == "UsageError" and "no image named 'nope'" in missing["error"]
    )
    assert sbx(caller, work, "rm", "nope")["kind"] == "UsageError"
    nothing = sbx(caller, work, "import", str(work / "absent.tar"), "x")
    assert "no such file" in nothing["error"]
    around = sbx(caller, work, "import", str(work), "x")  # work/data holds the store
    assert around["kind"] == "UsageError" and "store" in around["error"]


def test_concurrent_imports_of_the_same_content(caller, work):
    archive = work / "same.tar.gz"
    archive.write_bytes(tar_of(busybox_base(), mode="w"))
    readable(archive)
    env = caller.env() | {"XDG_DATA_HOME": str(work / "data"), "HOME": str(caller.home)}
    runs = [
        subprocess.Popen(
            as_caller(
                caller, [sys.executable, "-c", SCRIPT, "import", str(archive), f"c{i}"]
            ),
            env=env,
            cwd="/",
            stdout=subprocess.PIPE,
        )
        for i in range(4)
    ]
    results = [json.loads(run.communicate(timeout=120)[0]) for run in runs]
    assert len({tuple(r["layers"]) for r in results}) == 1
    store = work / "data" / "sbx" / "rootfs"
    assert len(os.listdir(store / "layers")) == 1 and os.listdir(store / "tmp") == []
    assert len(sbx(caller, work, "list")) == 4


def test_an_abandoned_work_directory_is_cleaned_by_the_next_import(caller, work):
    archive = work / "a.tar"
    archive.write_bytes(tar_of([("x", b"1")]))
    readable(archive)
    sbx(caller, work, "import", str(archive), "first")
    tmp = work / "data" / "sbx" / "rootfs" / "tmp"
    dead = subprocess.run(["true"]).returncode or 999_999  # no such pid
    (tmp / f"{dead}-abandoned").mkdir()
    os.chown(tmp / f"{dead}-abandoned", caller.uid, caller.gid)
    sbx(caller, work, "import", str(archive), "second")
    assert os.listdir(tmp) == []


# --- Debian minbase (slow) -----------------------------------------------------------


@pytest.fixture(scope="session")
def debian_tarball() -> Path:
    """The recipe's Debian bookworm minbase tarball, built at most once a week."""
    fresh = DEBIAN_TARBALL.exists() and (
        time.time() - DEBIAN_TARBALL.stat().st_mtime < DEBIAN_MAX_AGE_S
    )
    if not fresh:
        if os.geteuid() != 0:
            pytest.skip(f"debootstrap needs root and {DEBIAN_TARBALL} is not built yet")
        CACHE.mkdir(parents=True, exist_ok=True)
        CACHE.chmod(0o755)
        subprocess.run(
            [str(REPO / "rootfs" / "debian-minbase.sh"), str(DEBIAN_TARBALL)],
            check=True,
            timeout=1200,
        )
    if os.geteuid() == 0:
        DEBIAN_TARBALL.chmod(0o644)  # the unprivileged caller imports it
    if not os.access(DEBIAN_TARBALL, os.R_OK):
        pytest.skip(f"{DEBIAN_TARBALL} is not readable by this user")
    return DEBIAN_TARBALL


@pytest.mark.slow
def test_debian_minbase_runs_unprivileged_and_stays_unchanged(
    user_caller, debian_tarball
):
    caller = user_caller
    top = Path(tempfile.mkdtemp(prefix="sbx-rootfs-debian-"))
    top.chmod(0o755)
    for sub in ("data", "mnt"):
        (top / sub).mkdir()
        os.chown(top / sub, caller.uid, caller.gid)
    try:
        image = sbx(caller, top, "import", str(debian_tarball), "bookworm")
        assert image["source_format"] == "tar"
        seen = in_overlay(
            caller,
            top,
            image["lowerdirs"],
            "cat /etc/debian_version; apt-get --version | head -n 1; "
            "echo run > /written; cat /written",
        )
        version, apt, written = seen.splitlines()
        assert version.startswith("12.") and apt.startswith("apt ")
        assert written == "run"
        assert not (Path(image["lowerdirs"][0]) / "written").exists()
        # The same through sbx itself, its overlay and its sandbox.
        done = caller.run(
            ["exec", "--json", "--rootfs", "bookworm", "--", "sh", "-c",
             "cat /etc/debian_version; apt-get --version | head -n 1; echo x > /root-w"],
            extra_env={"XDG_DATA_HOME": str(top / "data")},
        )
        result = json.loads(done.stdout)
        assert result["verdict"] == "OK", result
        version, apt = result["stdout"].splitlines()
        assert version.startswith("12.") and apt.startswith("apt ")
        assert result["rootfs"]["mode"] == "overlay"
        assert not (Path(image["lowerdirs"][0]) / "root-w").exists()
        assert sbx(caller, top, "verify", "bookworm") is True
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(top)], capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


def test_removing_an_image_in_use_keeps_its_layers_until_the_run_ends(caller, work):
    archive = work / "a.tar"
    archive.write_bytes(tar_of(busybox_base()))
    readable(archive)
    sbx(caller, work, "import", str(archive), "busy")
    hold = (
        "import sys, time\n"
        "from sandbox import rootfs\n"
        "with rootfs.image_in_use('busy') as lowerdirs:\n"
        "    print(lowerdirs[0], flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    env = caller.env() | {"XDG_DATA_HOME": str(work / "data"), "HOME": str(caller.home)}
    run = subprocess.Popen(
        as_caller(caller, [sys.executable, "-c", hold]),
        env=env,
        cwd="/",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    layer = Path(run.stdout.readline().strip())
    sbx(caller, work, "rm", "busy")
    assert sbx(caller, work, "list") == []
    assert (layer / "bin" / "busybox").exists()  # the run still sees its image
    run.communicate("done\n", timeout=60)
    assert run.returncode == 0 and not layer.exists()
