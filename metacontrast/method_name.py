"""The grammar of a results-grid row name: ``<bundle>[/<variant>[.<ablation>]][+<add-on>][@<recipe>]``.

``gcl/naive_sum+mean_teacher@improved`` is bundle ``gcl``, its ablation ``naive_sum``, fine-tuned with the
semi-supervised add-on ``mean_teacher`` under the fine-tune recipe ``improved``.  ``gcl/recipe.no_filter`` is
the variant ``recipe`` with the ablation ``no_filter`` applied on top: it is compared with ``gcl/recipe``.  Every module that reads
a row name (the run layout, the grid, the results tables, the pictures, the semi-supervised mode check)
splits it here; what the parts mean (config files, recipes) is :func:`metacontrast.reporting.grid.parse_method`'s
job.  It imports nothing of the package, so that every layer may read a row name.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["MethodName", "split_method_name", "with_recipe"]


class MethodName(NamedTuple):
    """The parts of a row name; a part the name leaves out is ``""``."""

    bundle: str
    variant: str
    add_on: str
    recipe: str

    @property
    def compared_with(self) -> str:
        """The row this one ablates or adds to, without recipe: ``gcl/recipe.no_filter`` -> ``gcl/recipe``;
        ``gcl/no_filter`` and ``gcl+mean_teacher`` -> ``gcl``."""
        base, dot, _ = self.variant.rpartition(".")
        return f"{self.bundle}/{base}" if dot else self.bundle

    @property
    def without_recipe(self) -> str:
        """``gcl/naive_sum+mean_teacher``: the row as the papers name it (their tables have no recipes)."""
        return (f"{self.bundle}/{self.variant}" if self.variant else self.bundle) + (f"+{self.add_on}" if self.add_on else "")


def split_method_name(name: str) -> MethodName:
    """``gcl/naive_sum+mean_teacher@improved`` -> ``MethodName("gcl", "naive_sum", "mean_teacher", "improved")``."""
    rest, _, recipe = name.partition("@")
    base, _, add_on = rest.partition("+")
    bundle, _, variant = base.partition("/")
    return MethodName(bundle, variant, add_on, recipe)


def with_recipe(name: str, recipe: str) -> str:
    """``gcl``, ``improved`` -> ``gcl@improved``; the paper recipe (``""``) leaves the name as it is."""
    return f"{name}@{recipe}" if recipe else name
