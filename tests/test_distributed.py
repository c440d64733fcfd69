"""Several processes (DDP / explicit all-reduce, gloo on CPU) give the single-process parameters.

One pair of spawned processes runs, through the real ``MultiLossTrainer``, two GCL pre-training steps
(image + pixel contrast per meta label, GradFilter, GradMitigator) and two fine-tuning steps (U-Net in
``DistributedDataParallel``, Dice + CE) on global batches that do not split evenly (7 and 5 slices on 2
ranks); the parameters must equal one process trained on the same global batches.  A second test runs
the bundle configs merged with ``multi_gpu_pretrain.json`` / ``multi_gpu_train.json`` under ``torchrun``
on the embedded sample and compares the saved weights with the single-process run of the same config.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from metacontrast.data.augment import BatchAugmentation
from metacontrast.engines import AugmentedPrepareBatch, GradFilter, GradMitigator, MultiLossEvents, MultiLossTrainer, TwoViewPrepareBatch
from metacontrast.engines import distributed as mdist
from metacontrast.losses import GCLLoss, PixelContrastiveLoss
from metacontrast.nets import EncoderWithHeads, ProjectionHead, SegmentationUNet, UNetEncoder

FEATURES = [4, 8, 8, 16, 16]
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(num_slices: int, labelled: bool, seed: int) -> list[dict[str, torch.Tensor]]:
    """Two hand-built global batches of ``num_slices`` 32x32 slices: smooth blobs, meta labels, label maps."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    out = []
    for _ in range(2):
        centres = torch.rand(num_slices, 2, generator=g) - 0.5
        radii = 0.3 + 0.4 * torch.rand(num_slices, generator=g)
        dist2 = (xx - centres[:, 0, None, None]) ** 2 + (yy - centres[:, 1, None, None]) ** 2
        image = torch.exp(-dist2 / radii[:, None, None] ** 2)[:, None] + 0.05 * torch.rand(num_slices, 1, 32, 32, generator=g)
        batch = {"image": image, "patient_id": torch.tensor([0, 0, 0, 1, 1, 2, 2][:num_slices]),
                 "slice_quantile": torch.tensor([0, 1, 2, 0, 1, 0, 3][:num_slices])}
        if labelled:
            batch["label"] = ((dist2 < radii[:, None, None] ** 2).long() + (dist2 < (radii[:, None, None] / 2) ** 2).long())[:, None].to(torch.uint8)
        out.append(batch)
    return out


def _pretrain(distributed: bool) -> dict:
    """Two GCL steps on the global batches; returns the weights and the GradMitigator's state."""
    torch.manual_seed(0)
    network = EncoderWithHeads(UNetEncoder(features=FEATURES), {k: ProjectionHead(16, 16, 8) for k in ("img", "pix")})
    grad_filter = GradFilter()
    loss = GCLLoss(["patient_id", "slice_quantile"], temperature=0.1, pixel_loss=PixelContrastiveLoss(0.1, 0.3, grad_filter))
    mitigator = GradMitigator(beta=0.5)
    augment = BatchAugmentation(seed=0)
    trainer = MultiLossTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=_batches(7, False, 1), epoch_length=2, network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9), loss_function=loss,
        prepare_batch=TwoViewPrepareBatch(augment.two_views, ["patient_id", "slice_quantile"]),
        train_handlers=([mdist.DistributedPretraining()] if distributed else []) + [grad_filter, mitigator], decollate=False,
    )
    rows = []
    trainer.add_event_handler(MultiLossEvents.LOSSES_COMPUTED, lambda e: rows.append(int(e.state.output["image"].shape[0])))
    trainer.run()
    mitigated = bool((mitigator.last_cosines < mitigator.targets).any())
    return {"state": network.state_dict(), "targets": mitigator.targets, "rows": rows, "mitigated": mitigated,
            "loss": float(trainer.state.output["loss"])}


