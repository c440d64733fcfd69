"""The results grid: pre-train each method once, fine-tune + evaluate every (method, L, seed), tabulate.

A method name in the grid is ``<bundle>[/<variant>][+<semi-supervised add-on>]``:

* ``random`` -- no pre-training (random-init baseline); ``random/batch_norm`` -- random init of another
  network, with the fine-tune overrides stored under ``batch_norm`` in ``bundles/common/configs/random_init.json``;
* ``gcl`` -- ``bundles/gcl/configs/pretrain.json``;
* ``gcl/naive_sum`` -- the same with the overrides stored under ``naive_sum`` in
  ``bundles/gcl/configs/ablations.json`` (the bundle owns its ablation rows); ``gcl/recipe.no_filter`` --
  the overrides of ``recipe``, then those of ``no_filter`` over them (an ablation of a variant);
* ``gcl+mean_teacher`` -- GCL's encoder fine-tuned with a semi-supervised add-on (``mean_teacher``,
  ``mixup``, ``cross_pseudo``; the fine-tune key ``semi_supervised``, see :mod:`metacontrast.semi`);
  the pre-training is shared with ``gcl``, the runs are tagged and filed under the full name;
* ``gcl@improved`` -- fine-tuning with a named recipe of ``bundles/common/configs/recipes.json``
  (the pre-training is shared with ``gcl``).

Every workflow runs in this process through ``monai.bundle.run`` with the same MLflow store, and a
combination is skipped when the store already holds its FINISHED run (pre-training: the encoder file
exists too), so an interrupted grid resumes where it stopped.  The table and plot are then made from
the store alone by :func:`metacontrast.reporting.results.write_results`.

A bundle may set its own fine-tune defaults in ``bundles/<bundle>/configs/finetune.json`` (IDEAL: cross
pseudo supervision); that file is merged over the common fine-tune and evaluate configs of its rows.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.bundle import run as run_bundle

from .. import REPO_ROOT
from ..layout import RunLayout
from ..method_name import split_method_name
from ..semi import ADD_ONS
from ..tracking import completed_runs
from ..variants import RANDOM, pretraining, row_variants
from .results import write_results

COMMON = REPO_ROOT / "bundles" / "common" / "configs"


@dataclass
class MethodSpec:
    """How to run one row of the table."""

    name: str
    bundle: str | None
    pretrain_overrides: dict[str, Any] = field(default_factory=dict)
    finetune_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def pretrain_config(self) -> Path:
        return REPO_ROOT / "bundles" / str(self.bundle) / "configs" / "pretrain.json"

    @property
    def pretraining(self) -> str | None:
        """The name the row's pre-training runs and is tagged under (``None``: random init): ``gcl`` for
        ``gcl+mean_teacher@improved`` and for a fine-tune-only variant, ``gcl/naive_sum`` for a pre-training ablation,
        ``gcl/recipe`` for ``gcl/recipe.frozen_encoder`` (:func:`metacontrast.variants.pretraining`)."""
        return pretraining(self.name)

    def workflow_configs(self, workflow: str) -> list[str]:
        """``bundles/common/configs/<workflow>.json``, then the bundle's own ``finetune.json`` defaults if it has one."""
        own = REPO_ROOT / "bundles" / str(self.bundle) / "configs" / "finetune.json"
        return [str(COMMON / f"{workflow}.json")] + ([str(own)] if self.bundle is not None and own.is_file() else [])


def random_init_overrides(variant: str, name: str = "random") -> dict[str, Any]:
    """The fine-tune (and probe) overrides of the random-init row ``random/<variant>`` (``{}`` for plain ``random``)."""
    if not variant:
        return {}
    path = COMMON / "random_init.json"
    rows = json.loads(path.read_text())
    if variant not in rows or variant.startswith("_"):
        raise ValueError(f"method {name!r}: {path} defines no random-init variant {variant!r} "
                         f"(has {sorted(k for k in rows if not k.startswith('_'))})")
    return dict(rows[variant])


