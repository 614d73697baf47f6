"""oclust's model library: encoders, regularisers, the online clusterer, metrics, snapshots.

Example:
    >>> from model import OnlineClusterer
    >>> OnlineClusterer(n_clusters=4).regulariser
    'ca'
"""

from model import seeds as _seeds  # noqa: F401  (registers cm, aecm, ckm, drc, tcc)
from model.clusterer import OnlineClusterer, StepReport
from model.snapshot import Snapshot, SnapshotError

__all__ = ["OnlineClusterer", "Snapshot", "SnapshotError", "StepReport"]
