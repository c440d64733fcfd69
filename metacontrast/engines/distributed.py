"""Training on several processes (``torchrun``): every step equals one process on the global batch.

Used by ``bundles/common/configs/multi_gpu_pretrain.json`` and ``multi_gpu_train.json``.  ``W`` processes
(ranks) each hold a replica of the network; a *global batch* of ``N`` slices is what one process would
train on.  Three pieces make one distributed step give the single-process parameters (to float
round-off), with any ``N`` (shards may differ by one slice; a rank may even have none):

1. **Same global batch, then a shard** (:class:`ShardedPrepareBatch`).  The batch sampler and the
   augmentation are seeded identically on every rank, so every rank loads the same global batch (from
   its in-memory slice cache), draws the augmented views *for the whole batch* exactly as one process
   would, and keeps its contiguous shard of rows of every view (``torch.tensor_split`` sizes).  Sharding
   in the sampler instead would make each rank draw augmentation parameters for its shard only, which
   are not the single-process draws (``BatchAugmentation`` draws a whole batch from one generator).
   Loading and augmenting the global batch costs little next to the network; the network's forward and
   backward -- the cost -- run on the shard only.
2. **The loss of the global batch** (:class:`GlobalBatchLoss`).  Contrastive losses couple every pair of
   the batch (the denominators of GCL Eq. 1, the pixel pairs of Eq. 5), so a loss over a shard would only
   see local negatives.  The predictions are all-gathered (:func:`gather_global_batch`, rows put back in
   the single-process order) and every rank evaluates the loss of the whole global batch, ``L``, on the
   global targets.  The gather's backward is local: rank ``r`` receives ``W * dL/d(its rows)``.  The
   parameter gradient of rank ``r`` is then ``g_r = W * dL/dθ|_r`` (through its own rows), and their
   average over ranks is exactly the single-process gradient: ``(1/W) Σ_r W dL/dθ|_r = dL/dθ``.  The cost
   is that the loss (not the network) is evaluated ``W`` times; for GCL's pixel loss that is the dense
   ``(2N, hw, 2N, hw)`` similarity of the global batch on every rank.
3. **Averaging the gradients.**
   * Fine-tuning: the network is wrapped in ``DistributedDataParallel`` (as Model Zoo bundles do); its
     bucket all-reduce averages ``g_r`` during ``backward``.
   * Pre-training: **no DDP**; :class:`GradientAllReduce` averages explicitly.  ``MultiLossTrainer``
     computes the per-meta-label gradients that GradMitigator needs with ``torch.autograd.grad``, which
     never fires DDP's gradient hooks, and GradMitigator (GCL Alg. 1) is not linear in its inputs: it must
     see the *global* per-label gradients ``g_m = (1/W) Σ_r g_{m,r}``, not the average of per-rank mitigated
     ones.  So at ``PER_LOSS_GRADIENTS_COMPUTED`` (before GradMitigator, which is attached later) each
     label's gradient is averaged in one flattened all-reduce of ``M x P`` values; every rank then runs
     the same mitigation on the same inputs, and its EMA targets stay identical across ranks.  Steps
     without per-label gradients (mitigator off, SimCLR, SPCL) average ``param.grad`` at
     ``GRADIENTS_READY``.  No gradient is averaged twice.

Only rank 0 logs to MLflow, shows progress and writes files (:func:`for_rank`, :class:`metacontrast.ranks.FollowerRun`);
every rank resumes from the same training checkpoint (rank 0 first, so a damaged file is set aside once).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import torch
import torch.distributed as dist
from ignite.contrib.handlers import ProgressBar
from ignite.engine import Engine, Events
from monai.engines.utils import PrepareBatch
from monai.handlers import CheckpointSaver, StatsHandler, ValidationHandler
from torch import nn

from ..errors import ConfigError
from ..ranks import is_leader, rank, world_size
from .events import MultiLossEvents

__all__ = [
    "GlobalBatchLoss",
    "GradientAllReduce",
    "DistributedPretraining",
    "ShardedPrepareBatch",
    "for_rank",
    "gather_global_batch",
    "init_process_group",
    "local_device",
    "shard_sizes",
]


# ----------------------------------------------------------------------------------------------
# process group
# ----------------------------------------------------------------------------------------------


def local_device() -> str:
    """``"cuda:<LOCAL_RANK>"`` when CUDA is available (one GPU per process, as ``torchrun`` numbers them), else ``"cpu"``."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def device_ids(device: str | torch.device) -> list[int] | None:
    """``DistributedDataParallel``'s ``device_ids``: ``[index]`` for a CUDA device, ``None`` for the CPU."""
    device = torch.device(device)
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None


