"""A MONAI image writer that saves a label map with its source NIfTI's header.

``SaveImaged(..., writer=SourceHeaderNiftiWriter)`` in an exported bundle's ``inference.json`` writes each
prediction so that every tool reads it where it reads the source image.  Written by hand because MONAI's
``NibabelWriter`` always writes the affine MONAI resolved on reading as both sform and qform: where a
file's sform and its pixdim disagree (ACDC's headers do: sform 1 mm, pixdim 1.5625 mm), that affine is not
the one nibabel, ITK-SNAP or 3D Slicer read from the source, and the label map would sit elsewhere.
The same rule as the evaluate workflow's ``save_prediction`` (``metacontrast.workflows.evaluate``): a
NIfTI source lends its header and affine; anything else (a DICOM series) gets MONAI's affine.
This module needs only MONAI, nibabel and numpy, so serving a bundle does not pull in the training code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import NibabelWriter

__all__ = ["SourceHeaderNiftiWriter"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class SourceHeaderNiftiWriter(NibabelWriter):
    """``NibabelWriter`` that, for a NIfTI source of the same shape, writes with the source's header.

    The source is ``meta_dict["filename_or_obj"]`` (``LoadImaged`` sets it; ``Invertd`` carries it to the
    prediction).  Use it on data already on the source grid (``SaveImaged(resample=False)`` after ``Invertd``).
    The output data type is ``output_dtype`` (``SaveImaged(output_dtype=numpy.uint8)`` for label maps).
    """

    def set_metadata(self, meta_dict: Any, resample: bool = True, **options: Any) -> None:
        source = (meta_dict or {}).get("filename_or_obj")
        self.source = Path(str(source)) if source else None
        super().set_metadata(meta_dict, resample=resample, **options)

    def _source_image(self) -> nib.Nifti1Image | None:
        source = getattr(self, "source", None)
        if source is None or not source.name.endswith(NIFTI_SUFFIXES) or not source.is_file():
            return None
        image = nib.load(source)
        data_shape = tuple(np.shape(self.data_obj))
        return image if tuple(image.shape[: len(data_shape)]) == data_shape and len(image.shape) == len(data_shape) else None

    def write(self, filename: Any, verbose: bool = False, **obj_kwargs: Any) -> None:
        source = self._source_image()
        if source is None:
            super().write(filename, verbose=verbose, **obj_kwargs)
            return
        dtype = np.dtype(self.output_dtype or np.float32)
        data = np.asarray(self.data_obj)
        if np.issubdtype(dtype, np.integer):
            data = np.rint(data)
        image = nib.Nifti1Image(data.astype(dtype), source.affine, header=source.header.copy())
        image.set_data_dtype(dtype)
        Path(filename).parent.mkdir(parents=True, exist_ok=True)
        nib.save(image, filename)
