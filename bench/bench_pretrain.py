"""Pre-training step throughput and peak memory: our MiM against a straightforward transcription of the official
forward pass (Testing/reference_mim.py) on identical weights, crops and masks, in the same process; MAE and SimMIM too.

One sample = one crop through the whole step (MiM: 1 + 4 + 16 = 21 passes of 96³ for `base`), forward + backward,
fp32, batch 1. Prints one JSON object.

    python bench/bench_pretrain.py --preset base --steps 2
    python bench/bench_pretrain.py --preset small --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))
from reference_mim import ReferenceMiM  # noqa: E402

from mim3d.models import build_pretrainer  # noqa: E402
from mim3d.runtime import keep_freed_memory  # noqa: E402


class PeakMemory:
    """Peak memory above the live set at entry: on CPU the heap is trimmed first (freed memory is otherwise kept,
    see mim3d.runtime) and RSS is sampled every 2 ms; on CUDA the allocator's peak."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
            self._base = psutil.Process().memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss - self._base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()


def time_steps(model, crops, noises, device) -> tuple[list[float], int]:
    """Seconds per step after one warm-up step, then the peak extra memory of one more step (bytes)."""
    def step(crop, noise):
        model.zero_grad(set_to_none=True)
        model(crop, noise=noise)["loss"].backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step(crops[0], noises[0])
    seconds = []
    for crop, noise in zip(crops[1:], noises[1:], strict=True):
        start = time.perf_counter()
        step(crop, noise)
        seconds.append(time.perf_counter() - start)
    with PeakMemory(device) as memory:
        step(crops[0], noises[0])
    return seconds, memory.peak


def run(method: str, preset: str, steps: int, device: torch.device, reference: bool, **overrides) -> dict:
    torch.manual_seed(0)
    model = build_pretrainer(method, preset, **overrides).to(device)
    size = model.config.crop_size if method == "mim" else model.config.input_size
    generator = torch.Generator().manual_seed(1)
    crops = [torch.rand(1, 1, size, size, size, generator=generator).to(device) for _ in range(steps + 1)]
    noises = [model.draw_noise(1, generator) for _ in range(steps + 1)]
    result = {"method": method, "preset": preset, "overrides": overrides, "sample_edge": size}
    implementations = [("ours", model)]
    if reference:
        oracle = ReferenceMiM(model.config).to(device)
        oracle.load_state_dict(model.state_dict())
        implementations.append(("reference", oracle))
    for name, net in implementations:
        seconds, peak = time_steps(net, crops, noises, device)
        median = sorted(seconds)[len(seconds) // 2]
        result[name] = {"seconds_per_sample": round(median, 3), "samples_per_second": round(1 / median, 4),
                        "all_seconds": [round(s, 3) for s in seconds], "peak_memory_gib": round(peak / 2**30, 2)}
    if reference:
        result["speedup_vs_reference"] = round(result["reference"]["seconds_per_sample"]
                                               / result["ours"]["seconds_per_sample"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["mim", "mae", "simmim"], choices=["mim", "mae", "simmim"])
    parser.add_argument("--preset", default="small", choices=["small", "base"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per implementation (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-reference", action="store_true", help="skip the official-style MiM reference")
    parser.add_argument("--activation-checkpointing", action="store_true", help="MiM: recompute conv blocks")
    args = parser.parse_args()
    device = torch.device(args.device)
    allocator_tuned = keep_freed_memory()
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "glibc_keeps_freed_memory": allocator_tuned}
    results = []
    for method in args.methods:
        mim = method == "mim"
        overrides = {"activation_checkpointing": True} if mim and args.activation_checkpointing else {}
        results.append(run(method, args.preset, args.steps, device, mim and not args.no_reference, **overrides))
    print(json.dumps({"benchmark": "pretrain_step", "machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
