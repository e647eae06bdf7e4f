"""sandbox.record: the dataclass stand-in used on the `sbx exec` path."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sandbox.record import asdict, factory, record, replace


@record(frozen=True)
class Point:
    x: int
    y: int = 0
    tags: tuple = ()


@record
class Bag:
    name: str
    items: list = factory(list)


@record
class NamedBag(Bag):
    size: int = 3


def test_positional_keyword_and_defaults():
    assert Point(1) == Point(x=1, y=0, tags=())
    assert Point(1, 2).y == 2
    assert repr(Point(1, 2)) == "Point(x=1, y=2, tags=())"


def test_missing_extra_and_repeated_arguments_are_errors():
    with pytest.raises(TypeError, match="missing argument 'x'"):
        Point()
    with pytest.raises(TypeError, match="bad or repeated"):
        Point(1, z=3)
    with pytest.raises(TypeError, match="bad or repeated"):
        Point(1, x=2)
    with pytest.raises(TypeError, match="takes 3 arguments"):
        Point(1, 2, (), 4)


def test_frozen_records_cannot_change_and_hash_by_value():
    p = Point(1, 2)
    with pytest.raises(AttributeError, match="frozen"):
        p.x = 5
    assert hash(p) == hash(Point(1, 2)) and len({p, Point(1, 2)}) == 1


def test_factories_give_each_instance_its_own_value():
    a, b = Bag("a"), Bag("b")
    a.items.append(1)
    assert b.items == [] and a.items == [1]
    with pytest.raises(TypeError):
        hash(a)


def test_fields_are_inherited_in_order():
    bag = NamedBag("n", [1], 5)
    assert (bag.name, bag.items, bag.size) == ("n", [1], 5)
    assert NamedBag("n").size == 3


def test_replace_and_asdict():
    p = replace(Point(1, 2), y=7)
    assert p == Point(1, 7)
    with pytest.raises(TypeError, match="no field"):
        replace(p, z=1)
    assert asdict(NamedBag("n", [Point(1)])) == {
        "name": "n",
        "items": [{"x": 1, "y": 0, "tags": ()}],
        "size": 3,
    }


def test_the_exec_path_imports_neither_dataclasses_nor_inspect():
    # What sbx exec imports before it forks: the whole point of sandbox.record.
    code = (
        "import sys; import sandbox.entry, sandbox.api, sandbox.supervisor, "
        "sandbox.kernel.seccomp, sandbox.kernel.cgroups, sandbox.child; "
        "print(sorted(m for m in ('dataclasses', 'inspect', 'typing', 'pathlib', "
        "'socket', 'subprocess', 'json', 'tomllib', 'pyseccomp', 'click', 'typer') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
