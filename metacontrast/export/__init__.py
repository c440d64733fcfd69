"""Export a fine-tuned run as a self-contained MONAI Model Zoo bundle (``scripts/export_bundle.py``).

* :mod:`.bundle` -- :func:`export_bundle`: the run (MLflow run id, or checkpoint + settings) -> ``dist/<name>/``;
* :mod:`.vendor` -- which modules of this package the bundle's configs need, copied under ``scripts/``;
* :mod:`.writer` -- ``SourceHeaderNiftiWriter``, the image writer the exported inference uses;
* :mod:`.transforms` -- the exported inference's ``Spacingd`` (MONAI's, safe on MONAI Label's request dicts);
* ``templates/`` -- the exported ``inference.json``, the model card and the data-licence notes.

Submodules load on first use: a bundle vendors :mod:`.writer` and must not pull in the exporter.
"""

import importlib

_MODULES = ("bundle", "transforms", "vendor", "writer")
_EXPORTS = {"export_bundle": "bundle", "BundleSource": "bundle", "source_from_mlflow": "bundle", "source_from_checkpoint": "bundle"}


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
