"""The serving side of oclust: the FastAPI replica, its snapshot loader and the CLI.

Only what the command line and the replica both need lives here, kept free of heavy imports.

Example:
    >>> installed_version("unknown")[0].isdigit() or installed_version("unknown") == "unknown"
    True
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["installed_version"]


def installed_version(fallback: str) -> str:
    """The installed oclust package's version, ``fallback`` when run from an uninstalled tree."""
    try:
        return version("oclust")
    except PackageNotFoundError:
        return fallback