def parse_method(name: str) -> MethodSpec:
    """``gcl/naive_sum+mean_teacher@improved`` -> bundle ``gcl``, its ``naive_sum`` ablation, Mean Teacher
    fine-tuning with the ``improved`` recipe."""
    bundle, variant, semi, recipe = split_method_name(name)
    if semi and semi not in ADD_ONS:  # refuse rather than run plain fine-tuning under an unknown add-on's label
        raise ValueError(f"method {name!r}: unknown semi-supervised add-on {semi!r}; known: {', '.join(ADD_ONS)}")
    finetune: dict[str, Any] = {"semi_supervised": semi} if semi else {}
    if recipe:
        recipes = json.loads((COMMON / "recipes.json").read_text())
        if recipe not in recipes or recipe.startswith("_"):
            raise ValueError(f"method {name!r}: no recipe {recipe!r} in {COMMON / 'recipes.json'} (has {sorted(recipes)})")
        finetune.update(recipes[recipe])
    if bundle == RANDOM:
        return MethodSpec(name, None, {}, {**random_init_overrides(variant, name), **finetune})
    config = REPO_ROOT / "bundles" / bundle / "configs" / "pretrain.json"
    if not config.is_file():
        known = sorted(p.parent.parent.name for p in REPO_ROOT.glob("bundles/*/configs/pretrain.json"))
        raise ValueError(f"method {name!r}: no bundle {bundle!r} ({config} missing); known: random, {', '.join(known)}")
    row: dict[str, dict[str, Any]] = {"pretrain": {}, "finetune": {}}
    for _, entry in row_variants(name):  # 'recipe.no_filter': the ablation's overrides over the variant's
        for stage in row:
            row[stage].update(entry.get(stage, {}))
    return MethodSpec(name, bundle, row["pretrain"], {**row["finetune"], **finetune})


def method_names(methods: str | Sequence[str]) -> list[str]:
    """The grid's rows as a list; a string is split on commas (``"[random@improved, gcl@improved]"``).

    The command line hands over a string, not a list, when a name holds a character fire does not parse
    as a bare word (``@``, ``+``); iterating that string would run a row per character.
    """
    if isinstance(methods, str):
        return [name.strip(" '\"") for name in methods.strip().strip("[]").split(",") if name.strip(" '\"")]
    return [str(name) for name in methods]


class ResultsGrid:
    """Runs and tabulates a grid.  See :func:`run_grid` for the arguments."""

    def __init__(self, dataset: str, dataset_dir: str, methods: Sequence[str], labeled: Sequence[int], seeds: Sequence[int],
                 preset: str | None = "cpu", runs_dir: str = "runs", results_dir: str = "results", tracking_uri: str = "",
                 overrides: dict[str, Any] | None = None, pretrain_overrides: dict[str, Any] | None = None,
                 finetune_overrides: dict[str, Any] | None = None) -> None:
        self.dataset, self.dataset_dir = dataset, str(dataset_dir)
        self.methods = [parse_method(m) for m in methods]
        self.labeled, self.seeds = [int(x) for x in labeled], [int(s) for s in seeds]
        self.runs_dir = Path(runs_dir)
        self.layout = RunLayout(self.runs_dir, dataset)
        self.results_dir = Path(results_dir) / dataset
        self.tracking_uri = tracking_uri or self.layout.store_uri()
        self.experiment_name = self.layout.experiment_name
        self.presets = [str(COMMON / "presets" / f"{preset}.json")] if preset else []
        self.common = {"dataset": dataset, "dataset_dir": self.dataset_dir, "tracking_uri": self.tracking_uri,
                       "experiment_name": self.experiment_name, "runs_dir": str(self.runs_dir), **(overrides or {})}
        self.pretrain_extra = dict(pretrain_overrides or {})
        self.finetune_extra = dict(finetune_overrides or {})
        self.failures: list[str] = []

    def _done(self, workflow: str, method: str, **tags: Any) -> bool:
        found = completed_runs(self.tracking_uri, self.experiment_name, {"workflow": workflow, "method": method, "dataset": self.dataset, **tags})
        return bool(found)

    def _run(self, what: str, config_files: list[str], overrides: dict[str, Any]) -> bool:
        print(f"[grid] {what}", flush=True)
        start = time.perf_counter()
        try:
            run_bundle(config_file=config_files, **overrides)
        except Exception:  # noqa: BLE001 - one failed run must not stop the grid; it is reported at the end
            self.failures.append(what)
            traceback.print_exc()
            print(f"[grid] FAILED {what}", flush=True)
            return False
        print(f"[grid] done {what} in {time.perf_counter() - start:.1f} s", flush=True)
        return True

    def pretrain(self, spec: MethodSpec) -> str:
        """Run (or reuse) the method's pre-training; returns the encoder checkpoint ('' for random init)."""
        base = spec.pretraining
        if base is None:
            return ""
        out, encoder = self.layout.pretrain_dir(base), Path(self.layout.encoder(base))
        if encoder.is_file() and self._done("pretrain", base):
            print(f"[grid] skip pretrain {base}: finished run in the store")
            return str(encoder)
        overrides = {**self.common, **spec.pretrain_overrides, **self.pretrain_extra, "method": base, "output_dir": out}
        ok = self._run(f"pretrain {base}", [str(spec.pretrain_config), *self.presets], overrides)
        return str(encoder) if ok and encoder.is_file() else ""

    def finetune_and_evaluate(self, spec: MethodSpec, encoder: str, num_labeled: int, seed: int) -> None:
        if self._done("evaluate", spec.name, num_labeled=num_labeled, seed=seed):
            print(f"[grid] skip {spec.name} L={num_labeled} seed={seed}: finished evaluate run in the store")
            return
        out = Path(self.layout.finetune_dir(spec.name, num_labeled, seed))
        overrides = {**self.common, **spec.finetune_overrides, **self.finetune_extra, "method": spec.name,
                     "num_labeled": num_labeled, "seed": seed, "output_dir": str(out), "pretrained_ckpt": encoder}
        tag = f"{spec.name} L={num_labeled} seed={seed}"
        if self._run(f"finetune {tag}", [*spec.workflow_configs("finetune"), *self.presets], overrides):
            self._run(f"evaluate {tag}", [*spec.workflow_configs("evaluate"), *self.presets], {**overrides, "ckpt": str(out / "model.pt")})

    def run(self) -> dict[str, Path]:
        for spec in self.methods:
            encoder = self.pretrain(spec)
            if spec.bundle is not None and not encoder:
                print(f"[grid] no encoder for {spec.name}; its fine-tunes are skipped")
                continue
            for num_labeled in self.labeled:
                for seed in self.seeds:
                    self.finetune_and_evaluate(spec, encoder, num_labeled, seed)
        paths = write_results(self.tracking_uri, self.dataset, self.results_dir, [m.name for m in self.methods], self.labeled,
                              experiment_name=self.experiment_name)
        status = f"{len(self.failures)} failed: {self.failures}" if self.failures else "all runs finished"
        print(f"[grid] {status}; table {paths['table']}, plot {paths['plot']}, runs in {self.tracking_uri}")
        return paths


