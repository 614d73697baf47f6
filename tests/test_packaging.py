"""The wheel installs one import name, ``oclust``, with the three parts mapped beneath it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("model", "training_worker", "service")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # built from a copy of the tracked sources: a build in the checkout would leave a build/
    # whose stale modules a later wheel could pick up
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    tracked = subprocess.run(["git", "ls-files", "pyproject.toml", "README.md", "LICENSE",
                              "oclust", *PARTS], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout.split()
    for name in tracked:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(src)],
                   check=True, capture_output=True, timeout=240)
    (built,) = out.glob("oclust-*.whl")
    return built


def test_the_wheel_installs_only_the_oclust_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"oclust"}
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["oclust"]
    # every source file of the three folders is in the wheel, under oclust/
    expected = {f"oclust/{p.relative_to(ROOT)}" for part in PARTS
                for p in (ROOT / part).rglob("*.py")}
    assert expected <= set(names)
    assert "oclust/service/static/index.html" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "oclust = oclust.service.cli:app" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_wheel_imports_from_its_own_tree(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, timeout=240)
    probe = (
        "import importlib.util, json, oclust, oclust.model.inference, oclust.service.cli\n"
        "print(json.dumps({'path': list(oclust.__path__), 'model': oclust.model.__file__,"
        " 'bare': [n for n in ('model', 'service', 'training_worker')"
        " if importlib.util.find_spec(n)]}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(site), "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["path"] == [str(site / "oclust")]  # no search of a source checkout
    assert found["model"] == str(site / "oclust" / "model" / "__init__.py")
    assert found["bare"] == []
