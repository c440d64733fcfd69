"""Raw scans to batches: manifests, DICOM reading, volume transforms, the slice cache, samplers, augmentation."""

import importlib

_MODULES = ("augment", "dicom", "discovery", "errors", "manifest", "pack", "samplers", "slice_loader", "slices", "transforms", "volume_check")


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