def _finetune(distributed: bool) -> dict:
    """Two fine-tuning steps (Dice + CE, Adam) on the global batches; DDP-wrapped when distributed."""
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    network = SegmentationUNet(1, 3, features=FEATURES)
    prepare = AugmentedPrepareBatch(BatchAugmentation(seed=0, flip_prob=0.5, rotate_prob=0.5, elastic_prob=0.3))
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    trained = network
    if distributed:
        trained = torch.nn.parallel.DistributedDataParallel(network)
        prepare = mdist.ShardedPrepareBatch(prepare)
        loss = mdist.GlobalBatchLoss(loss, prepare)
    trainer = MultiLossTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=_batches(5, True, 2), epoch_length=2, network=trained,
        # eps 1e-4: a conv bias followed by instance norm has an exactly zero gradient; Adam with a tiny eps would turn
        # its round-off (different in 1 and 2 processes) into full lr-sized steps
        optimizer=torch.optim.Adam(network.parameters(), lr=1e-2, eps=1e-4), loss_function=loss, prepare_batch=prepare, decollate=False,
    )
    trainer.run()
    return {"state": network.state_dict(), "loss": float(trainer.state.output["loss"])}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    mdist.init_process_group("gloo", timeout_s=TIMEOUT_S)
    result = {"pretrain": _pretrain(True), "finetune": _finetune(True)}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    mdist.shutdown()


def _spawn(world: int, out_dir: Path) -> None:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(out_dir))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.terminate()
    assert not alive, f"distributed workers still running after {TIMEOUT_S}s"
    assert all(p.exitcode == 0 for p in procs), f"worker exit codes {[p.exitcode for p in procs]}"


