"""Profiles: named, versioned sets of choices in TOML, which may extend one another.

A profile file holds top-level settings and a [limits] table:

    description = "what it is for"
    extends = "default"            # a profile name or a path; optional
    seccomp = "seccomp/strict.json"   # relative to the profile's own directory
    uid = 1000
    gid = 1000
    rootfs = "host"
    require_cgroup = false
    [env]
    KEY = "value"
    [limits]
    wall = "10s"      time = "5s"      memory = "256M"   pids = 64    cpus = 1.0
    output_limit = "16M"  fsize = "16M"  nofile = 256  tmpfs_size = "64M"

Resolving is pure; a resolved profile is cached (marshal, keyed by the files' mtimes
and sizes) so `sbx exec` does not pay for importing a TOML parser on every run.
"""

from __future__ import annotations

import marshal
import os
from collections.abc import Callable

from .errors import UsageError
from .units import parse_count, parse_seconds, parse_size

FORMAT_VERSION = 1


def _str(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{where}: expected true or false, got {value!r}")
    return value


def _id(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65534:
        raise UsageError(f"{where}: expected an id between 1 and 65533, got {value!r}")
    return value


def _cpus(value: object, where: str) -> float:
    try:
        cpus = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        cpus = 0.0
    if isinstance(value, bool) or not 0 < cpus <= 1024:
        raise UsageError(f"{where}: expected a number of CPUs such as 0.5 or 2, got {value!r}")
    return cpus


def _env(value: object, where: str) -> dict:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise UsageError(f"{where}: expected a table of string values")
    return dict(value)


def _wrap(parse: Callable) -> Callable:
    def check(value: object, where: str):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise UsageError(f"{where}: expected a string or a number, got {value!r}")
        return parse(value, where)

    return check


TOP_FIELDS: dict[str, Callable] = {
    "description": _str,
    "extends": _str,
    "seccomp": _str,
    "uid": _id,
    "gid": _id,
    "rootfs": _str,
    "require_cgroup": _bool,
    "env": _env,
}
LIMIT_FIELDS: dict[str, Callable] = {
    "wall": _wrap(parse_seconds),
    "time": _wrap(parse_seconds),
    "memory": _wrap(parse_size),
    "pids": _wrap(parse_count),
    "cpus": _cpus,
    "output_limit": _wrap(parse_size),
    "fsize": _wrap(parse_size),
    "nofile": _wrap(parse_count),
    "tmpfs_size": _wrap(parse_size),
}


def profiles_dir() -> str:
    """Where the named profiles live: $SBX_PROFILES_DIR, the checkout's profiles/,
    or the installed share/sbx/profiles. (os.path, not pathlib: this is on the path
    of every `sbx exec`, and importing pathlib costs more than the lookup.)"""
    env = os.environ.get("SBX_PROFILES_DIR")
    if env:
        return env
    package = os.path.dirname(os.path.abspath(__file__))
    here = os.path.join(os.path.dirname(package), "profiles")
    if os.path.isdir(here):
        return here
    import sys

    return os.path.join(sys.prefix, "share", "sbx", "profiles")


def user_profiles_dir() -> str:
    """Your own named profiles: $XDG_CONFIG_HOME/sbx/profiles (~/.config/...)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(
        os.path.expanduser("~"), ".config"
    )
    return os.path.join(base, "sbx", "profiles")


def _search_dirs() -> list[str]:
    return [user_profiles_dir(), profiles_dir()]


def list_profiles() -> list[str]:
    names = set()
    for directory in _search_dirs():
        if os.path.isdir(directory):
            names.update(n[: -len(".toml")] for n in os.listdir(directory) if n.endswith(".toml"))
    return sorted(names)


def find(name_or_path: str) -> str:
    if "/" in name_or_path or name_or_path.endswith(".toml"):
        path = name_or_path
    else:
        # A profile of your own shadows a built-in one of the same name.
        candidates = [os.path.join(d, f"{name_or_path}.toml") for d in _search_dirs()]
        path = next((c for c in candidates if os.path.isfile(c)), candidates[-1])
    if not os.path.isfile(path):
        known = ", ".join(list_profiles()) or "none"
        raise UsageError(
            f"no profile {name_or_path!r}: give a file path or one of: {known}"
        )
    return os.path.realpath(path)


def _unknown(source: str, field: str, allowed: list[str]) -> UsageError:
    from difflib import get_close_matches

    name = field.rpartition(".")[2]
    guess = get_close_matches(name, allowed, n=1)
    hint = f"did you mean {guess[0]!r}? " if guess else ""
    return UsageError(
        f"{source}: unknown field {field!r}; {hint}allowed: {', '.join(allowed)}"
    )


def validate(raw: dict, source: str) -> dict:
    """Check one file's fields; the error names the file and the field."""
    out: dict = {}
    for key, value in raw.items():
        if key == "limits":
            if not isinstance(value, dict):
                raise UsageError(f"{source}: limits: expected a table")
            out["limits"] = {}
            for lkey, lvalue in value.items():
                if lkey not in LIMIT_FIELDS:
                    raise _unknown(source, f"limits.{lkey}", list(LIMIT_FIELDS))
                out["limits"][lkey] = LIMIT_FIELDS[lkey](lvalue, f"{source}: limits.{lkey}")
        elif key in TOP_FIELDS:
            out[key] = TOP_FIELDS[key](value, f"{source}: {key}")
        else:
            raise _unknown(source, key, [*TOP_FIELDS, "limits"])
    return out


def _read_toml(path: str) -> dict:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror}") from None


def _load_chain(path: str, seen: tuple = ()) -> list[tuple[str, dict]]:
    if path in seen:
        raise UsageError(f"{path}: extends itself through {' -> '.join(map(str, seen))}")
    data = validate(_read_toml(path), path)
    here = os.path.dirname(path)
    if "seccomp" in data and not data["seccomp"].startswith("/"):
        data["seccomp"] = os.path.realpath(os.path.join(here, data["seccomp"]))
    chain = [(path, data)]
    if "extends" in data:
        parent = data["extends"]
        try:
            parent_path = (
                find(os.path.join(here, parent)) if parent.endswith(".toml") else find(parent)
            )
        except UsageError as e:
            raise UsageError(f"{path}: extends: {e}") from None
        chain = _load_chain(parent_path, (*seen, path)) + chain
    return chain


def _merge(chain: list[tuple[str, dict]]) -> dict:
    merged: dict = {"limits": {}, "env": {}}
    for _, data in chain:
        for key, value in data.items():
            if key in ("limits", "env"):
                merged[key].update(value)
            elif key != "extends":
                merged[key] = value
    merged["files"] = [p for p, _ in chain]
    return merged


def resolve(name_or_path: str) -> dict:
    """The fully resolved profile (parents applied), from the cache when fresh."""
    path = find(name_or_path)
    cache = _cache_path(path)
    cached = _read_cache(cache)
    if cached is not None:
        return cached
    profile = _merge(_load_chain(path))
    profile["name"] = os.path.basename(path).removesuffix(".toml")
    _write_cache(cache, profile)
    return profile


def _cache_path(path: str) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    key = path.replace("/", "%")
    return os.path.join(base, "sbx", "profiles", f"{key}.v{FORMAT_VERSION}.marshal")


def _stamp(files: list[str]) -> list:
    stamps = []
    for name in files:
        st = os.stat(name)
        stamps.append((name, st.st_mtime_ns, st.st_size))
    return stamps


def _read_cache(cache: str) -> dict | None:
    try:
        with open(cache, "rb") as f:
            stamps, profile = marshal.load(f)
        if stamps == _stamp(profile["files"]):
            return profile
    except (OSError, EOFError, ValueError, TypeError, KeyError):
        pass
    return None


def _write_cache(cache: str, profile: dict) -> None:
    try:
        os.makedirs(os.path.dirname(cache), mode=0o700, exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            marshal.dump((_stamp(profile["files"]), profile), f)
        os.replace(tmp, cache)
    except OSError:
        pass  # a cache that cannot be written only costs time