def init_process_group(backend: str = "nccl", timeout_s: float = 1800.0) -> int:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).

    ``backend``: ``"nccl"`` on GPUs, ``"gloo"`` on CPUs.  Idempotent; returns the world size.  With NCCL the
    process's GPU is set to ``LOCAL_RANK``.
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if not dist.is_initialized():
        if missing:
            raise RuntimeError(f"multi-process training needs the environment torchrun sets; {missing} not set "
                               f"(start it with torchrun --nproc_per_node=<GPUs> -m monai.bundle run ...)")
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise RuntimeError("distributed_backend 'nccl' needs CUDA GPUs; use --distributed_backend gloo on CPUs")
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_world_size()


def check_supported(key: str, value: Any, supported: Sequence[Any]) -> None:
    """Refuse a setting the multi-process workflow does not handle (a :class:`ConfigError` naming ``key``)."""
    if value not in supported:
        raise ConfigError(f"{key}={value!r} is not supported on several processes (supported: {list(supported)})")


def shutdown() -> None:
    """Leave the process group (after a barrier, so no rank exits while another still needs it), and tell
    ignite, which caches the group it saw: its handlers would otherwise keep asking the destroyed group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    idist.sync()


def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (what DDP does when it wraps a module)."""
    if world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=src)


# ----------------------------------------------------------------------------------------------
# shards of the global batch
# ----------------------------------------------------------------------------------------------


def shard_sizes(batch_size: int, num_shards: int) -> list[int]:
    """Rows of each rank's shard of ``batch_size`` rows, ``torch.tensor_split`` style (the first ones get one more)."""
    base, extra = divmod(int(batch_size), int(num_shards))
    return [base + (r < extra) for r in range(num_shards)]


def _shard_slices(batch_size: int, num_shards: int) -> list[slice]:
    sizes = shard_sizes(batch_size, num_shards)
    starts = [sum(sizes[:r]) for r in range(num_shards)]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