def _assert_same_weights(a: dict, b: dict, what: str, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((float((a[k] - b[k]).abs().max()), k) for k in a if a[k].is_floating_point())
    assert worst[0] <= atol, f"{what}: {worst[1]} differs by {worst[0]:.3g} from the single-process run"


def test_two_processes_equal_one_process(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single_pre, single_fine = _pretrain(False), _finetune(False)
    finally:
        torch.set_num_threads(threads)
    init = EncoderWithHeads(UNetEncoder(features=FEATURES), {k: ProjectionHead(16, 16, 8) for k in ("img", "pix")})
    _spawn(2, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # each rank really trained on its own shard: 7 slices = 4 + 3, two views each
    assert single_pre["rows"] == [14, 14]
    assert [r["pretrain"]["rows"] for r in ranks] == [[8, 8], [6, 6]]
    assert single_pre["mitigated"], "the test batch must make GradMitigator change some gradient"
    assert any(not torch.equal(single_pre["state"][k], v) for k, v in init.state_dict().items() if k in single_pre["state"])
    for r, result in enumerate(ranks):
        _assert_same_weights(result["pretrain"]["state"], single_pre["state"], f"GCL pre-training, rank {r}")
        # GradMitigator's EMA targets, per encoder tensor; a conv bias followed by instance norm has an exactly zero
        # gradient, so its cosines are round-off noise and are left out
        names = [n for n, _ in init.named_parameters() if n.startswith("encoder.")]
        kept = [k for k, n in enumerate(names) if not re.search(r"unit\d+\.conv\.bias$", n)]
        assert len(kept) == len(names) - 10
        torch.testing.assert_close(result["pretrain"]["targets"][kept], single_pre["targets"][kept], atol=1e-5, rtol=1e-4)
        assert result["pretrain"]["loss"] == pytest.approx(single_pre["loss"], rel=1e-5)
        _assert_same_weights(result["finetune"]["state"], single_fine["state"], f"fine-tuning (DDP), rank {r}")
        assert result["finetune"]["loss"] == pytest.approx(single_fine["loss"], rel=1e-5)


def test_shards_and_gather_order():
    """Shards follow ``tensor_split``; an empty shard is allowed (a stand-in row, no gradient)."""
    assert mdist.shard_sizes(7, 2) == [4, 3]
    assert mdist.shard_sizes(2, 3) == [1, 1, 0]
    assert sum(mdist.shard_sizes(48, 8)) == 48


# ------------------------------------------------------------------------------------------------
# the bundle configs merged with multi_gpu_pretrain.json / multi_gpu_train.json
# ------------------------------------------------------------------------------------------------

GCL_PRETRAIN = "bundles/gcl/configs/pretrain.json"
MULTI_PRETRAIN = "bundles/common/configs/multi_gpu_pretrain.json"
FINETUNE = "bundles/common/configs/finetune.json"
MULTI_TRAIN = "bundles/common/configs/multi_gpu_train.json"
TINY_PRETRAIN = {"features": FEATURES, "head_out": 8, "max_iterations": 2, "max_volumes": 4, "batch_size": 8,
                 "num_threads": 1, "checkpoint_interval": 100}  # fmt: skip


@pytest.mark.slow
def test_multi_gpu_pretrain_config_under_torchrun_matches_one_process(repo_root, tmp_path):
    """GCL's pretrain.json + multi_gpu_pretrain.json, 2 gloo processes under torchrun, 2 steps on the sample:
    the same encoder as the single-process run of pretrain.json; only rank 0 opened an MLflow run."""
    from monai.bundle import run as run_bundle

    from helpers import in_repo

    with in_repo(repo_root):
        run_bundle(config_file=[GCL_PRETRAIN], output_dir=str(tmp_path / "single"), **TINY_PRETRAIN)
    args = [f"--{k}={json_value}" for k, json_value in {**TINY_PRETRAIN, "features": str(FEATURES).replace(" ", "")}.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               "-m", "monai.bundle", "run", "--config_file", str([GCL_PRETRAIN, MULTI_PRETRAIN]),
               "--distributed_backend=gloo", f"--output_dir={tmp_path / 'multi'}", *args]  # fmt: skip
    done = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    single, multi = (torch.load(tmp_path / d / "encoder.pt", weights_only=True)["state_dict"] for d in ("single", "multi"))
    _assert_same_weights(multi, single, "multi_gpu_pretrain.json encoder")
    finished = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("pretrain finished")]
    assert len(finished) == 2 and sum("MLflow run None" in line for line in finished) == 1, finished
    assert len(list((tmp_path / "multi").glob("training_checkpoint_iteration=*.pt"))) == 1


@pytest.mark.slow
def test_multi_gpu_train_config_wraps_in_ddp_and_trains(repo_root, tmp_path, monkeypatch):
    """finetune.json + multi_gpu_train.json resolve to a DDP-wrapped network, a sharded batch and the global-batch
    loss, and fine-tune for one epoch (3 steps) in a (one-process, gloo) process group, writing model.pt."""
    from monai.bundle import ConfigWorkflow

    from helpers import in_repo

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    overrides = {"features": FEATURES, "max_iterations": 2, "batch_size": 16, "num_labeled": 1, "max_volumes": 2,
                 "val_interval": 1, "output_dir": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs"),
                 "distributed_backend": "gloo"}  # fmt: skip
    try:
        with in_repo(repo_root):
            workflow = ConfigWorkflow(config_file=[FINETUNE, MULTI_TRAIN], workflow_type="train", **overrides)
            workflow.initialize()
            trainer = workflow.parser.get_parsed_content("trainer")
            assert isinstance(trainer.network, torch.nn.parallel.DistributedDataParallel)
            assert isinstance(trainer.prepare_batch, mdist.ShardedPrepareBatch)
            assert isinstance(trainer.loss_function, mdist.GlobalBatchLoss)
            workflow.run()
            workflow.finalize()
    finally:
        mdist.shutdown()  # also when the run failed: later tests must not see a process group
    assert (tmp_path / "out" / "model.pt").is_file()
    assert trainer.state.iteration == trainer.state.epoch_length >= 2  # max_iterations rounds up to whole epochs
