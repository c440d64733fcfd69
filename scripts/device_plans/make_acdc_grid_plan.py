"""Write ``scripts/device_plans/acdc_paper_scale_grid.json``: the paper-scale ACDC grid of issue 19 (item 4).

    python scripts/device_plans/make_acdc_grid_plan.py

The rows' variant and recipe overrides are expanded from ``ablations.json``, ``random_init.json`` and
``recipes.json`` as the results grid expands them (:func:`metacontrast.reporting.grid.parse_method`);
``tests/test_device.py`` checks the written plan against them, so run this again after changing a row.
"""

import json
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from monai.bundle import ConfigParser  # noqa: E402

from metacontrast.reporting.grid import parse_method  # noqa: E402

GCL = "gcl/warmup_clip_pixel003_batch_norm_image_heads"  # issue 18's recipe row (bundles/gcl/docs/README.md)
SIMCLR = "simclr/warmup_clip_batch_norm"
RANDOM = "random/batch_norm"  # the reference: random init of the same (batch-norm) U-Net
SEEDS = range(5)
LABELED = (1, 2, 8)
EVALUATE_KEYS = set(ConfigParser.load_config_file(REPO / "bundles/common/configs/evaluate.json"))
HALF = ("import torch, pathlib; [torch.save({{**c, 'state_dict': {{k: v.half() for k, v in c['state_dict'].items()}}}}, "
        "p.with_name('encoder_fp16.pt')) for p in pathlib.Path('{runs}/acdc').glob('*/*/pretrain/encoder.pt') "
        "for c in [torch.load(p, map_location='cpu')]]")


def store(stage: str) -> str:
    """Each stage logs to a store of its own (stages of a group run at once); the importer merges them."""
    return f"sqlite:///{{runs}}/acdc/stores/{stage}/mlruns.db"


def pairs(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]


def bundle_run(config: str, options: list[str]) -> list[str]:
    return ["{python}", "-m", "monai.bundle", "run", "--config_file", config, "--dataset", "acdc", "--dataset_dir", "{data}/acdc_pack",
            "--runs_dir", "{runs}", "--device", "cuda", *options]


def pretrain(method: str) -> dict:
    spec, name = parse_method(method), "pretrain_" + method.replace("/", "-")
    options = ["--method", method, "--tracking_uri", store(name), "--amp", "True", "--num_threads", "4", *pairs(spec.pretrain_overrides)]
    return {"name": name, "group": "pretrain", "timeout_s": 480, "argv": bundle_run(f"bundles/{spec.bundle}/configs/pretrain.json", options)}


def finetune(row: str, num_labeled: int, seed: int, group: str) -> dict:
    """Fine-tune, then score the test split from the pack, in one stage (the evaluation needs the fine-tune's model)."""
    spec = parse_method(row)
    name = f"finetune_{row.replace('/', '-').replace('@', '-')}_L{num_labeled}_seed{seed}"
    options = ["--method", row, "--num_labeled", str(num_labeled), "--seed", str(seed), "--tracking_uri", store(name), "--num_threads", "1"]
    own = {"finetune": spec.finetune_overrides, "evaluate": {k: v for k, v in spec.finetune_overrides.items() if k in EVALUATE_KEYS}}
    runs = [shlex.join(bundle_run(f"bundles/common/configs/{workflow}.json", options + pairs(own[workflow]))) for workflow in own]
    return {"name": name, "group": group, "timeout_s": 420, "argv": ["bash", "-c", " && ".join(runs)]}


def probe(method: str) -> dict:
    spec, name = parse_method(method), "probe_" + method.replace("/", "-")
    options = ["--method", method, "--seed", "0", "--tracking_uri", store(name), "--num_threads", "1"]
    return {"name": name, "group": "probe", "timeout_s": 480,
            "argv": bundle_run("bundles/common/configs/probe.json", options + (pairs(spec.finetune_overrides) if spec.bundle is None else []))}


def main() -> None:
    stages = [pretrain(GCL), pretrain(SIMCLR)]
    stages += [finetune(f"{row}@improved", n, s, f"finetune_L{n}") for n in LABELED for s in SEEDS for row in (RANDOM, GCL)]
    stages += [probe(RANDOM), probe(GCL), probe(SIMCLR)]
    stages += [finetune(f"{SIMCLR}@improved", n, s, f"finetune_simclr_L{n}") for n in LABELED for s in SEEDS]
    stages.append({"name": "encoders_fp16", "timeout_s": 60, "argv": ["{python}", "-c", HALF]})
    plan = {
        "_doc_": ("The paper-scale ACDC grid of issue 19, item 4, with the pre-training recipe issue 18 settled (docs/device.md; written by "
                  "make_acdc_grid_plan.py). In order of what it decides: GCL's recipe row and SimCLR's pre-trained at paper scale (300 "
                  "epochs, bf16) at once; random init and GCL's row fine-tuned under `improved` at L = 1, 2, 8 with 5 seeds, each scored "
                  "on the test split from the pack (10 at once); the probes of the three encoders; SimCLR's fine-tunes; half-precision "
                  "copies of the encoders (item 5). Each stage has its own store under {runs}/acdc/stores, merged by the importer. A call "
                  "cut by its budget is continued in the next one with --skip."),
        "stages": stages,
        "collect": [{"name": "runs", "path": "{runs}", "arcname": "runs",
                     "exclude": ["*/training_checkpoint_iteration=*.pt", "*/mlartifacts/*.pt", "*/L*_seed*/*.pt", "*/frozen_L*/*.pt",
                                 "*/probe_seed*/*.pt", "*/pretrain/encoder.pt", "*/predictions/*"]}],
    }
    out = REPO / "scripts/device_plans/acdc_paper_scale_grid.json"
    out.write_text(json.dumps(plan, indent=1) + "\n")
    print(f"{out}: {len(stages)} stages")


if __name__ == "__main__":
    main()