class ShardedPrepareBatch(PrepareBatch):
    """A ``PrepareBatch`` that keeps this rank's shard of the inputs of the global batch.

    The wrapped ``prepare_batch`` returns ``(inputs, targets)`` for the global batch of ``N`` slices:
    ``inputs`` is ``(V N, C, H, W)``, the ``V`` views stacked view by view (V = 2 for contrastive
    pre-training, 1 for fine-tuning).  This returns ``(shard, targets)`` with ``shard`` the rows
    ``[v N + start_r, v N + start_r + n_r)`` of every view, ``(V n_r, C, H, W)``; ``targets`` stay global
    (the loss is evaluated on the global batch, see :class:`GlobalBatchLoss`).  A rank whose shard is empty
    (``N < W``) gets the first row of each view as a stand-in, so it still runs forward and backward with
    the others; :func:`gather_global_batch` drops it and it receives no gradient.

    Args:
        prepare_batch: the workflow's ``PrepareBatch`` (augmentation included).
        image_key: key of the global batch's images in the loader's batch (gives ``N``).
    Attributes:
        batch_size: ``N`` of the last global batch.
    """

    def __init__(self, prepare_batch: Callable, image_key: str = "image") -> None:
        self.prepare_batch = prepare_batch
        self.image_key = image_key
        self.batch_size = 0

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs):
        prepared = self.prepare_batch(batchdata, device, non_blocking, **kwargs)
        inputs, rest = prepared[0], tuple(prepared[1:])
        self.batch_size = n = int(batchdata[self.image_key].shape[0])
        if world_size() == 1:
            return prepared
        if n == 0 or inputs.shape[0] % n:
            raise ValueError(f"prepared inputs have {inputs.shape[0]} rows, not a multiple of the global batch of {n} slices")
        rows = _shard_slices(n, world_size())[rank()]
        views = inputs.view(inputs.shape[0] // n, n, *inputs.shape[1:])
        shard = views[:, rows] if rows.stop > rows.start else views[:, :1]
        return (shard.reshape(-1, *inputs.shape[1:]), *rest)


class _GatherRows(torch.autograd.Function):
    """All-gather each rank's ``(V m_r, ...)`` rows into the global ``(V N, ...)`` tensor, view by view.

    Backward is local: every rank computes the same loss of the gathered tensor, so rank ``r`` already
    holds ``dL/d(its rows)``; it returns ``W`` times that (see the module docstring, point 2).
    """

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, batch_size: int) -> torch.Tensor:
        world, me = world_size(), rank()
        sizes = shard_sizes(batch_size, world)
        held = [max(s, 1) for s in sizes]  # an empty shard holds one stand-in row per view
        num_views = local.shape[0] // held[me]
        padded = local.new_zeros(num_views * max(held), *local.shape[1:])
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        per_rank = [p[: num_views * h].view(num_views, h, *local.shape[1:])[:, :s] for p, h, s in zip(parts, held, sizes)]
        ctx.rows, ctx.held, ctx.world, ctx.num_views = _shard_slices(batch_size, world)[me], held[me], world, num_views
        ctx.batch_size = batch_size
        return torch.cat(per_rank, dim=1).reshape(num_views * batch_size, *local.shape[1:])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        views = grad.view(ctx.num_views, ctx.batch_size, *grad.shape[1:])
        mine = grad.new_zeros(ctx.num_views, ctx.held, *grad.shape[1:])
        count = ctx.rows.stop - ctx.rows.start
        mine[:, :count] = views[:, ctx.rows]
        return (mine * ctx.world).reshape(ctx.num_views * ctx.held, *grad.shape[1:]), None


def gather_global_batch(predictions: Any, batch_size: int) -> Any:
    """This rank's predictions (a tensor or a mapping of tensors, ``(V n_r, ...)``) -> the global batch's,
    ``(V N, ...)`` in the single-process row order, differentiable (see :class:`_GatherRows`)."""
    if world_size() == 1:
        return predictions
    if isinstance(predictions, Mapping):
        return {k: gather_global_batch(v, batch_size) for k, v in predictions.items()}
    if isinstance(predictions, torch.Tensor):
        return _GatherRows.apply(predictions, batch_size)
    raise TypeError(f"cannot gather predictions of type {type(predictions).__name__}")


class GlobalBatchLoss(nn.Module):
    """``loss(gather_global_batch(pred), targets)``: the loss of the global batch, on every rank.

    Args:
        loss: the workflow's loss (GCLLoss, SimCLRLoss, DiceCELoss ...), called unchanged.
        shards: the :class:`ShardedPrepareBatch` that made the shard (it knows the global batch size).
    """

    def __init__(self, loss: Callable, shards: ShardedPrepareBatch) -> None:
        super().__init__()
        self.loss = loss
        self.shards = shards

    def forward(self, predictions: Any, targets: Any) -> Any:
        return self.loss(gather_global_batch(predictions, self.shards.batch_size), targets)

    @property
    def last_terms(self) -> dict[str, float]:
        return getattr(self.loss, "last_terms", {})


# ----------------------------------------------------------------------------------------------
# gradient averaging without DDP (pre-training)
# ----------------------------------------------------------------------------------------------


def _all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average ``tensors`` across ranks in place, with one flattened all-reduce."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))


