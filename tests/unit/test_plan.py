"""The pure plan layer: exact id map text, mount order, payload environment, option
parsing and its errors, size and time parsing. No syscalls, no sandbox."""

from __future__ import annotations

import pytest

from sandbox import execopts
from sandbox.errors import UsageError
from sandbox.plan import (
    HostLayout,
    Limits,
    host_root_mounts,
    make_plan,
    payload_env,
    plan_ids,
)
from sandbox.units import parse_count, parse_seconds, parse_size

# A merged-/usr host such as Debian 12.
MERGED = HostLayout(
    symlinks={
        "bin": "usr/bin",
        "sbin": "usr/sbin",
        "lib": "usr/lib",
        "lib64": "usr/lib64",
    },
    dirs=frozenset({"usr"}),
    etc=frozenset({"ld.so.cache", "nsswitch.conf", "ssl", "python3.11"}),
)
# An older host with a separate /bin and /lib.
SPLIT = HostLayout(
    symlinks={},
    dirs=frozenset({"usr", "bin", "lib", "lib64"}),
    etc=frozenset({"ld.so.cache"}),
)


# --- id maps


def test_unprivileged_caller_maps_payload_uid_to_itself():
    ids = plan_ids(1001, 1002)
    assert ids.uid_map_text == "1000 1001 1\n"
    assert ids.gid_map_text == "1000 1002 1\n"
    assert (ids.uid, ids.gid, ids.use_helpers) == (1000, 1000, False)


def test_root_caller_maps_payload_to_nobody_never_to_root():
    ids = plan_ids(0, 0)
    assert ids.uid_map_text == "1000 65534 1\n"
    assert ids.gid_map_text == "1000 65534 1\n"
    assert ids.switch_to == (65534, 65534)
    assert ids.use_helpers is False


def test_root_caller_with_a_subordinate_range_takes_the_payload_id_from_it():
    ids = plan_ids(0, 0, subuid=(100000, 65536), subgid=(200000, 65536))
    assert ids.uid_map_text == "1000 101000 1\n"
    assert ids.gid_map_text == "1000 201000 1\n"
    assert ids.switch_to == (101000, 201000) and ids.use_helpers is False


def test_root_caller_with_too_small_a_range_runs_the_payload_as_nobody():
    ids = plan_ids(0, 0, subuid=(100000, 100), subgid=(100000, 100))
    assert ids.uid_map_text == "1000 65534 1\n"


def test_chosen_ids_inside():
    ids = plan_ids(1001, 1001, uid=1234, gid=2345)
    assert ids.uid_map_text == "1234 1001 1\n"
    assert ids.gid_map_text == "2345 1001 1\n"
    assert plan_ids(0, 0, uid=7, gid=8).uid_map_text == "7 65534 1\n"


def test_subordinate_range_for_unprivileged_caller_uses_helpers():
    """Inside root (sbx's init) is the range's first id; the payload stays the caller,
    so what it writes to --dir is the caller's."""
    ids = plan_ids(1001, 1002, subuid=(100000, 65536), subgid=(200000, 65536))
    assert ids.uid_map_text == "0 100000 1\n1000 1001 1\n"
    assert ids.gid_map_text == "0 200000 1\n1000 1002 1\n"
    assert ids.use_helpers is True and ids.switch_to is None
    assert (ids.uid, ids.gid) == (1000, 1000)


def test_subordinate_range_never_maps_host_root():
    for caller in ((1001, 1001), (0, 0)):
        ids = plan_ids(*caller, subuid=(100000, 65536), subgid=(100000, 65536))
        for m in ids.uid_map + ids.gid_map:
            assert m.outside != 0, (caller, m)


# --- mounts


def _steps(mounts) -> list[tuple[str, str]]:
    return [(m.kind, m.target) for m in mounts]


def test_host_root_mount_order_on_a_merged_usr_host():
    ids = plan_ids(1001, 1001)
    mounts = host_root_mounts(MERGED, Limits(), ids, None)
    assert _steps(mounts) == [
        ("root-tmpfs", "/"),
        ("bind", "/usr"),
        ("symlink", "/bin"),
        ("symlink", "/sbin"),
        ("symlink", "/lib"),
        ("symlink", "/lib64"),
        ("dir", "/etc"),
        ("bind", "/etc/ld.so.cache"),
        ("bind", "/etc/nsswitch.conf"),
        ("bind", "/etc/ssl"),
        ("bind", "/etc/python3.11"),
        ("file", "/etc/passwd"),
        ("file", "/etc/group"),
        ("file", "/etc/hostname"),
        ("file", "/etc/hosts"),
        ("tmpfs", "/dev"),
        ("bind", "/dev/null"),
        ("bind", "/dev/zero"),
        ("bind", "/dev/full"),
        ("bind", "/dev/random"),
        ("bind", "/dev/urandom"),
        ("symlink", "/dev/fd"),
        ("symlink", "/dev/stdin"),
        ("symlink", "/dev/stdout"),
        ("symlink", "/dev/stderr"),
        ("tmpfs", "/dev/shm"),
        ("proc", "/proc"),
        ("tmpfs", "/tmp"),
        ("tmpfs", "/box"),
    ]
    links = {m.target: m.source for m in mounts if m.kind == "symlink"}
    assert links["/bin"] == "usr/bin" and links["/dev/fd"] == "/proc/self/fd"


