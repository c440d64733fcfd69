"""Batch samplers: meta-label composition, determinism, epochs and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metacontrast.data.samplers import MetaLabelBatchSampler, RandomBatchSampler
from metacontrast.data.transforms import slice_quantiles

S = 4
DEPTHS = [6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 10]  # 14 volumes, slice counts as in ACDC


def _slice_table(depths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(volume_index, slice_quantile)`` of every slice, volumes stored one after the other."""
    vol = torch.cat([torch.full((d,), v) for v, d in enumerate(depths)])
    quant = torch.cat([slice_quantiles(d, S) for d in depths])
    return vol, quant


def _sampler(seed: int = 0, volumes_per_batch: int = 3, drop_last: bool = True) -> MetaLabelBatchSampler:
    vol, quant = _slice_table(DEPTHS)
    return MetaLabelBatchSampler(vol, quant, volumes_per_batch, S, seed=seed, drop_last=drop_last)


def test_meta_batches_hold_volumes_by_quantiles() -> None:
    vol, quant = _slice_table(DEPTHS)
    sampler = _sampler()
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(DEPTHS) // 3
    seen_volumes = []
    for batch in batches:
        assert len(batch) == len(set(batch)) == 3 * S
        v, q = vol[batch], quant[batch]
        assert len(set(v.tolist())) == 3
        for volume in set(v.tolist()):
            assert sorted(q[v == volume].tolist()) == list(range(S)), "one slice per quantile per volume"
        seen_volumes += v.unique().tolist()
    assert len(seen_volumes) == len(set(seen_volumes)), "a volume appears once per epoch"


def test_meta_sampler_keeps_the_last_group_without_drop_last() -> None:
    sampler = _sampler(drop_last=False)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    assert [len(b) for b in batches] == [12, 12, 12, 12, 8]


def test_meta_sampler_draws_every_slice_over_epochs() -> None:
    sampler = _sampler(volumes_per_batch=2)
    drawn = {i for _ in range(60) for batch in sampler for i in batch}
    assert drawn == set(range(sum(DEPTHS)))


def test_short_volume_contributes_its_non_empty_quantiles() -> None:
    vol, quant = _slice_table([3, 8])
    (batch,) = list(MetaLabelBatchSampler(vol, quant, 2, S, seed=1))
    assert len(batch) == 3 + S


@pytest.mark.parametrize("make", [_sampler, lambda seed=0: RandomBatchSampler(50, 8, seed=seed)])
def test_deterministic_per_seed_and_epoch(make) -> None:
    a, b, c = make(seed=0), make(seed=0), make(seed=1)
    epoch0 = list(a)
    assert epoch0 == list(b), "same seed, same batches"
    assert epoch0 != list(c), "another seed, other batches"
    epoch1 = list(a)  # a full pass moves to the next epoch
    assert a.epoch == 2 and epoch1 != epoch0
    a.set_epoch(0)
    assert list(a) == epoch0


@pytest.mark.parametrize("make", [_sampler, lambda seed=0: RandomBatchSampler(50, 8, seed=seed)])
def test_state_dict_resume_continues_the_sequence(make) -> None:
    reference = make()
    full = list(reference) + list(reference)  # epochs 0 and 1

    run = make()
    list(run)  # epoch 0
    it = iter(run)
    head = [next(it), next(it)]
    state = run.state_dict()
    assert state == {"seed": 0, "epoch": 1, "position": 2}

    resumed = make()
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert full[len(full) // 2 :] == head + tail
    assert resumed.state_dict() == {"seed": 0, "epoch": 2, "position": 0}
    with pytest.raises(ValueError, match="seed"):
        make(seed=5).load_state_dict(state)


def test_random_batch_sampler() -> None:
    sampler = RandomBatchSampler(50, 8, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6 and all(len(b) == 8 for b in batches)
    flat = np.concatenate(batches)
    assert len(set(flat.tolist())) == 48 and flat.max() < 50
    assert len(RandomBatchSampler(50, 8, drop_last=False)) == 7
    assert sorted(np.concatenate(list(RandomBatchSampler(50, 8, drop_last=False))).tolist()) == list(range(50))


def test_bad_arguments() -> None:
    vol, quant = _slice_table([8, 8])
    with pytest.raises(ValueError, match="cannot fill"):
        MetaLabelBatchSampler(vol, quant, 3, S)
    with pytest.raises(ValueError, match="slice_quantile"):
        MetaLabelBatchSampler(vol, quant + 4, 1, S)
