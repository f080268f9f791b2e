"""The memory plans mim3d chooses (issue 17): for GPU budgets of 3, 8, 24 and 80 GB and for this machine's free RAM
(cgroup-capped), what default pre-training (MiM base and small), default fine-tuning (mim-unetr base and small, and
base with a frozen encoder) and segmentation (base and small mim-unetr on a 512×512×300 CT at 1.5×1.5×2 mm, whose
model grid is then 512×512×300) choose, or the refusal they print. Nothing is trained: the plans come from the same
functions the commands call (``pretrain.plan_memory``, ``finetune.plan_memory``, ``inference.plans.choose_plan``), on
budgets given to them. Training steps are traced in float32, so the GPU figures are upper bounds (bf16 autocast keeps
smaller activations); a GPU budget is a card's free memory, not its size. Prints one JSON object on stdout and a
Markdown table on stderr.

    python bench/bench_plans.py            # 100 s on 2 busy cores (base models are traced with fake tensors)
    python bench/bench_plans.py --quick    # small presets, the 3 GB GPU and the CPU only: about 25 s
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from mim3d import memory
from mim3d.devices import GpuProperties
from mim3d.errors import BadInputError
from mim3d.inference import plans as segment_plans
from mim3d.models import build_pretrainer, build_segmenter
from mim3d.run_options import FinetuneOptions, PretrainOptions
from mim3d.training import finetune, pretrain
from mim3d.training.encoder_modes import EncoderMode

GB = 10**9
GPU_BUDGETS_GB = (3, 8, 24, 80)
NUM_CLASSES = 14  # BTCV's 13 organs and the background
CT_GRID = (512, 512, 300)  # a 512×512×300 CT at 1.5×1.5×2 mm, segmented at that spacing
GPU = GpuProperties("an Ampere or later GPU", 8, 0, 80 * GB)  # bf16: what the budgets are planned for


def budgets(quick: bool) -> dict[str, memory.Budget]:
    gpu = GPU_BUDGETS_GB[:1] if quick else GPU_BUDGETS_GB
    return {**{f"gpu {g} GB": memory.Budget(g * GB, f"{g} GB free on the GPU") for g in gpu},
            "cpu": memory.host_budget()}


def training_plan(plan_memory, budget: memory.Budget) -> dict:
    try:
        chosen = plan_memory(budget)
    except BadInputError as refused:
        return {"fits": False, "message": str(refused)}
    return {"fits": True, "activation_checkpointing": chosen.activation_checkpointing,
            "estimate_gb": round(chosen.footprint.total / GB, 2), "message": chosen.describe()}


def pretrain_job(preset: str):
    opts = PretrainOptions(method="mim", preset=preset)
    return lambda budget: pretrain.plan_memory(opts, build_pretrainer("mim", preset), budget)


def finetune_job(preset: str, encoder: str):
    opts = FinetuneOptions(arch="mim-unetr", preset=preset, encoder=encoder)

    def plan(budget):
        model = build_segmenter("mim-unetr", NUM_CLASSES, preset, opts.roi, 1)
        mode = EncoderMode.of(encoder, model, "mim-unetr", 1000)
        return finetune.plan_memory(opts, model, mode, NUM_CLASSES, budget)
    return plan


def segment_plan(preset: str, name: str, budget: memory.Budget) -> dict:
    roi = (96, 96, 96)
    model = build_segmenter("mim-unetr", NUM_CLASSES, preset, roi, 1).eval()
    footprint = segment_plans.Footprint.of(model, CT_GRID, roi, NUM_CLASSES, tta=False)
    device = torch.device("cpu" if name == "cpu" else "cuda:0")
    host = memory.host_budget()
    try:
        plan, sentence = segment_plans.choose_plan(device, footprint, gpu=GPU,
                                                   budget=lambda d: budget if d.type == device.type else host)
    except BadInputError as refused:
        return {"fits": False, "message": str(refused)}
    return {"fits": True, "device": plan.device.type, "output_device": plan.output_device.type,
            "window_batch": plan.sw_batch_size, "slab_planes": plan.slab_planes, "message": sentence}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small presets, one GPU budget, no frozen encoder")
    args = parser.parse_args(argv)
    presets = ("small",) if args.quick else ("base", "small")
    jobs = {**{f"pretrain mim {p}": pretrain_job(p) for p in presets},
            **{f"finetune mim-unetr {p}": finetune_job(p, "full") for p in presets}}
    if not args.quick:
        jobs["finetune mim-unetr base frozen"] = finetune_job("base", "frozen")
    started = time.perf_counter()
    rows = {}
    for name, budget in budgets(args.quick).items():
        row = {job: training_plan(plan, budget) for job, plan in jobs.items()}
        row |= {f"segment mim-unetr {p}": segment_plan(p, name, budget) for p in presets}
        rows[name] = {"budget_gb": round(budget.bytes / GB, 2), "source": budget.source, "plans": row}
    result = {"benchmark": "plans", "quick": args.quick, "num_classes": NUM_CLASSES, "ct_grid": CT_GRID,
              "budgets": rows, "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(result, indent=1))
    print(table(result), file=sys.stderr)
    return result


def table(result: dict) -> str:
    """One line per job, one column per budget: 'ckpt' / 'plain' and the estimate, 'no' for a refusal; segmentation:
    the window batch and where the logits are."""
    names = list(result["budgets"])
    jobs = list(result["budgets"][names[0]]["plans"])
    lines = ["| job | " + " | ".join(f"{n} ({result['budgets'][n]['budget_gb']} GB)" for n in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for job in jobs:
        cells = []
        for n in names:
            p = result["budgets"][n]["plans"][job]
            if not p["fits"]:
                cells.append("refused")
            elif "window_batch" in p:
                out = "" if p["output_device"] == p["device"] else ", logits in RAM"
                cells.append(f"{p['device']}, {p['window_batch']} window(s){out}")
            else:
                cells.append(f"{'checkpointing' if p['activation_checkpointing'] else 'plain'}, "
                             f"{p['estimate_gb']} GB")
        lines.append(f"| {job} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
