"""Time one pre-training step of every method, and GCL's step against its floor, on one fixed batch.

    python scripts/bench_pretrain_step.py --out results/benchmarks/pretrain_step_cpu.json     # CPU scale, batch 48
    python scripts/bench_pretrain_step.py --scale full --device cuda --amp bf16 --out results/benchmarks/pretrain_step_h200.json
    python scripts/bench_pretrain_step.py --methods '[plain,floor,gcl,simclr]' --batched_gradients True

Each variant runs ``warmup + steps`` iterations of the real ``MultiLossTrainer`` on one fixed batch (two
views per slice, so 2 x batch images per step); each timed iteration is bracketed by a device
synchronisation (CUDA) and the median is reported with the fastest and slowest iteration as the spread.
Variants:

* ``plain``: NT-Xent on the GCL network, one backward pass;
* ``floor``: the same step with ``M - 1`` further backward passes through the encoder (one gradient per
  meta label, ``M = 3``, as Algorithm 1 needs), the least an exact GCL step can cost;
* ``gcl_sum``: GCL's losses, plain average, one backward pass (GradMitigator off); ``gcl``: the full step;
* ``simclr``, ``spcl``, ``glcl`` (its local stage), ``macl``, ``ideal``: each bundle's network, loss, handlers
  and batch preparation built from its own ``bundles/<method>/configs/pretrain.json`` (optimizer there too).

``gcl`` is reported as a ratio to ``floor`` (the target is 1.15x).  Peak memory: CUDA's
``max_memory_allocated`` per variant, or the process's peak resident set on the CPU (monotone over variants).
The batch is noise with ACDC-like meta labels unless ``--dataset_dir``/``--datalist`` give real slices.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402
import torch  # noqa: E402
from ignite.engine import Events  # noqa: E402

from metacontrast.data.augment import BatchAugmentation  # noqa: E402
from metacontrast.engines import GradFilter, GradMitigator, MultiLossTrainer, TwoViewPrepareBatch  # noqa: E402
from metacontrast.losses import GCLLoss, PixelContrastiveLoss, nt_xent  # noqa: E402
from metacontrast.nets import EncoderWithHeads, ProjectionHead, UNetEncoder, pooled_embedding  # noqa: E402
from metacontrast.reporting.grid import method_names  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCALES = {"cpu": ((16, 32, 64, 128, 256), 96), "full": ((32, 64, 128, 256, 512), 192)}
META = ("patient_id", "slice_quantile", "organ_state")
BUNDLES = ("simclr", "spcl", "glcl", "macl", "ideal")
METHODS = ("plain", "floor", "gcl_sum", "gcl", *BUNDLES)


def _batch(batch_size: int, size: int, dataset_dir: str, datalist: str) -> dict[str, torch.Tensor]:
    """A meta-labelled batch: real slices from a manifest when given (the loader yields every meta key), else noise with ACDC-like meta labels."""
    if dataset_dir and datalist:
        from metacontrast.workflows.data import PretrainData

        data = PretrainData(datalist, dataset_dir, "bench", meta_labels=META, batch_size=batch_size,
                            preprocessing_overrides={"bench": {"pixel_size": [1.367 * 192 / size] * 2, "spatial_size": [size, size]}})
        return next(iter(data.loader))
    volumes = batch_size // 4
    return {"image": torch.rand(batch_size, 1, size, size), "patient_id": torch.arange(volumes).repeat_interleave(4) // 2,
            "slice_quantile": torch.arange(4).repeat(volumes), "organ_state": torch.arange(volumes).repeat_interleave(4) % 2,
            "slice_position": (torch.arange(4).repeat(volumes) / 3.0).float(), "volume_index": torch.arange(volumes).repeat_interleave(4)}


class _ViewsLoss(torch.nn.Module):
    """NT-Xent on the pooled ``img`` head, returned under ``copies`` names (one objective per meta label).

    With ``copies = M`` and the trainer's per-objective path, the step takes one forward pass and M backward
    passes: the floor of an exact GCL step (Algorithm 1 needs one gradient per meta label).
    """

    last_terms: dict = {}

    def __init__(self, copies: int = 1) -> None:
        super().__init__()
        self.copies = copies

    def forward(self, outputs: dict[str, torch.Tensor], meta) -> dict[str, torch.Tensor]:
        loss = nt_xent(pooled_embedding(outputs["img"]), 0.1)
        return {f"views{m}": loss for m in range(self.copies)}


class _PerObjectiveGradients:
    """A handler that only asks the trainer for one gradient per objective (what GradMitigator costs the trainer)."""

    def attach(self, engine) -> None:
        engine.state.per_loss_gradients_required = True


def _gcl_parts(method: str, features, device) -> dict:
    """The GCL network (also used by ``plain``/``floor``), its loss and handlers, as in ``bundles/gcl``."""
    torch.manual_seed(0)
    width = features[-1]
    network = EncoderWithHeads(UNetEncoder(features=features), {"img": ProjectionHead(width, width, 128), "pix": ProjectionHead(width, width, 128)})
    grad_filter = GradFilter(total_steps=100)
    handlers, loss = [], None
    if method == "plain":
        loss = _ViewsLoss()
    elif method == "floor":
        loss, handlers = _ViewsLoss(len(META)), [_PerObjectiveGradients()]
    else:
        loss = GCLLoss(META, 0.1, PixelContrastiveLoss(0.1, 0.3, grad_filter))
        handlers = [grad_filter] + ([GradMitigator(0.01)] if method == "gcl" else [])
    network = network.to(device)
    return {"network": network, "loss": loss, "handlers": handlers, "meta_keys": META,
            "optimizer": torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9),
            "prepare_batch": TwoViewPrepareBatch(BatchAugmentation(seed=0).two_views, META)}


def _bundle_parts(method: str, features, device) -> dict:
    """Network, loss, handlers, optimizer and batch preparation parsed from ``bundles/<method>/configs/pretrain.json``."""
    from monai.bundle import ConfigParser

    torch.manual_seed(0)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / method / "configs" / "pretrain.json"))
    parser.update({"dataset": "acdc", "features": list(features), "device": str(device), "runs_dir": "/tmp", "output_dir": "/tmp"})
    parts = {key: parser.get_parsed_content(key) for key in ("network", "loss", "method_handlers", "optimizer", "prepare_batch")}
    parts["handlers"] = parts.pop("method_handlers")
    return parts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_method(method: str, features, batch, device, steps: int, warmup: int, amp: str, batched_gradients: bool) -> dict:
    parts = (_bundle_parts if method in BUNDLES else _gcl_parts)(method, features, device)
    trainer = MultiLossTrainer(
        device=device, max_epochs=1, train_data_loader=[batch] * (steps + warmup), network=parts["network"],
        optimizer=parts["optimizer"], loss_function=parts["loss"], prepare_batch=parts["prepare_batch"],
        train_handlers=parts["handlers"], decollate=False, amp=bool(amp),
        amp_kwargs={"dtype": torch.bfloat16} if amp == "bf16" else None, batched_gradients=batched_gradients,
    )
    stamps: list[float] = []

    def stamp(_engine) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    trainer.add_event_handler(Events.ITERATION_STARTED, stamp)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, stamp)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=warmup) if warmup > 0 else Events.STARTED, lambda e: torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None)
    trainer.run()
    timed = [end - start for start, end in zip(stamps[0::2][warmup:], stamps[1::2][warmup:])]
    step = statistics.median(timed)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": step, "step_s_min": min(timed), "step_s_max": max(timed), "iterations_timed": len(timed),
            "images_per_s": 2 * batch["image"].shape[0] / step, "peak_mem_mib": peak}


def main(scale: str = "cpu", batch_size: int = 48, steps: int = 5, warmup: int = 2, device: str = "", amp: str = "",
         methods: tuple[str, ...] | str = ("plain", "floor", "gcl_sum", "gcl"), batched_gradients: bool = False,
         dataset_dir: str = "", datalist: str = "", threads: int = 0, out: str = "") -> None:
    """Time each method's step; print a table last and optionally save JSON to ``out``."""
    methods = method_names(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if amp not in ("", "bf16"):
        raise ValueError(f"amp must be '' or 'bf16', got {amp!r}")
    features, size = SCALES[scale]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads:
        torch.set_num_threads(threads)
    batch = _batch(batch_size, size, dataset_dir, datalist)
    results = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
               "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "amp": amp or None,
               "batched_gradients": batched_gradients, "scale": scale, "features": list(features), "image_size": size,
               "batch_slices": batch_size, "meta_labels": len(META), "load_average_at_start": os.getloadavg()[0], "variants": {}}
    for method in methods:
        results["variants"][method] = _time_method(method, features, batch, device, steps, warmup, amp, batched_gradients)
    results["load_average_at_end"] = os.getloadavg()[0]
    variants = results["variants"]
    for r in variants.values():
        if "plain" in variants:
            r["relative_to_plain"] = r["step_s"] / variants["plain"]["step_s"]
        if "floor" in variants:
            r["relative_to_floor"] = r["step_s"] / variants["floor"]["step_s"]
    if "gcl" in variants and "floor" in variants:
        results["gcl_over_floor"] = variants["gcl"]["relative_to_floor"]
        results["gcl_within_target_1.15"] = results["gcl_over_floor"] <= 1.15
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"device {results['device']} ({results['threads']} threads, amp {amp or 'off'}), scale {scale}: widths {features}, "
          f"{size}x{size}, {batch_size} slices x 2 views; load average {results['load_average_at_start']:.2f} -> {results['load_average_at_end']:.2f}")
    print(f"  {'method':8s} {'ms/step':>8s} {'(min-max)':>15s} {'images/s':>9s} {'x plain':>8s} {'x floor':>8s} {'peak MiB':>9s}")
    for name, r in variants.items():
        spread = "({:.0f}-{:.0f})".format(r["step_s_min"] * 1000, r["step_s_max"] * 1000)
        print(f"  {name:8s} {r['step_s'] * 1000:8.1f} {spread:>15s} {r['images_per_s']:9.1f} "
              f"{r.get('relative_to_plain', float('nan')):8.2f} {r.get('relative_to_floor', float('nan')):8.2f} {r['peak_mem_mib']:9.0f}")


if __name__ == "__main__":
    fire.Fire(main)
