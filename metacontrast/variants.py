"""What a bundle says about its rows: the variants in ``bundles/<bundle>/configs/ablations.json``, the
pre-training a row fine-tunes from, and the papers' row it is set beside.

A variant entry holds the overrides of the stages it changes (``"pretrain"``, ``"finetune"``) and, when it
keeps every component of the paper's method and changes only how it is optimised (normalisation, warm-up,
clipping, loss weights), ``"paper_row"``: the papers' row it is read against (``"gcl"``).  A variant that
removes a component declares none and is read against the paper's ablation of the same name, if any.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import REPO_ROOT
from .method_name import split_method_name

__all__ = ["RANDOM", "bundle_variants", "paper_row", "pretraining", "row_variants", "variants_file"]

#: the bundle name of the rows without pre-training (random initialisation of the network they name), which
#: are read against the papers' random init
RANDOM = "random"


def variants_file(bundle: str) -> Path:
    """``bundles/<bundle>/configs/ablations.json``."""
    return REPO_ROOT / "bundles" / bundle / "configs" / "ablations.json"


def bundle_variants(bundle: str) -> dict[str, dict[str, Any]]:
    """The bundle's variants by name (``{}`` when it has no ``ablations.json``); ``_doc_`` and other
    ``_``-keys left out."""
    path = variants_file(bundle)
    rows = json.loads(path.read_text()) if path.is_file() else {}
    return {name: entry for name, entry in rows.items() if not name.startswith("_")}


def row_variants(method: str) -> list[tuple[str, dict[str, Any]]]:
    """``(part, entry)`` of each variant part of a row, in order (``gcl/recipe.no_filter`` -> ``recipe``, then
    ``no_filter``); ``[]`` without a variant.  A part the bundle does not define is refused, naming its file."""
    name = split_method_name(method)
    if not name.variant:
        return []
    variants, found = bundle_variants(name.bundle), []
    for part in name.variant.split("."):
        if part not in variants:
            raise ValueError(f"method {method!r}: {variants_file(name.bundle)} defines no variant {part!r} (has {sorted(variants)})")
        found.append((part, variants[part]))
    return found


def pretraining(method: str) -> str | None:
    """The name a row's pre-training runs and is tagged under (``None``: random init): the bundle and the
    variant parts that change the pre-training, in order.  ``gcl/naive_sum`` for ``gcl/naive_sum+mixup@improved``,
    ``gcl`` for ``gcl/frozen_encoder`` (fine-tune only) and ``gcl+mean_teacher``, ``gcl/recipe`` for
    ``gcl/recipe.frozen_encoder`` (:func:`row_variants`).
    """
    bundle = split_method_name(method).bundle
    if bundle == RANDOM:
        return None
    kept = [part for part, entry in row_variants(method) if entry.get("pretrain")]
    return f"{bundle}/{'.'.join(kept)}" if kept else bundle


def paper_row(method: str) -> str:
    """The papers' name of a grid row, for their tables (recipe dropped, add-on kept):

    * ``random/batch_norm@improved`` -> ``random``;
    * ``gcl/recipe@improved`` -> the ``paper_row`` that ``recipe`` declares (``gcl``), else ``gcl/recipe``;
    * ``gcl/recipe.no_filter@improved`` -> ``gcl/no_filter`` (the last part decides, as above);
    * ``gcl+mean_teacher@improved`` -> ``gcl+mean_teacher``.
    """
    name = split_method_name(method)
    add_on = f"+{name.add_on}" if name.add_on else ""
    if name.bundle == RANDOM:
        return RANDOM + add_on
    last = name.variant.rpartition(".")[2]
    if not last:
        return name.bundle + add_on
    declared = bundle_variants(name.bundle).get(last, {}).get("paper_row")
    return (declared or f"{name.bundle}/{last}") + add_on
