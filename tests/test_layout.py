"""The run layout (issue 20, item 2): every path of a dataset's runs is pinned here for sample inputs, and the
bundle configs, the grid and the probe grid resolve to what :class:`metacontrast.layout.RunLayout` says."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from metacontrast.layout import RunLayout
from tests.helpers import in_repo, parsed_config

CONFIGS = "bundles/common/configs"
PRETRAIN_BUNDLES = ("gcl", "glcl", "ideal", "macl", "simclr", "spcl")
#: row names of every shape the grammar has: bundle, variant, add-on, recipe, and the random rows
ROWS = ("random", "random/batch_norm@improved", "random+mixup", "gcl", "gcl/naive_sum", "gcl+mean_teacher",
        "gcl/naive_sum+mean_teacher@improved", "ideal")


def test_the_paths_are_pinned() -> None:
    """The folders and files existing run folders and stores are read from, to the byte."""
    layout = RunLayout("runs", "acdc")
    assert layout.root == Path("runs/acdc")
    assert layout.pretrain_dir("gcl") == "runs/acdc/gcl/pretrain"
    assert layout.pretrain_dir("gcl/naive_sum") == "runs/acdc/gcl/naive_sum/pretrain"
    assert layout.finetune_dir("gcl", 1, 0) == "runs/acdc/gcl/L1_seed0"
    assert layout.finetune_dir("gcl/naive_sum+mean_teacher@improved", 8, 2) == "runs/acdc/gcl/naive_sum+mean_teacher@improved/L8_seed2"
    assert layout.finetune_dir("random", "2", "1") == "runs/acdc/random/L2_seed1"  # tags are text
    assert layout.probe_dir("gcl/no_filter", 3) == "runs/acdc/gcl/no_filter/probe_seed3"
    assert RunLayout.evaluation_dir("runs/acdc/gcl/L1_seed0") == Path("runs/acdc/gcl/L1_seed0/evaluation")
    assert RunLayout.evaluation_dir("runs/acdc/gcl/L1_seed0", last=True) == Path("runs/acdc/gcl/L1_seed0/evaluation_last")
    assert RunLayout(Path("/data/runs_paper_scale"), "sample").finetune_dir("simclr", 2, 0) == "/data/runs_paper_scale/sample/simclr/L2_seed0"


def test_the_encoder_of_a_row_follows_the_row_name_grammar() -> None:
    """A row fine-tunes from the pre-training of its bundle and the variant parts that change it (add-on, recipe and
    fine-tune-only parts dropped); random rows from none; an unknown variant is refused by file."""
    layout = RunLayout("runs", "acdc")
    assert layout.encoder("gcl") == "runs/acdc/gcl/pretrain/encoder.pt"
    assert layout.encoder("gcl+mean_teacher") == "runs/acdc/gcl/pretrain/encoder.pt"
    assert layout.encoder("gcl@improved") == "runs/acdc/gcl/pretrain/encoder.pt"
    assert layout.encoder("gcl/naive_sum+mixup@improved") == "runs/acdc/gcl/naive_sum/pretrain/encoder.pt"
    # a fine-tune-only variant fine-tunes the encoder of the pre-training it leaves unchanged
    assert layout.encoder("gcl/frozen_encoder@improved") == "runs/acdc/gcl/pretrain/encoder.pt"
    assert layout.encoder("gcl/warmup_clip.frozen_encoder") == "runs/acdc/gcl/warmup_clip/pretrain/encoder.pt"
    with pytest.raises(ValueError, match=r"ablations.json defines no variant 'no_such'"):
        layout.encoder("gcl/no_such")
    for random_row in ("random", "random+mixup", "random/batch_norm", "random/batch_norm@improved"):
        assert layout.encoder(random_row) == ""


def test_the_store_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    here = Path(os.getcwd()).resolve()
    assert RunLayout("runs", "acdc").store_uri() == f"sqlite:///{here}/runs/acdc/mlruns.db"
    assert RunLayout(here / "elsewhere", "sample").store_uri() == f"sqlite:///{here}/elsewhere/sample/mlruns.db"


@pytest.mark.parametrize("runs_dir", [None, "runs_paper_scale", "/tmp/metacontrast-runs"])
def test_the_configs_resolve_to_the_layout(repo_root: Path, runs_dir: str | None) -> None:
    """Fine-tune, evaluate, probe and every pre-training config reach the layout's paths (``runs_dir`` defaults to
    ``runs``, as the README's commands rely on)."""
    given = {} if runs_dir is None else {"runs_dir": runs_dir}
    layout = RunLayout(runs_dir or "runs", "acdc")
    with in_repo(repo_root):
        for method in ROWS:
            finetune = parsed_config(repo_root, f"{CONFIGS}/finetune.json", dataset="acdc", method=method, num_labeled=8, seed=2, **given)
            assert finetune.get_parsed_content("output_dir") == layout.finetune_dir(method, 8, 2)
            assert finetune.get_parsed_content("pretrained_ckpt") == layout.encoder(method)
            evaluate = parsed_config(repo_root, f"{CONFIGS}/finetune.json", f"{CONFIGS}/evaluate.json", dataset="acdc",
                                     method=method, num_labeled=8, seed=2, **given)
            assert evaluate.get_parsed_content("output_dir") == layout.finetune_dir(method, 8, 2)
            assert evaluate.get_parsed_content("ckpt") == layout.finetune_dir(method, 8, 2) + "/model.pt"
            probe = parsed_config(repo_root, f"{CONFIGS}/probe.json", dataset="acdc", method=method, seed=3, **given)
            assert probe.get_parsed_content("output_dir") == layout.probe_dir(method, 3)
            assert probe.get_parsed_content("pretrained_ckpt") == layout.encoder(method)
        for bundle in PRETRAIN_BUNDLES:
            pretrain = parsed_config(repo_root, f"bundles/{bundle}/configs/pretrain.json", dataset="acdc", **given)
            assert pretrain.get_parsed_content("output_dir") == layout.pretrain_dir(bundle)
            assert Path(pretrain.get_parsed_content("output_dir")) / "encoder.pt" == Path(layout.encoder(bundle))


