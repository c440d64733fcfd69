"""The params a workflow config logs to MLflow keep their names (issue 20, item 3).

Existing stores are tabled by ``metacontrast/reporting/`` through params such as ``norm``, ``pixel_weight``,
``method`` and ``num_labeled``, and an output folder is recognised by the hash of the same dict: however the
configs are written, each workflow must log exactly these names.  The pre-training configs write their
``hyper_parameters`` as ``{"run": ..., "method": ...}`` (the run keys once, in ``pretrain_common.json``; the method's
own in ``method_hyper_parameters``), merged by :func:`metacontrast.workflows.hyper_parameters`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from tests.helpers import in_repo, logged_hyper_parameters
from metacontrast.errors import ConfigError
from metacontrast.tracking.params import flatten_config
from metacontrast.workflows import hyper_parameters, meta_labels_in, validation_handlers
from metacontrast.workflows.pretrain import global_stage_parameters, global_views, intensity_views, local_head

#: the run keys every pre-training logs (pretrain_common.json's hyper_parameters#run)
RUN = {"amp", "amp_dtype", "batch_size", "datalist", "dataset", "device", "epochs", "features", "grad_clip_norm",
       "learning_rate", "max_epochs", "max_volumes", "method", "norm", "preprocessing_overrides", "sampler", "seed"}  # fmt: skip
#: every config's logged param names on the sample dataset, as logged before the configs were reorganised
LOGGED = {
    "gcl": RUN | {"beta", "cosine_norm", "head_hidden", "head_out", "image_heads", "max_iterations", "meta_labels", "momentum",
                  "num_partitions", "pixel_weight", "pretrained_decoder_blocks", "temperature", "top_k", "use_grad_filter", "use_mitigator", "use_pixel_loss",
                  "warmup_iterations", "weight_decay"},
    "glcl": RUN | {"g1_hidden", "g1_out", "global_epochs", "global_iterations", "global_strategy", "local_intensity.brightness_prob",
                   "local_intensity.brightness_range", "local_intensity.contrast_prob", "local_intensity.contrast_range",
                   "local_intensity.gamma_prob", "local_iterations", "local_strategy", "num_partitions", "num_regions",
                   "pretrained_decoder_blocks", "region_projection", "region_reduction", "region_size", "temperature"},
    "spcl": RUN | {"gamma_end", "gamma_power", "gamma_start", "head_hidden", "head_out", "label_weights.slice_quantile", "max_iterations",
                   "meta_labels", "momentum", "num_partitions", "rotate_range", "temperature", "warmup_epochs", "warmup_iterations",
                   "warmup_multiplier", "weight_decay"},
    "macl": RUN | {"dense_weight", "downsample_mode", "er_weight", "global_weight", "max_iterations", "momentum", "position_key",
                   "pretrained_decoder_blocks", "projection_dim", "projector_hidden", "scale_factor", "shared_view_geometry",
                   "temperature", "threshold", "warmup_iterations", "weight_decay"},
    "ideal": RUN | {"global_key", "global_weight", "head_hidden", "head_out", "local_weight", "match_radius", "max_iterations",
                    "temperature", "warmup_iterations"},
    "simclr": RUN | {"head_hidden", "head_out", "max_iterations", "momentum", "temperature", "warmup_iterations", "weight_decay"},
    "finetune": {"amp", "amp_dtype", "augmentation.brightness_prob", "augmentation.contrast_prob", "augmentation.elastic_prob",
                 "augmentation.flip_prob", "augmentation.gamma_prob", "augmentation.rotate_prob", "augmentation.rotate_range",
                 "augmentation.scale_prob", "augmentation.translate_prob", "batch_size", "datalist", "dataset", "device",
                 "encoder_lr_scale", "epochs", "features", "freeze_encoder", "labeled_volumes", "learning_rate", "max_epochs",
                 "max_iterations", "max_volumes", "method", "norm", "num_labeled", "preprocessing_overrides", "pretrained_ckpt",
                 "seed", "semi_supervised", "semi_supervised_settings", "unlabeled_volumes", "val_interval"},
}  # fmt: skip
CONFIGS = {name: f"bundles/{name}/configs/pretrain.json" for name in ("gcl", "glcl", "spcl", "macl", "ideal", "simclr")}
CONFIGS["finetune"] = "bundles/common/configs/finetune.json"


def _logged(repo_root: Path, name: str, **overrides) -> dict[str, str]:
    parser = ConfigParser()
    parser.read_config(str(repo_root / CONFIGS[name]))
    parser.update(overrides)
    with in_repo(repo_root):
        return flatten_config(logged_hyper_parameters(parser))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_config_logs_the_param_names_it_always_has(repo_root: Path, name: str) -> None:
    assert set(_logged(repo_root, name)) == LOGGED[name]


def test_a_top_level_override_reaches_the_logged_params(repo_root: Path) -> None:
    logged = _logged(repo_root, "gcl", pixel_weight=0.1, seed=3, norm="batch")
    assert (logged["pixel_weight"], logged["seed"], logged["norm"]) == ("0.1", "3", "batch")


def test_hyper_parameters_merge_the_run_and_the_method_and_refuse_a_key_in_both() -> None:
    assert hyper_parameters({"seed": 0, "method": "gcl"}, {"pixel_weight": 1.0}) == {"seed": 0, "method": "gcl", "pixel_weight": 1.0}
    with pytest.raises(ConfigError, match=r"\['seed'\]"):
        hyper_parameters({"seed": 0}, {"seed": 1})


def test_meta_labels_in_keeps_the_asked_order_and_drops_what_the_manifest_lacks(repo_root: Path) -> None:
    with in_repo(repo_root):
        assert meta_labels_in("data_manifests/acdc.json", ["organ_state", "slice_quantile", "x"]) == ["organ_state", "slice_quantile"]
        assert meta_labels_in("data_manifests/sample.json", ["slice_quantile", "organ_state"]) == ["slice_quantile"]


class _TwoViews:
    def two_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images + 1, images + 2

    def intensity(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return images * 2


def test_glcl_pieces() -> None:
    images = torch.zeros(2, 1, 4, 4)
    assert [float(v.max()) for v in global_views(_TwoViews(), "GR")(images)] == [1.0, 2.0]
    assert [float(v.max()) for v in global_views(_TwoViews(), "GD")(images)] == [0.0, 1.0, 2.0]  # the slice itself first
    assert len(intensity_views(_TwoViews(), None)(images)) == 2
    mlp = torch.nn.Conv2d(8, 8, 1)
    assert local_head(mlp, 8, 0, 3) is mlp
    head = local_head(mlp, 8, 16, 3)
    assert head(torch.zeros(1, 8, 3, 3)).shape == (1, 16, 1, 1) and head[1].bias is None


def test_glcl_global_stage_trains_the_encoder_blocks_and_heads_only(repo_root: Path) -> None:
    parser = ConfigParser()
    parser.read_config(str(repo_root / CONFIGS["glcl"]))
    parser.update({"features": [4, 8, 16, 32, 64], "device": "cpu"})
    with in_repo(repo_root):
        network = parser.get_parsed_content("global_network")
    params = {id(p) for p in global_stage_parameters(network)}
    decoder = {id(p) for block in network.encoder.decoder_blocks(2) for p in block.parameters()}
    assert params and not params & decoder
    assert {id(p) for p in network.heads.parameters()} <= params


def test_no_val_split_means_no_validation_handler() -> None:
    assert validation_handlers(object(), 10, None) == []
    with pytest.raises(TypeError, match="Evaluator"):  # with a val split: MONAI's ValidationHandler, which checks its validator
        validation_handlers(object(), 10, val_loader=[])


#: the run keys each pre-training file writes out, because a single ``--config_file`` must define every id the
#: workflow reads (MONAI 1.6 has no include): one fact in six files, so they are held equal here
SHARED_RUN_KEYS = ("imports", "workflow", "dataset", "dataset_dir", "datalist", "runs_dir", "output_dir", "cache_dir", "max_volumes",
                   "seed", "device", "amp", "amp_dtype", "num_threads", "tracking_uri", "experiment_name", "preprocessing_overrides",
                   "pretrain_split", "diagnostics_interval", "collapse_cosine", "skip_nonfinite", "norm", "grad_clip_norm", "features",
                   "hyper_parameters", "data", "tracking", "handlers", "trainer", "initialize", "finalize")  # fmt: skip


def test_the_run_keys_are_written_alike_in_every_pretraining_file(repo_root: Path) -> None:
    configs = {name: ConfigParser.load_config_file(repo_root / path) for name, path in CONFIGS.items() if name != "finetune"}
    for key in SHARED_RUN_KEYS:
        values = {name: config.get(key) for name, config in configs.items()}
        assert len({repr(v) for v in values.values()}) == 1, f"{key!r} differs between the pre-training configs: {values}"
