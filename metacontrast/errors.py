"""Error types shared by the layers of the package (engines, semi-supervised modes, workflows).

Kept in a module that imports nothing of the package, so that any layer may raise them without importing
a layer above it.  (Errors of raw data entering a manifest are in :mod:`metacontrast.data.errors`.)
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A workflow setting that cannot work, reported before any training starts."""
