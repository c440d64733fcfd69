"""SliceCache building, meta labels, disk cache and batched access, on a few real ACDC volumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import pytest
import torch

from metacontrast.data import slices
from metacontrast.data.samplers import MetaLabelBatchSampler
from metacontrast.data.slice_loader import SliceDataset, make_slice_loader
from metacontrast.data.slices import SliceCache, build_slice_cache

PIXEL, SIZE = (2.734, 2.734), (96, 96)  # the CPU-scale preset keeps these tests fast
PATIENTS = ("patient002", "patient001", "patient090")  # 090 has 7 slices, the others 10


def _acdc_datalist(acdc_dir: Path) -> list[dict[str, Any]]:
    """ED and ES of each patient, ED/ES from Info.cfg, paths relative to ``acdc_dir``."""
    entries = []
    for patient in PATIENTS:
        info = dict(line.split(": ") for line in (acdc_dir / patient / "Info.cfg").read_text().splitlines())
        for state in ("ED", "ES"):
            stem = f"{patient}/{patient}_frame{int(info[state]):02d}"
            entries.append(
                {
                    "image": f"{stem}.nii.gz",
                    "label": f"{stem}_gt.nii.gz",
                    "volume_id": f"{patient}_{state}",
                    "patient_id": patient,
                    "organ_state": state,
                }
            )
    return entries


@pytest.fixture(scope="module")
def datalist(acdc_dir: Path) -> list[dict[str, Any]]:
    return _acdc_datalist(acdc_dir)


@pytest.fixture(scope="module")
def cache(datalist: list[dict[str, Any]], acdc_dir: Path, cache_dir: Path) -> SliceCache:
    return build_slice_cache(datalist, acdc_dir, PIXEL, SIZE, cache_dir=cache_dir, progress=False)


def test_cache_contents_and_meta(cache: SliceCache, datalist: list[dict[str, Any]], acdc_dir: Path) -> None:
    depths = [nib.load(acdc_dir / e["image"]).shape[2] for e in datalist]
    n = sum(depths)
    assert len(cache) == n and cache.num_volumes == len(datalist)
    assert cache.images.shape == (n, 1, *SIZE) and cache.images.dtype == torch.float32
    assert cache.labels is not None and cache.labels.shape == (n, 1, *SIZE) and cache.labels.dtype == torch.uint8
    assert 0.0 <= float(cache.images.min()) and float(cache.images.max()) <= 1.0
    assert set(torch.unique(cache.labels).tolist()) == {0, 1, 2, 3}
    assert set(cache.meta) == set(slices.META_KEYS) and all(v.shape == (n,) for v in cache.meta.values())
    assert [v["volume_id"] for v in cache.volumes] == [e["volume_id"] for e in datalist]
    assert cache.patient_names == sorted(PATIENTS) and cache.organ_state_names == ["ED", "ES"]

    start = 0
    for v, (entry, d) in enumerate(zip(datalist, depths)):
        part = {k: t[start : start + d] for k, t in cache.meta.items()}
        start += d
        assert part["volume_index"].tolist() == [v] * d
        assert part["slice_index"].tolist() == list(range(d))
        assert torch.allclose(part["slice_position"], torch.linspace(0, 1, d))
        assert part["slice_quantile"].tolist() == [k * 4 // d for k in range(d)]
        assert set(part["patient_id"].tolist()) == {cache.patient_names.index(entry["patient_id"])}
        assert set(part["organ_state"].tolist()) == {cache.organ_state_names.index(entry["organ_state"])}


def test_disk_cache_hit_is_identical(
    cache: SliceCache, datalist: list[dict[str, Any]], acdc_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_rebuild(*args: Any, **kwargs: Any) -> SliceCache:
        raise AssertionError("a cache hit must not preprocess again")

    monkeypatch.setattr(slices, "_build", no_rebuild)
    again = build_slice_cache(datalist, acdc_dir, PIXEL, SIZE, cache_dir=cache_dir, progress=False)
    assert torch.equal(again.images, cache.images) and torch.equal(again.labels, cache.labels)
    assert all(torch.equal(again.meta[k], cache.meta[k]) for k in cache.meta)
    assert again.volumes == cache.volumes and again.patient_names == cache.patient_names
    # other parameters are another key: this one must miss (and so call the patched builder)
    with pytest.raises(AssertionError, match="must not preprocess"):
        build_slice_cache(datalist, acdc_dir, PIXEL, (64, 64), cache_dir=cache_dir, progress=False)


def test_corrupt_cache_file_is_reported_and_rebuilt(
    cache: SliceCache, datalist: list[dict[str, Any]], acdc_dir: Path, tmp_path: Path
) -> None:
    sub = datalist[:2]
    first = build_slice_cache(sub, acdc_dir, PIXEL, SIZE, cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("slices-*.pt")
    path.write_bytes(path.read_bytes()[:1000])  # truncated, as after a crash mid-copy
    with pytest.warns(RuntimeWarning, match=path.name):
        rebuilt = build_slice_cache(sub, acdc_dir, PIXEL, SIZE, cache_dir=tmp_path, progress=False)
    assert torch.equal(rebuilt.images, first.images)
    assert torch.equal(rebuilt.images, cache.images[: len(rebuilt)])
    loaded = torch.load(path, weights_only=True)  # the rewritten file is whole again
    assert torch.equal(loaded["images"], first.images)
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary files left behind"


def test_cache_key_follows_inputs(datalist: list[dict[str, Any]], acdc_dir: Path) -> None:
    key = slices.slice_cache_key(datalist, acdc_dir, PIXEL, SIZE)
    assert key == slices.slice_cache_key([dict(e) for e in datalist], acdc_dir, PIXEL, SIZE)
    assert key != slices.slice_cache_key(datalist, acdc_dir, (1.367, 1.367), SIZE)
    assert key != slices.slice_cache_key(datalist[:-1], acdc_dir, PIXEL, SIZE)
    assert key != slices.slice_cache_key(datalist, acdc_dir, PIXEL, SIZE, num_partitions=3)


def test_without_labels(datalist: list[dict[str, Any]], acdc_dir: Path, cache: SliceCache) -> None:
    unlabelled = [{k: v for k, v in e.items() if k != "label"} for e in datalist[:1]]
    c = build_slice_cache(unlabelled, acdc_dir, PIXEL, SIZE, with_labels=False, progress=False)
    assert c.labels is None and torch.equal(c.images, cache.images[: len(c)])
    with pytest.raises(ValueError, match=datalist[0]["volume_id"]):
        build_slice_cache(unlabelled, acdc_dir, PIXEL, SIZE, with_labels=True, progress=False)


def test_subset_picks_volumes(cache: SliceCache) -> None:
    sub = cache.subset([3, 0])
    assert [v["volume_id"] for v in sub.volumes] == [cache.volumes[3]["volume_id"], cache.volumes[0]["volume_id"]]
    old = cache.meta["volume_index"]
    assert torch.equal(sub.images, torch.cat([cache.images[old == 3], cache.images[old == 0]]))
    assert sub.meta["volume_index"].tolist() == [0] * int((old == 3).sum()) + [1] * int((old == 0).sum())
    assert sub.patient_names == cache.patient_names
    with pytest.raises(IndexError):
        cache.subset([len(cache.volumes)])


def test_dataset_batches_by_index_select(cache: SliceCache) -> None:
    ds = SliceDataset(cache)
    idx = [5, 0, 17, 3]
    batch = ds.__getitems__(idx)
    assert batch["image"].shape == (4, 1, *SIZE) and batch["label"].shape == (4, 1, *SIZE)
    for j, i in enumerate(idx):
        item = ds[i]
        assert all(torch.equal(batch[k][j], item[k]) for k in item)

    sampler = MetaLabelBatchSampler(cache.meta["volume_index"], cache.meta["slice_quantile"], 2, seed=0)
    batches = list(make_slice_loader(cache, sampler))
    assert len(batches) == len(cache.volumes) // 2
    for b in batches:
        assert b["image"].shape == (8, 1, *SIZE)
        assert sorted(b["slice_quantile"].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
