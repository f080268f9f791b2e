"""Fine-tuning with the encoder full, frozen or gradually unfrozen (`mim3d finetune --encoder`): seconds per step,
peak memory, and validation Dice on the unseen DICOM series at an equal wall-clock budget, one seed. Prints one JSON
object (also written to --out/results.json).

The data and CPU plan are the demo's (``mim3d.demo``; see bench_pretraining_benefit.py): a short MiM pre-training
on the two example CTs gives the encoder, then each mode fine-tunes the reduced ``small`` mim-unetr on ``example_ct``
with TotalSegmentator's six organs, validated on the DICOM series (another person, its labels never trained on).

1. Step cost: each mode runs --probe-steps steps, stopped through RUN_DIR/STOP (so no validation runs); seconds per
   step are the median of the per-step intervals of metrics.jsonl (a step is an epoch here: one training case, so
   each holds its checkpoint write), peak memory is the worker process's maximum RSS (getrusage) and, on CUDA,
   torch.cuda.max_memory_allocated. gradual is probed during its frozen first quarter; once every stage is
   unfrozen it costs what full does.
2. Dice at equal wall-clock: each mode gets --budget seconds of training, turned into a step count from its probed
   step time (gradual: the mean over its four phases, taking the phases with stages unfrozen at full's cost), and
   runs that many steps (--epochs = --max-steps, so gradual's schedule spans exactly them), validated at the end.

    python bench/bench_finetune_modes.py --out runs/finetune-modes            # ~8 min on 2 idle cores
    python bench/bench_finetune_modes.py --out /tmp/fm --quick                # seconds: the same path, tiny
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_pretraining_benefit import VALIDATION_CASE, _labelled_inputs, _prepare_out, _present_organs

from mim3d import example_data
from mim3d.demo import ORGANS, PLANS
from mim3d.runs import read_metrics
from mim3d.training.encoder_modes import UNFREEZE_AT

MODES = ("full", "frozen", "gradual")
# The worker, run in a child process so that its peak RSS and CUDA peak are its own.
CHILD = """
import json, resource, sys
from mim3d.__main__ import main
code = main(sys.argv[2:])
peak = {"rc": code, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
try:
    import torch
    if torch.cuda.is_initialized():
        peak["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
except ImportError:
    pass
open(sys.argv[1], "w").write(json.dumps(peak))
"""


def main() -> None:
    args = _parse_args()
    plan = PLANS["gpu" if args.device == "cuda" else "cpu"]
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    out = _prepare_out(Path(args.out), ".bench-finetune-modes")
    started = time.perf_counter()
    inputs = _labelled_inputs(example_data.ensure(), out / "inputs")
    present = _present_organs(inputs["labels"] / f"{VALIDATION_CASE}.nii.gz")
    encoder = out / "pretrain"
    pretrain_s = _worker(["pretrain", "--data", str(inputs["pretrain"]), "--method", "mim", *plan["model"],
                          "--out", str(encoder), "--epochs", str(max(1, args.pretrain_steps // 2)), "--max-steps",
                          str(args.pretrain_steps), "--lr", "1e-4", "--device", args.device], out / "pretrain.json")
    probes = {mode: _probe(mode, inputs, encoder, out, args, plan) for mode in MODES}
    step_s = {"full": probes["full"]["seconds_per_step"], "frozen": probes["frozen"]["seconds_per_step"]}
    frozen_share = UNFREEZE_AT[0]  # gradual's first stage unfreezes here; from then on, counted at full's cost
    step_s["gradual"] = frozen_share * probes["gradual"]["seconds_per_step"] + (1 - frozen_share) * step_s["full"]
    runs = {mode: _budget_run(mode, inputs, encoder, out, args, plan, step_s[mode], present) for mode in MODES}
    results = {"benchmark": "finetune_modes", "quick": args.quick, "device": args.device, "threads": args.threads,
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "python": platform.python_version()},
               "data": {"train": "example_ct", "validation": VALIDATION_CASE, "organs": [n for _, n in ORGANS.values()],
                        "organs_in_validation_reference": present},
               "plan": {"model": plan["model"], "spacing": plan["spacing"], "roi": plan["roi"],
                        "samples_per_volume": plan["samples"], "lr": plan["finetune_lr"], "seed": 0,
                        "pretrain_steps": args.pretrain_steps, "pretrain_seconds": pretrain_s,
                        "budget_seconds": args.budget},
               "probe": probes, "equal_budget": runs, "seconds": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(results))


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (new or empty; an earlier result is replaced)")
    parser.add_argument("--quick", action="store_true", help="a few steps and seconds: checks the path only")
    parser.add_argument("--pretrain-steps", type=int, default=20, help="MiM pre-training steps (default 20)")
    parser.add_argument("--probe-steps", type=int, default=5, help="steps timed per mode (default 5)")
    parser.add_argument("--budget", type=float, default=80.0,
                        help="training seconds per mode in the Dice comparison (default 80)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of the workers (default 2)")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_steps, args.probe_steps, args.budget = 1, 2, 4.0
    return args


def _finetune_args(mode: str, inputs: dict, encoder: Path, run: Path, plan: dict, args, steps: int) -> list[str]:
    label_map = json.dumps({str(k): v for k, (v, _) in ORGANS.items()})
    return ["finetune", "--images", str(inputs["images"]), "--labels", str(inputs["labels"]), "--label-table",
            str(inputs["table"]), "--label-map", label_map, "--val-cases", VALIDATION_CASE, "--arch", "mim-unetr",
            *plan["model"], "--pretrained", str(encoder), "--encoder", mode, "--roi", *plan["roi"], "--spacing",
            *plan["spacing"], "--samples-per-volume", plan["samples"], "--lr", plan["finetune_lr"], "--epochs",
            str(steps), "--max-steps", str(steps), "--val-every", str(steps), "--out", str(run), "--device",
            args.device, "--log-every", "1", "--workers", "0", "--seed", "0"]


def _worker(argv: list[str], peak_file: Path, stop_after: int | None = None, run: Path | None = None) -> float:
    """Run `mim3d ARGV` in a child process; with `stop_after`, touch RUN_DIR/STOP once that many steps are logged.
    Returns its wall seconds; its peaks are in `peak_file`."""
    print(f"[bench] mim3d {' '.join(argv[:1])} {' '.join(a for a in argv if a.startswith('--encoder'))}",
          file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "MiMSegmentation"),
                                                        os.environ.get("PYTHONPATH", "")])}
    begin = time.perf_counter()
    with open(peak_file.with_suffix(".log"), "w") as log:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(peak_file), *argv], stdout=subprocess.DEVNULL,
                                 stderr=log, env=env)
        while child.poll() is None:
            time.sleep(0.5)
            if stop_after and (run / "metrics.jsonl").exists() and _steps(run) >= stop_after:
                (run / "STOP").touch()
                stop_after = None
    if child.returncode != 0:
        sys.exit(f"[bench] worker failed ({child.returncode}); see {peak_file.with_suffix('.log')}")
    return round(time.perf_counter() - begin, 1)


def _steps(run: Path) -> int:
    return sum(1 for m in read_metrics(run) if m.get("kind") == "train")


def _step_seconds(run: Path) -> list[float]:
    """Seconds of each logged step after the first (samples_per_second is over one step at --log-every 1)."""
    train = [m for m in read_metrics(run) if m.get("kind") == "train"][1:]
    return [1.0 / m["samples_per_second"] for m in train if m.get("samples_per_second")]


def _probe(mode: str, inputs: dict, encoder: Path, out: Path, args, plan: dict) -> dict:
    run = out / f"probe-{mode}"
    _worker(_finetune_args(mode, inputs, encoder, run, plan, args, steps=100 * args.probe_steps),
            out / f"probe-{mode}.json", stop_after=args.probe_steps, run=run)
    steps = _step_seconds(run)
    config = json.loads((run / "config.json").read_text())["encoder"]
    return {"seconds_per_step": round(statistics.median(steps), 3) if steps else None, "steps_timed": len(steps),
            **json.loads((out / f"probe-{mode}.json").read_text()), "parameters": config["parameters"]}


def _budget_run(mode: str, inputs: dict, encoder: Path, out: Path, args, plan: dict, step_s: float,
                present: list[str]) -> dict:
    steps = max(4, round(args.budget / step_s))
    run = out / f"budget-{mode}"
    seconds = _worker(_finetune_args(mode, inputs, encoder, run, plan, args, steps), out / f"budget-{mode}.json")
    metrics = read_metrics(run)
    final = [m for m in metrics if m.get("kind") == "validation"][-1]
    trained = sum(_step_seconds(run))
    dice = final["dice"]
    present_scores = [dice[n] for n in present if dice.get(n) is not None]
    return {"steps": steps, "training_seconds_measured": round(trained, 1), "wall_seconds": seconds,
            "mean_dice": final["mean_dice"], "mean_dice_present": round(statistics.mean(present_scores), 4)
            if present_scores else None, "dice": dice, **json.loads((out / f"budget-{mode}.json").read_text())}


if __name__ == "__main__":
    main()