def run_grid(dataset: str = "acdc", dataset_dir: str = "", methods: Sequence[str] = ("random", "gcl"),
             labeled: Sequence[int] = (1, 2, 8), seeds: Sequence[int] = (0, 1, 2), preset: str | None = "cpu",
             runs_dir: str = "runs", results_dir: str = "results", tracking_uri: str = "",
             overrides: dict[str, Any] | None = None, pretrain_overrides: dict[str, Any] | None = None,
             finetune_overrides: dict[str, Any] | None = None) -> dict[str, Path]:
    """Run the grid and write ``results/<dataset>/``.

    Args:
        dataset: manifest name (``data_manifests/<dataset>.json``).  dataset_dir: the raw data root.
        methods: table rows (see the module docstring).  labeled: the L values.  seeds: fine-tune seeds.
        preset: ``bundles/common/configs/presets/<preset>.json`` merged over every config (``None``: paper scale).
        overrides / pretrain_overrides / finetune_overrides: extra ``--key value`` pairs for all / pre-training /
            fine-tune-and-evaluate workflows (e.g. ``{"max_volumes": 4}`` for a smoke run).
    """
    if not dataset_dir:
        raise ValueError("dataset_dir is required: the folder the manifest's paths are relative to")
    for name, value in (("overrides", overrides), ("pretrain_overrides", pretrain_overrides), ("finetune_overrides", finetune_overrides)):
        if value is not None and not isinstance(value, Mapping):  # the command line hands over what it could not parse as text
            raise ValueError(f"--{name} must be a mapping, got the text {value!r}: quote every value that is not a bare word "
                             """or number, e.g. --overrides '{cache_dir: "/tmp/cache", num_threads: 1}'""")
    grid = ResultsGrid(dataset, dataset_dir, method_names(methods), labeled, seeds, preset, runs_dir, results_dir, tracking_uri,
                       overrides, pretrain_overrides, finetune_overrides)
    return grid.run()
