"""Vendoring: copy the part of this package that an exported bundle's configs use into ``<bundle>/scripts/``.

A Model Zoo bundle carries its own code under ``scripts/`` and its configs import it as
``scripts.<module>`` (the bundle root is the working directory, or on ``sys.path`` where MONAI Label
loads it), so the bundle runs without this repository installed.  What is copied is decided from the
configs themselves, never from a hand-kept list, so it follows the code as it changes:

1. every dotted name ``metacontrast.a.b.C`` in the configs is resolved to the longest prefix that is a
   module of this package (``metacontrast.a.b``);
2. the import closure of those modules is taken from their source (``ast``: absolute and relative
   imports at any depth, including imports inside functions, and ``from pkg import submodule``),
   together with the ``__init__.py`` of every package on the way, since importing ``a.b`` runs
   ``a/__init__.py``;
3. each file is copied to the same relative place under ``scripts/`` with ``metacontrast`` rewritten to
   ``scripts`` in its import statements (in the configs: in dotted names and imports), and a header
   naming its origin.

:func:`third_party_imports` lists the distributions the vendored code imports, for the bundle's
``required_packages_version``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import logging
import re
import sys
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "metacontrast"
VENDOR_PACKAGE = "scripts"
PACKAGE_DIR = Path(__file__).resolve().parents[1]

_DOTTED = re.compile(rf"\b{PACKAGE}(?:\.[A-Za-z_]\w*)+")
#: the package name where it names code: ``metacontrast.x``, ``import metacontrast``, ``from metacontrast import``
_CODE_NAME = re.compile(rf"\b{PACKAGE}(?=\.[A-Za-z_])|(?<=\bimport ){PACKAGE}\b|(?<=\bfrom ){PACKAGE}\b")


#: an import statement of the package (at any indentation): ``from metacontrast.x import``, ``import metacontrast``
_IMPORT_LINE = re.compile(rf"^(\s*(?:from|import)\s+){PACKAGE}\b", re.MULTILINE)


class VendoringError(RuntimeError):
    """The configs name code that cannot be vendored, or the vendored copy still needs this repository."""


def _module_file(module: str) -> Path | None:
    """``metacontrast.a.b`` -> its ``.py`` file (``a/b.py`` or ``a/b/__init__.py``), or ``None``."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_package(module: str) -> bool:
    file = _module_file(module)
    return file is not None and file.name == "__init__.py"


