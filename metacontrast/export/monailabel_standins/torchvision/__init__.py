"""Import stand-in for ``torchvision`` in a MONAI Label server process (see ../README.md): no CPU build of
torchvision for torch 2.13.0 is on the package index.  Only ``torchvision.utils`` names exist; they raise."""

__version__ = "0+monailabel.standin"