def test_host_root_on_a_split_usr_host_binds_each_directory():
    mounts = host_root_mounts(SPLIT, Limits(), plan_ids(0, 0), None)
    binds = [m.target for m in mounts if m.kind == "bind" and m.source == m.target]
    assert binds[:4] == ["/usr", "/bin", "/lib", "/lib64"]


def test_host_binds_are_read_only_except_box_and_device_nodes():
    mounts = host_root_mounts(MERGED, Limits(), plan_ids(1001, 1001), "/srv/work")
    for m in mounts:
        if m.kind != "bind":
            continue
        if m.target == "/box" or m.target.startswith("/dev/"):
            assert m.readonly is False, m
        else:
            assert m.readonly is True, m
    assert [m for m in mounts if m.devices] == [
        m for m in mounts if m.kind == "bind" and m.target.startswith("/dev/")
    ]
    box = mounts[-1]
    assert (box.kind, box.target, box.source) == ("bind", "/box", "/srv/work")


def test_scratch_tmpfs_sizes_and_owner_come_from_the_plan():
    ids = plan_ids(1001, 1001, uid=1500, gid=1600)
    limits = Limits(tmpfs_size_bytes=8 << 20, tmpfs_inodes=100)
    by_target = {m.target: m for m in host_root_mounts(MERGED, limits, ids, None)}
    for target in ("/tmp", "/box", "/dev/shm"):
        assert (by_target[target].size_bytes, by_target[target].inodes) == (
            8 << 20,
            100,
        )
    assert by_target["/tmp"].mode == 0o1777
    assert by_target["/box"].owner == (1500, 1600)


def test_passwd_names_the_payload_uid():
    ids = plan_ids(1001, 1001, uid=1500, gid=1600)
    files = {m.target: m.data for m in host_root_mounts(MERGED, Limits(), ids, None)}
    assert "sbx:x:1500:1600:" in files["/etc/passwd"]
    assert "sbx:x:1600:" in files["/etc/group"]
    assert files["/etc/hostname"] == "sbx\n"


def test_make_plan_joins_profile_and_options():
    options = {"wall": 2.5, "memory": 64 << 20, "dir": "rel/dir", "env": [("A", "1")]}
    profile = {"name": "p", "limits": {"wall": 10.0, "pids": 32}, "env": {"B": "2"}}
    plan = make_plan(profile, options, ["true"], (1001, 1001), MERGED)
    assert plan.limits.wall_timeout_s == 2.5  # the option wins
    assert plan.limits.pids_max == 32  # the profile fills in
    assert plan.limits.memory_max_bytes == 64 << 20
    assert plan.box_dir is not None and plan.box_dir.startswith("/")
    env = dict(plan.env)
    assert env["A"] == "1" and env["B"] == "2"
    assert plan.argv == ("true",) and plan.cwd == "/box" and plan.hostname == "sbx"


# --- environment


def test_payload_env_is_exactly_the_clean_set():
    assert dict(payload_env()) == {
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
        "HOME": "/box",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "USER": "sbx",
        "LOGNAME": "sbx",
        "HOSTNAME": "sbx",
    }


def test_env_option_adds_and_overrides():
    env = dict(payload_env((("FOO", "bar"), ("PATH", "/opt/bin"))))
    assert env["FOO"] == "bar" and env["PATH"] == "/opt/bin"


# --- option parsing


def test_parse_splits_options_from_command():
    options, command = execopts.parse(
        [
            "--wall",
            "2",
            "--time=500ms",
            "--env",
            "A=b=c",
            "--json",
            "--",
            "ls",
            "--wall",
        ]
    )
    assert command == ["ls", "--wall"]
    assert options["wall"] == 2.0 and options["time"] == 0.5
    assert options["env"] == [("A", "b=c")] and options["json"] is True


