"""Small record classes for the `sbx exec` path, without the cost of dataclasses.

`sbx exec` is started once per graded program. On this project's machines, importing
`dataclasses` (which imports `inspect`, `ast`, `dis`, `tokenize`...) and building the
twenty classes of one run with it took about 55 ms, more than twice a bare Python
start. `record` gives the same declarations (annotated fields with defaults, `frozen`)
with one generic `__init__` instead of code generated per class:

    @record(frozen=True)
    class Limits:
        wall_timeout_s: float | None = None
        mounts: list = factory(list)

`replace(obj, **changes)` and `asdict(obj)` work as their dataclasses namesakes do.
Annotations are not evaluated (every module here uses `from __future__ import
annotations`); a field is any annotated name of the class or its bases.
"""

from __future__ import annotations

_MISSING = object()


class factory:  # noqa: N801 - reads as a default, like dataclasses.field
    """A default made fresh for each instance: `chunks: list = factory(list)`."""

    __slots__ = ("make",)

    def __init__(self, make) -> None:
        self.make = make


def _fields(cls) -> tuple[tuple[str, object], ...]:
    seen: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        for name in klass.__dict__.get("__annotations__", {}):
            if name.startswith("__") or name in ("ClassVar",):
                continue
            seen[name] = klass.__dict__.get(name, seen.get(name, _MISSING))
    return tuple(seen.items())


def record(cls=None, *, frozen: bool = False):
    def wrap(cls):
        fields = _fields(cls)
        names = tuple(name for name, _ in fields)
        defaults = dict(fields)
        cls.__record_fields__ = names

        def __init__(self, *args, **kwargs):  # noqa: N807
            if len(args) > len(names):
                raise TypeError(f"{cls.__name__} takes {len(names)} arguments")
            values = dict(zip(names, args))
            for key, value in kwargs.items():
                if key not in defaults or key in values:
                    raise TypeError(f"{cls.__name__}: bad or repeated argument {key!r}")
                values[key] = value
            for name in names:
                if name not in values:
                    default = defaults[name]
                    if default is _MISSING:
                        raise TypeError(f"{cls.__name__}: missing argument {name!r}")
                    values[name] = default.make() if isinstance(default, factory) else default
                object.__setattr__(self, name, values[name])
            post = getattr(self, "__post_init__", None)
            if post is not None:
                post()

        cls.__init__ = __init__
        cls.__repr__ = _repr
        cls.__eq__ = _eq
        if frozen:
            cls.__setattr__ = _frozen_setattr
            cls.__delattr__ = _frozen_setattr
            cls.__hash__ = _hash
        else:
            cls.__hash__ = None
        return cls

    return wrap if cls is None else wrap(cls)


def _values(obj) -> tuple:
    return tuple(getattr(obj, name) for name in obj.__record_fields__)


def _repr(self) -> str:
    parts = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__record_fields__)
    return f"{type(self).__name__}({parts})"


def _eq(self, other) -> bool:
    if type(other) is not type(self):
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self) -> int:
    return hash(_values(self))


def _frozen_setattr(self, name, value=None) -> None:
    raise AttributeError(f"{type(self).__name__} is frozen: cannot change {name!r}")


def replace(obj, **changes):
    """A copy of obj with some fields changed (like dataclasses.replace)."""
    values = {name: getattr(obj, name) for name in obj.__record_fields__}
    for key in changes:
        if key not in values:
            raise TypeError(f"{type(obj).__name__} has no field {key!r}")
    values.update(changes)
    return type(obj)(**values)


def asdict(obj) -> dict:
    """Fields as a dict, records nested in fields, lists, tuples and dicts too."""
    return {name: _plain(getattr(obj, name)) for name in obj.__record_fields__}


_ATOMS = (str, int, float, bool, bytes, type(None))


def _plain(value):
    if type(value) in _ATOMS:  # most fields: the quick answer
        return value
    if hasattr(type(value), "__record_fields__"):
        return asdict(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def is_record(obj) -> bool:
    return hasattr(type(obj), "__record_fields__")
