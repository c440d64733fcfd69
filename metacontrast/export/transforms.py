"""Transforms of the exported ``inference.json`` that keep it servable by MONAI Label.

MONAI Label (0.8.5) runs a bundle's ``preprocessing`` on a request dictionary that also holds the image's
path as a string under ``image_path``.  MONAI 1.6's ``Spacingd`` copies the resampled image's metadata
into every ``<key>_*`` entry of the dictionary, assuming each is a metadata dict, and fails on that string
(``AttributeError: 'str' object has no attribute 'update'``).  :class:`Spacingd` here is MONAI's, applied
to the same data with the same result (and the same inverse for ``Invertd``), but it leaves entries that
are not mappings alone.  Like :mod:`.writer`, this module needs only MONAI: it is vendored into the bundle.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import Spacingd as MonaiSpacingd

__all__ = ["Spacingd"]


class Spacingd(MonaiSpacingd):
    """``monai.transforms.Spacingd`` that ignores non-mapping ``<key>_*`` siblings (e.g. MONAI Label's ``image_path``)."""

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        prefixes = tuple(f"{key}_" for key in self.keys)
        aside = {k: v for k, v in data.items() if isinstance(k, str) and k.startswith(prefixes) and not isinstance(v, Mapping)}
        out = super().__call__({k: v for k, v in data.items() if k not in aside}, lazy=lazy)
        out.update(aside)
        return out