def test_parse_stops_at_the_first_non_option():
    options, command = execopts.parse(["--memory", "1G", "python3", "-c", "pass"])
    assert options["memory"] == 1 << 30
    assert command == ["python3", "-c", "pass"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no command given"),
        (["--"], "no command given"),
        (["--json"], "no command given"),
        (["--bogus", "--", "x"], "unknown option '--bogus'"),
        (["--wall"], "--wall needs a value"),
        (["--json=1", "--", "x"], "--json takes no value"),
        (["--wall", "soon", "--", "x"], "bad --wall 'soon'"),
        (["--memory", "-5M", "--", "x"], "bad --memory"),
        (["--uid", "0", "--", "x"], "bad --uid '0'"),
        (["--uid", "65534", "--", "x"], "between 1 and 65533"),
        (["--gid", "abc", "--", "x"], "bad --gid 'abc'"),
        (["--env", "NOVALUE", "--", "x"], "use KEY=VALUE"),
        (["--env", "=v", "--", "x"], "use KEY=VALUE"),
        (["--cpus", "0", "--", "x"], "bad --cpus"),
        (["--pids", "many", "--", "x"], "bad --pids"),
    ],
)
def test_parse_errors_are_one_line_usage_errors(args, message):
    with pytest.raises(UsageError) as caught:
        execopts.parse(args)
    text = str(caught.value)
    assert message in text and "\n" not in text
    assert caught.value.exit_code == 2


def test_help_option():
    options, command = execopts.parse(["--wall", "1", "--help", "--bogus"])
    assert options["help"] is True and command == []


# --- sizes and times


@pytest.mark.parametrize(
    ("text", "size_bytes"),
    [
        ("0", 0),
        ("123", 123),
        ("1b", 1),
        ("64M", 64 << 20),
        ("64m", 64 << 20),
        ("1.5K", 1536),
        ("2KiB", 2048),
        ("1KB", 1000),
        ("3MB", 3_000_000),
        ("1G", 1 << 30),
        ("1GB", 10**9),
        ("1T", 1 << 40),
        (" 8M ", 8 << 20),
        (4096, 4096),
    ],
)
def test_parse_size(text, size_bytes):
    assert parse_size(text) == size_bytes


@pytest.mark.parametrize(
    "text", ["", "M", "12Q", "-1", "-1M", "nan", "1.2.3M", "ten", -5]
)
def test_parse_size_rejects(text):
    with pytest.raises(UsageError, match="bad size|must not be negative"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1", 1.0),
        ("2.5", 2.5),
        ("500ms", 0.5),
        ("3s", 3.0),
        ("2m", 120.0),
        ("1min", 60.0),
        ("1h", 3600.0),
        (0.25, 0.25),
        (2, 2.0),
    ],
)
def test_parse_seconds(text, seconds):
    assert parse_seconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["0", "-1", "", "abc", "1d", "inf", "nan", "0ms", 0, -2.0]
)
def test_parse_seconds_rejects(text):
    with pytest.raises(UsageError, match="positive number of seconds"):
        parse_seconds(text)


@pytest.mark.parametrize("text", ["0", "-3", "1.5", "x", ""])
def test_parse_count_rejects(text):
    with pytest.raises(UsageError, match="positive whole number"):
        parse_count(text, "--pids")


def test_parse_count():
    assert parse_count("64", "--pids") == 64 and parse_count(7, "--nofile") == 7


def test_box_files_are_plain_relative_paths_given_once():
    from sandbox.plan import check_box_files

    assert check_box_files({"a.py": "x", "d/e.bin": b"\0"}) == (
        ("a.py", b"x"),
        ("d/e.bin", b"\0"),
    )
    assert check_box_files([("a", b"1")]) == (("a", b"1"),)
    for bad in ("", "/abs", "../up", "a/../b", "./a", "a//b", "a/"):
        with pytest.raises(UsageError, match="plain relative path"):
            check_box_files({bad: b""})
    with pytest.raises(UsageError, match="would also be the directory"):
        check_box_files({"a": b"", "a/b": b""})
    with pytest.raises(UsageError, match="given twice"):
        check_box_files([("a", b""), ("a", b"")])
    with pytest.raises(UsageError, match="mapping"):
        check_box_files(["a"])
    with pytest.raises(UsageError, match="bytes or str"):
        check_box_files({"a": 3})


def test_box_files_must_fit_the_tmpfs_in_pages_and_inodes():
    from sandbox.plan import check_box_fits

    limits = Limits(tmpfs_size_bytes=1 << 20, tmpfs_inodes=100)
    check_box_fits((("a", b"x" * (1 << 19)),), limits)
    # 300 one-byte files take 300 pages: more than 1 MiB.
    with pytest.raises(UsageError, match="do not fit"):
        check_box_fits(tuple((f"f{n}", b"x") for n in range(300)), limits)
    with pytest.raises(UsageError, match="100 inodes"):
        check_box_fits(tuple((f"d/f{n}", b"") for n in range(99)), limits)


def test_nul_bytes_are_refused_in_commands_and_file_names():
    from sandbox.api import check_argv
    from sandbox.plan import check_box_files

    with pytest.raises(UsageError, match="without NUL"):
        check_argv(["echo", "a\0b"])
    with pytest.raises(UsageError, match="plain relative path"):
        check_box_files({"x\0y": b""})
