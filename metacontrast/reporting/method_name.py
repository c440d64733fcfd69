"""The row-name grammar, under its old name: it lives in :mod:`metacontrast.method_name` (below every layer
that reads a row name).  Kept only because ``bundles/common/configs/probe.json``'s ``imports`` still name
this module; the package imports :mod:`metacontrast.method_name`."""

from __future__ import annotations

from ..method_name import MethodName, split_method_name, with_recipe

__all__ = ["MethodName", "split_method_name", "with_recipe"]
