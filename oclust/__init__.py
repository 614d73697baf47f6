"""oclust: streaming online deep clustering, under one import namespace.

The three parts are subpackages, each one top-level folder of the source tree:

| import | folder | what |
| --- | --- | --- |
| ``oclust.model`` | ``model/`` | the library: encoders, regularisers, the clusterer, snapshots |
| ``oclust.training_worker`` | ``training_worker/`` | Kafka in, online training, snapshots out |
| ``oclust.service`` | ``service/`` | the FastAPI replica, its snapshot loader and the CLI |

An installed wheel holds them under ``oclust/`` (``package-dir`` in pyproject.toml maps the
folders there), so the only top-level name it installs is ``oclust``. In a source checkout the
folders stay at the top, and this package searches the checkout's root for its subpackages.

Example:
    >>> import oclust.model
    >>> oclust.model.__name__
    'oclust.model'
"""

from __future__ import annotations

from pathlib import Path

_here = Path(__file__).resolve().parent
if not (_here / "model").is_dir() and (_here.parent / "model" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # a source checkout: model/, service/... beside oclust/
