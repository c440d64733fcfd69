"""Raw scans to batches: manifests, DICOM reading, volume transforms, the slice cache, samplers, augmentation."""

from . import augment, dicom, manifest, samplers, slices, transforms  # noqa: F401