def test_each_config_path_is_one_layout_call(repo_root: Path) -> None:
    """No config spells a run path out: each is one ``$metacontrast.layout.RunLayout(@runs_dir, @dataset)...`` call."""
    call = "$metacontrast.layout.RunLayout(@runs_dir, @dataset)."
    keys = {f"{CONFIGS}/finetune.json": ("output_dir", "pretrained_ckpt"), f"{CONFIGS}/probe.json": ("output_dir", "pretrained_ckpt")}
    keys.update({f"bundles/{b}/configs/pretrain.json": ("output_dir",) for b in PRETRAIN_BUNDLES})
    for path, names in keys.items():
        config = json.loads((repo_root / path).read_text())
        for name in names:
            assert config[name].startswith(call) and config[name].count("(") == 2, f"{path}: {name} = {config[name]!r}"
        assert "runs_dir" in config, f"{path} has no runs_dir"


def test_the_grid_and_the_probe_grid_use_the_layout(tmp_path: Path) -> None:
    from metacontrast.reporting.grid import ResultsGrid
    from metacontrast.reporting.probe_grid import encoder_entry

    grid = ResultsGrid("acdc", str(tmp_path), ["random", "gcl"], [1], [0], runs_dir=str(tmp_path / "runs"))
    assert grid.tracking_uri == RunLayout(tmp_path / "runs", "acdc").store_uri()
    for name in ("gcl", "gcl/no_filter", "random", "random/batch_norm"):
        assert encoder_entry(name, "runs", "acdc") == (name, RunLayout("runs", "acdc").encoder(name))
