"""The package's own error as the last line a failed run prints.

A bad input is reported by the package with an error that names the file and what is wrong, but a bundle run
(``python -m monai.bundle run ...``) raises it inside MONAI's config resolution, which wraps it::

    FileNotFoundError: /data/ACDC/training/patient002/... does not exist       <- ours, printed first
    The above exception was the direct cause of the following exception:
    ...
    RuntimeError: Failed to instantiate component 'metacontrast.workflows.PretrainData' with keywords: ...

(``monai.utils.module.instantiate`` and ``ConfigExpression.evaluate`` re-raise every error as a ``RuntimeError``
``from`` it, and MONAI has no setting to leave it alone.)  :func:`install`, called when ``metacontrast`` is imported
(every workflow config imports it), puts a ``sys.excepthook`` in front of the one in place: it prints the
traceback exactly as before, then, when the exception that ends the program was not raised by the package but one
in its cause chain was, repeats the innermost such one as a last ``error: <type>: <message>`` line.  Anything else
(an error of the package itself, ``KeyboardInterrupt``, an error with no package error behind it) is printed as
before, with nothing added.  An exception counts as the package's when its type is defined in the package or the
frame that raised it is in a module of the package.  Imports nothing of the package.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from types import TracebackType

__all__ = ["install", "package_error", "raised_by_package"]

PACKAGE = __name__.partition(".")[0]
PACKAGE_DIR = Path(__file__).resolve().parent
#: attribute that marks an installed hook, so a second import (a reload, an exported bundle's copy) adds none
MARK = "repeats_package_error"


def cause_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions behind it (``__cause__``, else ``__context__`` unless suppressed), outermost
    first; each exception once, so a chain that loops ends."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ if current.__cause__ is not None else (None if current.__suppress_context__ else current.__context__)
    return chain


def raised_by_package(error: BaseException) -> bool:
    """Whether ``error``'s type is defined in the package or the frame that raised it is in a package module."""
    if type(error).__module__.partition(".")[0] == PACKAGE:
        return True
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)
    except (OSError, ValueError):
        return False


def package_error(error: BaseException) -> BaseException | None:
    """The innermost exception behind ``error`` that the package raised, when ``error`` itself is not the
    package's (then the printed traceback already ends with it); ``None`` otherwise."""
    chain = cause_chain(error)
    if not isinstance(error, Exception) or raised_by_package(error):
        return None
    ours = [e for e in chain[1:] if raised_by_package(e)]
    return ours[-1] if ours else None


def last_line(error: BaseException) -> str:
    """``error: <type>: <message>`` (the message's further lines, and any notes, follow)."""
    return "error: " + "".join(traceback.format_exception_only(type(error), error)).rstrip()


def install() -> None:
    """Put the hook described above in front of ``sys.excepthook`` (once per process)."""
    previous = sys.excepthook
    if getattr(previous, MARK, False):
        return

    def excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        previous(kind, error, tb)
        try:
            ours = package_error(error)
            if ours is not None:
                print(last_line(ours), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - the hook must never hide the traceback it follows
            pass

    setattr(excepthook, MARK, True)
    sys.excepthook = excepthook
