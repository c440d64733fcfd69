"""Each meta-label image term's chance level, single-label minimum, and value alone and at the joint optimum.

    python scripts/joint_optimum.py --dataset acdc --dataset_dir /data/ACDC/training

Free embeddings (one vector per slice of the pre-training split) optimised with Adam on the batches the
bundle's sampler draws (see ``metacontrast/reporting/joint_optimum.py``); writes
``results/<dataset>/joint_optimum.json``, which the pre-training curves draw as horizontal lines.  The
default config is GCL's pre-training under the CPU preset.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402

from metacontrast.reporting.joint_optimum import joint_optimum, write_joint_optimum  # noqa: E402

DEFAULT_CONFIG = ("bundles/gcl/configs/pretrain.json", "bundles/common/configs/presets/cpu.json")


def main(dataset: str = "acdc", dataset_dir: str = "", config_file: tuple[str, ...] | str = DEFAULT_CONFIG, out: str = "",
         steps: int = 3000, lr: float = 0.05, train_epochs: int = 50, eval_epochs: int = 20, seed: int = 0,
         cache_dir: str = ".cache/slices", max_volumes: int = 0) -> None:
    overrides = {"dataset": dataset, "cache_dir": cache_dir, "max_volumes": max_volumes}
    if dataset_dir:
        overrides["dataset_dir"] = dataset_dir
    result = joint_optimum(config_file, steps=steps, lr=lr, train_epochs=train_epochs, eval_epochs=eval_epochs, seed=seed, **overrides)
    path = write_joint_optimum(result, out or Path("results") / dataset / "joint_optimum.json")
    for name, values in result["terms"].items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
    print(f"joint mean {result['joint_mean']:.3f}; written {path}")


if __name__ == "__main__":
    fire.Fire(main)