class GradientAllReduce:
    """Averages gradients over ranks; a handler of :class:`~metacontrast.engines.MultiLossTrainer`.

    * ``PER_LOSS_GRADIENTS_COMPUTED``: each objective's gradient ``g_m`` (``engine.state.per_loss_grads``)
      becomes the global ``(1/W) Σ_r g_{m,r}``.  Attach this before GradMitigator (handlers run in the
      order they were attached) so that Algorithm 1 sees the global per-label gradients.
    * ``GRADIENTS_READY``: in steps without per-objective gradients, ``param.grad`` is averaged.
    """

    def __init__(self) -> None:
        self._averaged_iteration = -1

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(MultiLossEvents.PER_LOSS_GRADIENTS_COMPUTED, self.average_per_loss)
        engine.add_event_handler(MultiLossEvents.GRADIENTS_READY, self.average_parameters)

    def average_per_loss(self, engine: Engine) -> None:
        if world_size() > 1:
            _all_reduce_mean_([g for grads in engine.state.per_loss_grads.values() for g in grads])
        self._averaged_iteration = engine.state.iteration

    def average_parameters(self, engine: Engine) -> None:
        if world_size() == 1 or self._averaged_iteration == engine.state.iteration:
            return  # per-label gradients were averaged: param.grad is already the same on every rank
        params = [p for p in engine.network.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        _all_reduce_mean_([p.grad for p in params])


class DistributedPretraining:
    """Makes a pre-training ``MultiLossTrainer`` train on its shard of the global batch; attach it first.

    On ``attach`` a :class:`GradientAllReduce` is attached (before the method's handlers, GradMitigator
    among them).  When the run starts (before any other ``STARTED`` handler, e.g. a checkpoint resume),
    the trainer's ``prepare_batch`` becomes a :class:`ShardedPrepareBatch`, its loss a
    :class:`GlobalBatchLoss` (MONAI sets the loss after registering handlers, hence not on ``attach``), and
    rank 0's weights are copied to every rank.  With one process it changes nothing.
    """

    def attach(self, engine: Engine) -> None:
        if world_size() == 1:
            return
        GradientAllReduce().attach(engine)
        engine.add_event_handler(Events.STARTED, self.distribute)

    @staticmethod
    def distribute(engine: Engine) -> None:
        if not isinstance(engine.prepare_batch, ShardedPrepareBatch):
            shards = ShardedPrepareBatch(engine.prepare_batch)
            engine.prepare_batch = shards
            engine.loss_function = GlobalBatchLoss(engine.loss_function, shards)
        broadcast_parameters(engine.network)


# ----------------------------------------------------------------------------------------------
# rank 0 logs and writes
# ----------------------------------------------------------------------------------------------


class _RankedCheckpointer:
    """A ``TrainingCheckpointer`` on several ranks: rank 0 resumes (setting damaged files aside) and saves;
    the others wait for it, then resume from the same file, and never save."""

    def __init__(self, checkpointer: Any) -> None:
        self.checkpointer = checkpointer

    def attach(self, engine: Engine) -> None:
        barrier = lambda _: dist.barrier() if world_size() > 1 else None
        if is_leader():
            self.checkpointer.attach(engine)  # resume is its first STARTED handler
            engine.add_event_handler(Events.STARTED, barrier)
        else:
            engine.add_event_handler(Events.STARTED, barrier)
            engine.add_event_handler(Events.STARTED, self.checkpointer.resume)


#: handlers of ignite and MONAI that only show, log or write (the package's own say so with ``leader_only``)
OUTPUT_ONLY_TYPES = (ProgressBar, CheckpointSaver, StatsHandler, ValidationHandler)


def _output_only(handler: Any) -> bool:
    """Whether a handler only shows, logs or writes (dropped on ranks other than 0; see :mod:`metacontrast.ranks`)."""
    return isinstance(handler, OUTPUT_ONLY_TYPES) or bool(getattr(handler, "leader_only", False))


def for_rank(handlers: Sequence[Any]) -> list[Any]:
    """The trainer handlers this rank runs.

    Rank 0 runs them all.  Other ranks drop the ones that only show, log or write (progress bar,
    loss-term and MLflow logging, encoder and model savers, validation -- validation runs on rank 0 alone)
    and keep everything that changes training (LR schedule, ...), so no rank's state can drift.  A
    ``TrainingCheckpointer`` resumes on every rank (rank 0 first) and saves on rank 0 only.
    """
    wrap = lambda h: _RankedCheckpointer(h) if getattr(h, "resumes_on_every_rank", False) else h
    if is_leader():
        return [wrap(h) for h in handlers]
    return [wrap(h) for h in handlers if not _output_only(h)]
