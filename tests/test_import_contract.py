"""The import direction holds: service -> training_worker -> model, never back.

Each check runs in a fresh interpreter (this test process has imported everything already),
imports every submodule of a package and then looks at ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVING_STACK = ("aiokafka", "redis", "fastapi", "starlette", "uvicorn")

_PROBE = """
import importlib, json, pkgutil, sys
package = importlib.import_module({package!r})
names = sorted(m.name for m in pkgutil.walk_packages(package.__path__, {package!r} + "."))
for name in names:
    importlib.import_module(name)
loaded = sorted({{m.split(".")[0] for m in sys.modules}})
print(json.dumps({{"modules": names, "loaded": loaded}}))
"""


def _import_everything(package: str) -> dict[str, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(package=package)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model_imports() -> dict[str, list[str]]:
    return _import_everything("model")


def test_model_imports_nothing_of_the_streaming_or_serving_stack(model_imports) -> None:
    assert "oclust.model.clusterer" in model_imports["modules"]  # the probe did import the package
    assert [m for m in SERVING_STACK if m in model_imports["loaded"]] == []


def test_model_imports_neither_the_worker_nor_the_service(model_imports) -> None:
    assert {"training_worker", "service"} & set(model_imports["loaded"]) == set()


def test_training_worker_never_imports_the_service() -> None:
    found = _import_everything("training_worker")
    assert {"training_worker.store.redis_store", "training_worker.worker"} <= set(
        found["modules"]
    )
    assert "service" not in found["loaded"]
