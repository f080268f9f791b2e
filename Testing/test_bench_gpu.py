"""`bench/bench_gpu.py --device cpu --quick`: the GPU benchmark's every section runs (tiny sizes, on the CPU) as a
real subprocess and prints the JSON the full run prints on a GPU, so that the script cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"
STEP_KEYS = {"seconds_per_step", "samples_per_second", "flops_per_step", "mfu", "peak_allocated_gb",
             "peak_reserved_gb"}


def test_the_quick_cpu_form_runs_every_section_and_prints_one_json():
    done = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--quick"], capture_output=True, text=True,
                          encoding="utf-8", timeout=900, env={**os.environ, "PYTHONUTF8": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["benchmark"] == "gpu" and result["quick"] is True

    env = result["environment"]
    assert env["device"] == "cpu" and env["precision"] in ("bf16", "fp32") and env["cudnn"] is None
    assert set(env["segment_plans"]) == {"3 GB", "8 GB", "24 GB", "80 GB"}
    assert all(plan.startswith("plan: cpu, 1 window(s) per pass, ") for plan in env["segment_plans"].values())

    runs = {(r["method"], r["batch"], r["activation_checkpointing"]) for r in result["pretrain"]}
    assert runs == {("mim", 1, False), ("mim", 1, True), ("mae", 1, False), ("simmim", 1, False)}
    for r in result["pretrain"] + result["finetune"]:
        assert set(r) >= STEP_KEYS and r["seconds_per_step"] > 0 and r["flops_per_step"] > 0
        assert r["mfu"] is None  # no bf16 peak is known for a CPU

    profile = result["profile"]
    assert 0 < len(profile["top"]) <= 15 and all(0 < k["share"] <= 1 for k in profile["top"])
    assert 0 <= profile["depthwise_share"] <= 1 and 0 <= profile["copy_share"] <= 1

    terms = {"loss", "reconstruction_level1", "reconstruction_level2", "reconstruction_level3", "alignment_level1_2",
             "alignment_level2_3", "grad_norm"}
    assert set(result["precision"]) == {"float32", "bf16"}
    assert all(set(v) == terms for v in result["precision"].values())
    assert abs(result["precision"]["bf16"]["loss"] - result["precision"]["float32"]["loss"]) < 0.05

    (segment,) = result["segment"]
    assert segment["volume"] == "synthetic" and 0.9 <= segment["label_agreement"] <= 1
    assert set(segment["native"]["stages_s"]) == {"preprocess", "windows", "postprocess"}

    assert [r["cap_gb"] for r in result["ladder"]] == [8, 0.5]
    for rung in result["ladder"]:
        assert rung["synthetic"]["fits"] and rung["synthetic"]["labels_identical"]
        assert rung["finetune_step"] == {"fits": True} and rung["validation"] == {"fits": True}
    assert "pretrain mim" in done.stderr and "ladder 0.5 GB" in done.stderr  # the table
