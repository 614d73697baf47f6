"""oclust's model library: encoders, regularisers, the online clusterer, metrics, snapshots.

The heavy names (the clusterer, hence torch) are imported on first use (PEP 562), so that
``import oclust.model.inference`` or ``import oclust.model.snapshot`` stays light: a replica serving an MLP
snapshot never imports torch.

Example:
    >>> from oclust.model import OnlineClusterer
    >>> OnlineClusterer(n_clusters=4).regulariser
    'ca'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oclust.model.clusterer import OnlineClusterer, StepReport
    from oclust.model.snapshot import Snapshot, SnapshotError

__all__ = ["OnlineClusterer", "Snapshot", "SnapshotError", "StepReport"]

_LAZY = {
    "OnlineClusterer": "oclust.model.clusterer",
    "StepReport": "oclust.model.clusterer",
    "Snapshot": "oclust.model.snapshot",
    "SnapshotError": "oclust.model.snapshot",
}


def __getattr__(name: str) -> Any:
    """Import ``OnlineClusterer`` & co. on first access."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
