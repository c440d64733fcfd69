"""Export a fine-tuned run as a flat, self-contained MONAI Model Zoo bundle.

:func:`export_bundle` (``scripts/export_bundle.py``) takes a fine-tune run -- an MLflow run id or a checkpoint
and the settings it was trained with (:mod:`.source`) -- and writes, e.g., ``dist/gcl_acdc_mri_segmentation/``::

    configs/metadata.json    every field of the MONAI Bundle specification (:mod:`.card`)
    configs/inference.json   templates/inference.json filled in (:mod:`.configs`)
    configs/train.json       bundles/common/configs/finetune.json with this run's recipe as defaults
    configs/evaluate.json    bundles/common/configs/evaluate.json, standalone
    configs/datalist.json    the dataset manifest (paths relative to dataset_dir)
    configs/logging.conf
    models/model.pt          plain state dict, keeping the settings the model records; models/model.ts: TorchScript
    models/pretrained_encoder.pt   the encoder the fine-tune started from, when there was one
    scripts/                 the modules of this package the configs use (:mod:`.vendor`), as ``scripts.*``
    docs/README.md           model card (results rows copied from results/<dataset>/table.md; :mod:`.card`)
    docs/data_license.txt, LICENSE

The bundle is written to a staging folder beside ``dest``, checked the way the Zoo checks it (:mod:`.verify`),
and only then moved into place.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import REPO_ROOT
from ..variants import RANDOM
from ..workflows.checkpoints import norm_of
from ..workflows.model_settings import resolve_model_settings
from ..workflows.data import preprocessing_settings, read_manifest
from . import ExportError, vendor
from .card import bundle_name, changelog, dataset_info, git_origin, make_metadata, make_model_card, versions
from .configs import FINETUNE_CONFIG, TEMPLATES, exportable_manifest, make_evaluate_config, make_inference_config, make_train_config, vendored_modules
from .source import BundleSource, find_source, load_weights, repo_path
from .verify import METADATA_SCHEMA, check_bundle, check_metadata, check_portable

logger = logging.getLogger(__name__)

__all__ = ["ExportOptions", "export_bundle", "write_bundle"]

LOGGING_CONF = REPO_ROOT / "bundles" / "common" / "configs" / "logging.conf"
LICENSE_FILE = REPO_ROOT / "LICENSE"


@dataclass(frozen=True)
class ExportOptions:
    """How to write the bundle, whatever run it holds (the options of :func:`export_bundle` that are not the run's).

    Attributes:
        dest: the bundle folder (default ``dist/<name>`` in this repository).
        name: the bundle name (default ``<method>_<dataset>_<modality>_segmentation``).
        version, changelog: the bundle's version and its changelog line; the entries of an existing
            bundle at ``dest`` for other versions are kept.
        dataset_dir: the data folder the exported configs default to (default: a Zoo-style placeholder).
        results_dir: where ``<dataset>/table.md`` is read for the model card (``None``: no table).
        include_encoder: ship the pre-trained encoder as ``models/pretrained_encoder.pt`` (train.json's start).
        schema: JSON schema to validate metadata.json with (``None``: skip).
        overwrite: replace an existing bundle at ``dest`` (otherwise that is an error).
        pixel_size, spatial_size: the preprocessing to export (in-plane mm, crop ``(H, W)``; default the model's).
        allow_preprocessing_override: export a preprocessing that differs from the one the model records
            (a warning names both values) instead of refusing with ``ModelSettingsConflict``.
    """

    dest: str | None = None
    name: str | None = None
    version: str = "0.1.0"
    changelog: str | None = None
    dataset_dir: str | None = None
    results_dir: str | None = str(REPO_ROOT / "results")
    include_encoder: bool = True
    schema: str | None = str(METADATA_SCHEMA)
    overwrite: bool = False
    pixel_size: Sequence[float] | None = None
    spatial_size: Sequence[int] | None = None
    allow_preprocessing_override: bool = False


def export_bundle(
    dest: str | None = None,
    run_id: str | None = None,
    tracking_uri: str = "",
    ckpt: str | None = None,
    dataset: str | None = None,
    datalist: str | None = None,
    features: Sequence[int] | None = None,
    preprocessing_overrides: Mapping[str, Any] | None = None,
    pixel_size: Sequence[float] | None = None,
    spatial_size: Sequence[int] | None = None,
    method: str | None = None,
    num_labeled: int | None = None,
    seed: int | None = None,
    pretrained_ckpt: str | None = None,
    name: str | None = None,
    version: str = "0.1.0",
    changelog: str | None = None,
    dataset_dir: str | None = None,
    results_dir: str | None = str(REPO_ROOT / "results"),
    include_encoder: bool = True,
    schema: str | None = str(METADATA_SCHEMA),
    overwrite: bool = False,
    allow_preprocessing_override: bool = False,
    **recipe: Any,
) -> str:
    """Write a Model Zoo bundle of a fine-tuned run and check it; returns the bundle folder.

    The run is either ``run_id`` (an MLflow fine-tune run) in ``tracking_uri`` (a URI, or the run's output
    folder for its default local store), or ``ckpt`` with the settings it was trained with (``dataset``,
    ``datalist``, ``features``, ``preprocessing_overrides``, ``method``, ``num_labeled``, ``seed``,
    ``pretrained_ckpt``; given with ``run_id`` they override the run's).  ``recipe``: further keys of
    ``finetune.json`` the weights were trained with (``--batch_size 8 --max_iterations 600`` ...): with
    ``ckpt`` they are the recipe train.json and the model card state; with ``run_id`` they override the
    logged values.  The other arguments are the fields of :class:`ExportOptions`.

    A model that records its preprocessing and network (every fine-tune does) is exported with them, whatever the
    manifest is named; ``pixel_size``, ``spatial_size``, ``preprocessing_overrides[dataset]`` or ``features`` that
    differ raise ``ModelSettingsConflict`` (preprocessing: unless ``allow_preprocessing_override``).
    """
    options = ExportOptions(
        dest=dest, name=name, version=version, changelog=changelog, dataset_dir=dataset_dir, results_dir=results_dir,
        include_encoder=include_encoder, schema=schema, overwrite=overwrite, pixel_size=pixel_size, spatial_size=spatial_size,
        allow_preprocessing_override=allow_preprocessing_override,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="export_") as work:
        source = find_source(
            work, run_id, tracking_uri, ckpt, dataset=dataset, datalist=datalist, features=features, method=method,
            preprocessing_overrides=preprocessing_overrides, num_labeled=num_labeled, seed=seed, pretrained_ckpt=pretrained_ckpt,
            **recipe,
        )  # fmt: skip
        return str(write_bundle(source, options))


def write_bundle(source: BundleSource, options: ExportOptions) -> Path:
    """Write, check and move into place the bundle of ``source``; returns its folder.

    Completes ``source.settings`` as the bundle states them: ``preprocessing_overrides[dataset]`` and ``features``
    are the ones the model records (:func:`~metacontrast.workflows.model_settings.resolve_model_settings`; a model that
    records none: the manifest's preprocessing, ``preprocessing_overrides`` and ``options``, the run's ``features``
    else finetune.json's), ``norm`` is the weights' own.
    """
    settings = source.settings
    if "dataset" not in settings:
        raise ExportError("the run's settings lack 'dataset'")
    dataset = str(settings["dataset"])
    settings.setdefault("datalist", f"data_manifests/{dataset}.json")
    settings.setdefault("method", RANDOM)
    manifest = read_manifest(repo_path(settings["datalist"]))
    overrides = dict(settings.get("preprocessing_overrides") or {})
    default = preprocessing_settings(manifest, overrides, dataset)
    asked = {**overrides.get(dataset, {}), **{k: getattr(options, k) for k in ("pixel_size", "spatial_size")}}
    resolved = resolve_model_settings(
        source.checkpoint, default, asked, {"features": settings.get("features")}, manifest["labels"],
        options.allow_preprocessing_override, f"the export options (pixel_size, spatial_size, features, preprocessing_overrides[{dataset!r}])",
    )  # fmt: skip
    settings["preprocessing_overrides"] = {**overrides, dataset: {k: resolved["preprocessing"][k] for k in default}}
    settings["features"] = resolved["network"].get("features") or json.loads(FINETUNE_CONFIG.read_text())["features"]
    info = dataset_info(manifest)
    data_dir = options.dataset_dir or info["dataset_dir"]
    dest = Path(options.dest) if options.dest else REPO_ROOT / "dist" / (options.name or bundle_name(settings, info))
    if dest.exists() and not options.overwrite:
        raise ExportError(f"{dest} exists; pass --overwrite True to replace it")

    state_dict = load_weights(source.checkpoint)
    settings["norm"] = norm_of(state_dict, source.checkpoint)  # the weights' own, whatever the run logged
    encoder = repo_path(settings["pretrained_ckpt"]) if options.include_encoder and settings.get("pretrained_ckpt") else None
    if encoder is not None and not encoder.is_file():
        logger.warning("the pre-trained encoder %s is gone: train.json will start from a random initialisation", encoder)
        encoder = None
    origin = git_origin()
    train = make_train_config(settings, data_dir, encoder is not None, origin)
    configs = {"inference.json": make_inference_config(settings, manifest["labels"], info, data_dir), "train.json": train,
               "evaluate.json": make_evaluate_config(train, origin)}  # fmt: skip
    if resolved["overridden"]:  # the bundle's evaluate runs the model at the exported preprocessing, as its inference does
        configs["evaluate.json"]["allow_preprocessing_override"] = True
    for file, config in configs.items():
        check_portable(file, config)
    modules = vendored_modules()
    default_line = (f"exported from MLflow run {source.run_id}" if source.run_id else f"exported from {source.checkpoint.name}") + (
        f": {settings['method']} fine-tuned on {dataset} with L = {settings.get('num_labeled', '?')}, seed {settings.get('seed', '?')}")
    log = changelog(options.version, options.changelog or default_line, dest)

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for folder in ("configs", "models", "docs"):
            (staging / folder).mkdir()
        vendored = [p.as_posix() for p in vendor.vendor(modules, staging / "scripts", origin)]
        metadata = make_metadata(source, manifest, versions(modules, manifest.get("layout", "")), options.version, log)
        if options.schema:
            check_metadata(metadata, options.schema)
        for file, config in {"metadata.json": metadata, **configs}.items():
            (staging / "configs" / file).write_text(json.dumps(config, indent=2) + "\n")
        (staging / "configs" / "datalist.json").write_text(json.dumps(exportable_manifest(manifest), indent=2, sort_keys=True) + "\n")
        shutil.copyfile(LOGGING_CONF, staging / "configs" / "logging.conf")
        shutil.copyfile(LICENSE_FILE, staging / "LICENSE")
        shutil.copyfile(TEMPLATES / "data_license" / info["data_license"], staging / "docs" / "data_license.txt")
        torch.save(state_dict, staging / "models" / "model.pt")
        if encoder is not None:
            torch.save(load_weights(encoder), staging / "models" / "pretrained_encoder.pt")
        card = make_model_card(source, manifest, metadata, train, vendored, origin, options.results_dir)
        (staging / "docs" / "README.md").write_text(card)
        check_bundle(staging, state_dict, settings, len(manifest["labels"]))
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported %s", dest)
    print(f"exported bundle {dest} (version {options.version}); run its inference from that folder with: "
          f"python -m monai.bundle run --config_file configs/inference.json --dataset_dir <images>")  # fmt: skip
    return dest
