"""Export a fine-tuned run as a self-contained MONAI Model Zoo bundle (``scripts/export_bundle.py``).

* :mod:`.bundle` -- :func:`export_bundle`: the run -> ``dist/<name>/``, written with one :class:`ExportOptions`;
* :mod:`.source` -- the run: an MLflow fine-tune run (read through :mod:`metacontrast.tracking`) or a
  checkpoint with its settings;
* :mod:`.configs` -- the bundle's train / evaluate / inference configs, derived from the shared workflows;
* :mod:`.card` -- ``metadata.json`` and the model card;
* :mod:`.verify` -- the Zoo's checks and ours on the written bundle;
* :mod:`.vendor` -- which modules of this package the bundle's configs need, copied under ``scripts/``;
* :mod:`.writer` -- ``SourceHeaderNiftiWriter``, the image writer the exported inference uses;
* :mod:`.transforms` -- the exported inference's ``Spacingd`` (MONAI's, safe on MONAI Label's request dicts);
* ``templates/`` -- the exported ``inference.json``, the model card and the data-licence notes.

Submodules load on first use: a bundle vendors :mod:`.writer` and must not pull in the exporter.
"""

import importlib

_MODULES = ("bundle", "card", "configs", "source", "transforms", "vendor", "verify", "writer")
_EXPORTS = {"export_bundle": "bundle", "ExportOptions": "bundle", "BundleSource": "source", "source_from_mlflow": "source",
            "source_from_checkpoint": "source"}  # fmt: skip


class ExportError(RuntimeError):
    """The run cannot be exported as asked, or the exported bundle failed a check."""


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