def resolve_module(dotted: str) -> str:
    """The longest prefix of ``dotted`` that is a module of this package (``a.b.Class.attr`` -> ``a.b``)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if _module_file(".".join(parts[:end])) is not None:
            return ".".join(parts[:end])
    raise VendoringError(f"{dotted!r} names nothing in the {PACKAGE} package")


def config_references(configs: Iterable[object]) -> set[str]:
    """Every ``metacontrast.x.y`` dotted name in the (nested) string values of ``configs``."""
    found: set[str] = set()

    def visit(value: object) -> None:
        if isinstance(value, str):
            found.update(_DOTTED.findall(value))
            if re.search(rf"\bimport {PACKAGE}\b", value):
                found.add(PACKAGE)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    for config in configs:
        visit(config)
    return found


def _imported_modules(module: str) -> set[str]:
    """Modules of this package that ``module``'s source imports (anywhere in the file)."""
    file = _module_file(module)
    assert file is not None
    tree = ast.parse(file.read_text(), filename=str(file))
    package = module if file.name == "__init__.py" else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    out.add(resolve_module(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            out.add(resolve_module(base))
            for alias in node.names:  # `from pkg import submodule`
                if _is_package(base) and _module_file(f"{base}.{alias.name}") is not None:
                    out.add(f"{base}.{alias.name}")
    return out


def import_closure(modules: Iterable[str]) -> list[str]:
    """``modules`` plus everything they import from this package and every enclosing package, sorted."""
    todo = list(modules)
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo.extend(".".join(parts[:end]) for end in range(1, len(parts)))  # enclosing packages
        todo.extend(_imported_modules(module) - seen)
    return sorted(seen)


def _relative_path(module: str) -> Path:
    file = _module_file(module)
    assert file is not None
    return file.relative_to(PACKAGE_DIR)


def rewrite(text: str) -> str:
    """``metacontrast`` -> ``scripts`` where it names code (imports, dotted paths); other text is left alone."""
    return _CODE_NAME.sub(VENDOR_PACKAGE, text)


def rewrite_source(text: str) -> str:
    """``metacontrast`` -> ``scripts`` in the import statements of a module's source, and nowhere else (a
    string such as an MLflow tag name ``"metacontrast.remote_run_id"`` keeps its value)."""
    return _IMPORT_LINE.sub(rf"\g<1>{VENDOR_PACKAGE}", text)


def rewrite_config(config: object) -> object:
    """:func:`rewrite` applied to every string (keys included) of a nested config."""
    if isinstance(config, str):
        return rewrite(config)
    if isinstance(config, dict):
        return {rewrite(k) if isinstance(k, str) else k: rewrite_config(v) for k, v in config.items()}
    if isinstance(config, list):
        return [rewrite_config(v) for v in config]
    return config


def vendor(modules: Iterable[str], dest: str | Path, origin: str = "") -> list[Path]:
    """Copy ``modules`` (already closed under imports) into ``dest`` (the bundle's ``scripts/``).

    Returns the written files, relative to ``dest``.  ``origin`` (e.g. a git commit) goes into each header.
    """
    dest = Path(dest)
    written = []
    for module in modules:
        rel = _relative_path(module)
        source = (PACKAGE_DIR / rel).read_text()
        header = (
            f"# Vendored by metacontrast.export from {PACKAGE}/{rel.as_posix()}"
            f"{' at ' + origin if origin else ''}: edit the original, then export again.\n"
        )
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(header + rewrite_source(source))
        written.append(rel)
    check_no_package_imports(dest)
    return written


def check_no_package_imports(dest: str | Path) -> None:
    """Fail if any vendored file still imports this repository's package."""
    for file in sorted(Path(dest).rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            if any(name.split(".")[0] == PACKAGE for name in names):
                raise VendoringError(f"{file} still imports {PACKAGE}")


def third_party_imports(modules: Iterable[str]) -> set[str]:
    """Top-level names of the non-stdlib modules that ``modules`` import (e.g. ``torch``, ``mlflow``)."""
    names: set[str] = set()
    for module in modules:
        file = _module_file(module)
        assert file is not None
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n != PACKAGE and n not in sys.stdlib_module_names and n != "__future__"}


def distributions(import_names: Iterable[str]) -> dict[str, str]:
    """``{distribution: version}`` for top-level import names (``ignite`` -> ``pytorch-ignite``).

    Versions are the installed ones without a local part (``2.13.0+cpu`` -> ``2.13.0``), as pip
    would be asked for them.  A name no installed distribution provides can only be an optional import
    (the code runs here without it) and is left out.
    """
    mapping = importlib.metadata.packages_distributions()
    out: dict[str, str] = {}
    for name in sorted(import_names):
        dists = mapping.get(name)
        if not dists:  # an optional import (inside try/except) of something not installed here
            logger.info("the vendored code imports %r, which is not installed: not listed as a requirement", name)
            continue
        # one import name can come from several distributions (mlflow: mlflow, mlflow-skinny, ...):
        # name the one called like the import, else the first by name
        wanted = _normalise(name)
        dist = next((d for d in sorted(dists) if _normalise(d) == wanted), sorted(dists)[0])
        out[dist] = plain_version(importlib.metadata.version(dist))
    return out


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def plain_version(version: str) -> str:
    """A version without its local part (``+cpu``, ``+cu124``)."""
    return version.split("+", 1)[0]
