"""Import stand-in for ``pydicom_seg`` in a MONAI Label server process (see ../README.md): pydicom-seg 0.4.1
cannot import with pydicom 3.  Any attribute use (DICOM-SEG output) raises."""

from typing import NoReturn


def __getattr__(name: str) -> NoReturn:
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError(
        f"pydicom_seg.{name}: pydicom_seg is a stand-in (metacontrast/export/monailabel_standins); pydicom-seg 0.4.1 "
        "does not import with pydicom 3, so MONAI Label's DICOM-SEG output is unavailable in this environment"
    )
