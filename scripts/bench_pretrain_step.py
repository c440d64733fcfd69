"""Time one GCL pre-training step against a plain two-view contrastive step on the same batch.

    python scripts/bench_pretrain_step.py                       # CPU scale: widths 16..256, 96x96, batch 48
    python scripts/bench_pretrain_step.py --scale full          # paper scale: widths 32..512, 192x192
    python scripts/bench_pretrain_step.py --dataset_dir /data/ACDC/training --datalist data_manifests/acdc.json

Each variant runs ``steps`` iterations of the real ``MultiLossTrainer`` on one fixed batch (two views
per slice, so 2 x batch images per step) after ``warmup`` iterations, and prints images/s, the ratio to
the plain step, and the peak memory.  Variants: ``plain`` (NT-Xent, one backward), ``gcl_sum`` (GCL
losses, plain average, one backward), ``gcl`` (GradMitigator: one backward per meta label; GradFilter on).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402
import torch  # noqa: E402

from metacontrast.data.augment import BatchAugmentation  # noqa: E402
from metacontrast.engines import GradFilter, GradMitigator, MultiLossTrainer, TwoViewPrepareBatch  # noqa: E402
from metacontrast.losses import GCLLoss, PixelContrastiveLoss, nt_xent  # noqa: E402
from metacontrast.nets import EncoderWithHeads, ProjectionHead, UNetEncoder, pooled_embedding  # noqa: E402

SCALES = {"cpu": ((16, 32, 64, 128, 256), 96), "full": ((32, 64, 128, 256, 512), 192)}
META = ("patient_id", "slice_quantile", "organ_state")


def _batch(batch_size: int, size: int, dataset_dir: str, datalist: str) -> dict[str, torch.Tensor]:
    """A meta-labelled batch: real slices from a manifest when given, else noise with GLCL-style meta labels."""
    if dataset_dir and datalist:
        from metacontrast.workflows.data import PretrainData

        data = PretrainData(datalist, dataset_dir, "bench", meta_labels=META, batch_size=batch_size,
                            preprocessing_overrides={"bench": {"pixel_size": [1.367 * 192 / size] * 2, "spatial_size": [size, size]}})
        return next(iter(data.loader))
    volumes = batch_size // 4
    return {"image": torch.rand(batch_size, 1, size, size), "patient_id": torch.arange(volumes).repeat_interleave(4) // 2,
            "slice_quantile": torch.arange(4).repeat(volumes), "organ_state": torch.arange(volumes).repeat_interleave(4) % 2}


class _PlainLoss(torch.nn.Module):
    last_terms: dict = {}

    def forward(self, outputs, meta):
        return {"views": nt_xent(pooled_embedding(outputs["img"]), 0.1)}


def _time_variant(variant: str, features, batch, device, steps: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    encoder = UNetEncoder(features=features)
    width = features[-1]
    network = EncoderWithHeads(encoder, {"img": ProjectionHead(width, width, 128), "pix": ProjectionHead(width, width, 128)}).to(device)
    grad_filter = GradFilter(total_steps=100)
    handlers = []
    if variant == "plain":
        loss = _PlainLoss()
    else:
        loss = GCLLoss(META, 0.1, PixelContrastiveLoss(0.1, 0.3, grad_filter))
        handlers = [grad_filter] + ([GradMitigator(0.01)] if variant == "gcl" else [])
    trainer = MultiLossTrainer(
        device=device, max_epochs=1, train_data_loader=[batch] * (steps + warmup), network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9), loss_function=loss,
        prepare_batch=TwoViewPrepareBatch(BatchAugmentation(seed=0).two_views, META), train_handlers=handlers, decollate=False,
    )
    times: list[float] = []
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: times.append(time.perf_counter()))
    trainer.add_event_handler(Events.COMPLETED, lambda e: times.append(time.perf_counter()))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.run()
    step = (times[-1] - times[warmup]) / steps
    images = 2 * batch["image"].shape[0]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": step, "images_per_s": images / step, "peak_mem_mib": peak}


def main(scale: str = "cpu", batch_size: int = 48, steps: int = 5, warmup: int = 2, device: str = "",
         dataset_dir: str = "", datalist: str = "", threads: int = 0, output: str = "") -> dict:
    """Print (and optionally save as JSON) the timing of each variant."""
    features, size = SCALES[scale]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads:
        torch.set_num_threads(threads)
    batch = _batch(batch_size, size, dataset_dir, datalist)
    results = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
               "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "scale": scale, "features": list(features), "image_size": size, "batch_slices": batch_size,
               "load_average_at_start": os.getloadavg()[0], "variants": {}}
    for variant in ("plain", "gcl_sum", "gcl"):
        results["variants"][variant] = _time_variant(variant, features, batch, device, steps, warmup)
    plain = results["variants"]["plain"]["step_s"]
    print(f"device {results['device']} ({results['threads']} threads), scale {scale}: widths {features}, {size}x{size}, "
          f"{batch_size} slices x 2 views per step; load average at start {results['load_average_at_start']:.2f}")
    for name, r in results["variants"].items():
        r["relative_to_plain"] = r["step_s"] / plain
        print(f"  {name:8s} {r['step_s'] * 1000:8.1f} ms/step  {r['images_per_s']:8.1f} images/s  "
              f"{r['relative_to_plain']:.2f}x plain  peak {r['peak_mem_mib']:.0f} MiB")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    fire.Fire(main)
