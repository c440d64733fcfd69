"""Probe many encoders at several seeds into one MLflow store and write ``results/<dataset>/probes.md``.

An encoder is named like a results-grid pre-training (``random``, ``gcl``, ``gcl/no_filter``: the file
:meth:`~metacontrast.layout.RunLayout.encoder` names), or given as a path to an ``encoder.pt``
(``name=path`` names its row; a bare path is named after its folder, or after the folder above a
``pretrain`` folder, ``.../gcl/pretrain/encoder.pt`` -> ``gcl``); ``random/<variant>`` is the seeded
random encoder of another network (``random_init.json``).
Each (encoder, seed) runs ``bundles/common/configs/probe.json`` (with the preset) through
``monai.bundle.run`` unless the store already holds its FINISHED probe run, so an interrupted call resumes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle import run as run_bundle

from ..layout import RunLayout
from ..method_name import split_method_name
from ..tracking import completed_runs
from ..variants import RANDOM
from .grid import COMMON, method_names, random_init_overrides
from .probe_results import write_probe_table

__all__ = ["encoder_entry", "run_probes"]


def encoder_entry(spec: str, runs_dir: str | Path, dataset: str) -> tuple[str, str]:
    """``(row name, encoder file)`` of one entry of ``methods`` (``""``: the seeded random encoder)."""
    name, sep, path = spec.partition("=")
    if sep:
        return name, path
    if spec.endswith(".pt") and split_method_name(spec).bundle != RANDOM:  # a file; a random row has none
        folder = Path(spec).parent
        return (folder.parent.name if folder.name == "pretrain" else folder.name), spec
    return spec, RunLayout(runs_dir, dataset).encoder(spec)


def run_probes(dataset: str = "acdc", dataset_dir: str = "", methods: Sequence[str] | str = ("random", "gcl"),
               seeds: Sequence[int] = (0, 1, 2), preset: str | None = "cpu", runs_dir: str = "runs",
               results_dir: str = "results", tracking_uri: str = "", overrides: dict[str, Any] | None = None) -> Path:
    """Run the probes of every encoder in ``methods`` at every seed, then write ``<results_dir>/<dataset>/probes.md``.

    Args:
        dataset: manifest name.  dataset_dir: the raw data root.
        methods: encoder names or ``encoder.pt`` paths (see the module docstring); ``random`` is the reference row.
        seeds: probe seeds (the random encoder's initialisation, the frozen fine-tunes' labelled volumes).
        preset: ``bundles/common/configs/presets/<preset>.json`` merged over ``probe.json`` (``None``: full scale).
        runs_dir: where probe outputs go (:meth:`~metacontrast.layout.RunLayout.probe_dir`) and named encoders are.
        tracking_uri: the MLflow store (default: the results grid's, :meth:`~metacontrast.layout.RunLayout.store_uri`).
        overrides: further ``--key value`` pairs for every probe (``{"num_threads": 1}``, ``{"max_volumes": 4}``).
    Returns:
        The path of ``probes.md``.
    """
    if not dataset_dir:
        raise ValueError("dataset_dir is required: the folder the manifest's paths are relative to")
    layout = RunLayout(runs_dir, dataset)
    uri, experiment = tracking_uri or layout.store_uri(), layout.experiment_name
    configs = [str(COMMON / "probe.json")] + ([str(COMMON / "presets" / f"{preset}.json")] if preset else [])
    # a run of another frozen-draw protocol is not this probe: it is run again (and tables apart)
    draws = int((overrides or {}).get("frozen_draws", ConfigParser.load_config_file(COMMON / "probe.json")["frozen_draws"]))
    rows, failures = [], []
    for spec in method_names(methods):
        name, encoder = encoder_entry(spec, runs_dir, dataset)
        rows.append(name)
        if encoder and not Path(encoder).is_file():
            failures.append(f"{name}: no encoder {encoder}")
            print(f"[probes] skip {name}: {encoder} does not exist", flush=True)
            continue
        for seed in (int(s) for s in seeds):
            done = completed_runs(uri, experiment, {"workflow": "probe", "method": name, "dataset": dataset, "seed": seed})
            if any(int(run.data.params.get("frozen_draws", 1)) == draws for run in done):
                print(f"[probes] skip {name} seed={seed}: finished run in the store", flush=True)
                continue
            start = time.perf_counter()
            print(f"[probes] {name} seed={seed}", flush=True)
            run_bundle(config_file=configs, **{"dataset": dataset, "dataset_dir": str(dataset_dir), "runs_dir": str(runs_dir),
                                               "tracking_uri": uri, "experiment_name": experiment, **(overrides or {}),
                                               **random_init_overrides(split_method_name(name).variant if not encoder else "", name),
                                               "method": name, "pretrained_ckpt": encoder, "seed": seed})
            print(f"[probes] done {name} seed={seed} in {time.perf_counter() - start:.1f} s", flush=True)
    path = write_probe_table(uri, dataset, Path(results_dir) / dataset, rows, experiment_name=experiment)
    if path is None:
        raise LookupError(f"no finished probe runs of {rows} in {uri}")
    print(f"[probes] {'; '.join(failures) or 'all encoders probed'}; table {path}, runs in {uri}")
    return path
