"""``make_grid`` / ``save_image`` as names for ``monailabel.transform.post`` to import; calling them raises."""

from typing import Any, NoReturn

REASON = (
    "torchvision.{} is a stand-in (metacontrast/export/monailabel_standins): torchvision is not installed "
    "beside the CPU torch; install a torchvision build matching torch to use MONAI Label's 2D image outputs"
)


def make_grid(*args: Any, **kwargs: Any) -> NoReturn:
    raise RuntimeError(REASON.format("utils.make_grid"))


def save_image(*args: Any, **kwargs: Any) -> NoReturn:
    raise RuntimeError(REASON.format("utils.save_image"))
