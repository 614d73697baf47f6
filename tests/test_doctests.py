"""Every docstring example of the ``oclust`` package runs and shows what it claims.

The examples are collected by import name (``oclust.model.clusterer``) rather than by file path,
so each module is imported once, under the name the installed package gives it.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import io
import pkgutil
from pathlib import Path

import pytest

PARTS = ("oclust.model", "oclust.training_worker", "oclust.service")


def _modules_with_examples() -> list[str]:
    """Import names of the modules whose source holds a ``>>>`` example (no module is imported)."""
    names = ["oclust", *PARTS]
    for part in PARTS:
        names += [m.name for m in pkgutil.walk_packages(importlib.import_module(part).__path__,
                                                          part + ".")]
    return sorted(name for name in names if ">>> " in _source(name))


def _source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, name
    return Path(spec.origin).read_text(encoding="utf-8")


MODULES = _modules_with_examples()


def test_the_package_has_examples_in_every_part() -> None:
    assert {name.split(".")[1] for name in MODULES if "." in name} == {
        "model", "training_worker", "service"
    }
    assert len(MODULES) > 30


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder().find(module, name) if t.examples]
    assert tests, f"{name} has no runnable example"
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, out.getvalue()
