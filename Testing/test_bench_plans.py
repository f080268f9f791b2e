"""`bench/bench_plans.py --quick`: the plans benchmark runs as a real subprocess and prints the plans the commands
would choose, so that it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_plans.py"


def test_the_quick_form_prints_the_plans_for_a_3_gb_gpu_and_this_cpu():
    done = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, encoding="utf-8",
                          timeout=600, env={**os.environ, "PYTHONUTF8": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["benchmark"] == "plans" and result["quick"] is True
    assert set(result["budgets"]) == {"gpu 3 GB", "cpu"}
    jobs = {"pretrain mim small", "finetune mim-unetr small", "segment mim-unetr small"}
    assert all(set(b["plans"]) == jobs for b in result["budgets"].values())
    gpu = result["budgets"]["gpu 3 GB"]["plans"]
    assert gpu["pretrain mim small"]["fits"] and gpu["pretrain mim small"]["estimate_gb"] <= 3
    refused = gpu["finetune mim-unetr small"]
    assert not refused["fits"] and refused["message"].startswith("not enough memory for mim-unetr small fine-tuning")
    assert "--samples-per-volume " in refused["message"] and " would fit" in refused["message"]
    assert gpu["segment mim-unetr small"]["device"] == "cuda"
    assert "| finetune mim-unetr small | refused |" in done.stderr
