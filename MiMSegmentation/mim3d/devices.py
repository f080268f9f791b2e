"""Report the compute devices this Python can use, so the Slicer panel can show them without importing torch.

    mim3d devices

One result event: {"torch": "2.5.1+cu124" (None when torch cannot be imported), "cuda_build": "12.4" or None,
"cuda": [{"index": 0, "name": "NVIDIA ...", "total_mb": 81559, "free_mb": 80011, "capability": "9.0"}, ...],
"recommended": "cuda" | "cpu", "cpu_threads": 16, "cpu_bf16": true (``cpu_computes_bf16``)}. Free memory is what
the driver reports now, other processes included; asking for it starts a CUDA context in this short-lived process
only.
"""

from __future__ import annotations

import argparse
import logging
import os

from .protocol import Emitter

log = logging.getLogger("mim3d.devices")
MB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options."""


def run(args: argparse.Namespace, emitter: Emitter) -> None:
    try:
        import torch
    except ImportError as e:
        log.warning("torch cannot be imported (%s); only the CPU is listed", e)
        emitter.result(torch=None, cuda_build=None, cuda=[], recommended="cpu", cpu_threads=os.cpu_count() or 1,
                       cpu_bf16=False)
        return
    cuda = [_gpu(torch, index) for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    for gpu in cuda:
        log.info("cuda:%d %s, %d of %d MB free, compute capability %s", gpu["index"], gpu["name"], gpu["free_mb"],
                 gpu["total_mb"], gpu["capability"])
    emitter.result(torch=torch.__version__, cuda_build=torch.version.cuda, cuda=cuda,
                   recommended="cuda" if cuda else "cpu", cpu_threads=torch.get_num_threads(),
                   cpu_bf16=cpu_computes_bf16())


def cpu_computes_bf16() -> bool:
    """Whether this CPU has the bf16 units torch's CPU kernels use (AMX or AVX512-BF16: Xeon Sapphire Rapids and
    later, Zen 4 and later); elsewhere bf16 is emulated and slower than float32."""
    import torch

    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_amx_tile_supported",
                                                                       "_is_avx512_bf16_supported"))


def _gpu(torch, index: int) -> dict:
    properties = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    return {"index": index, "name": properties.name, "total_mb": total // MB, "free_mb": free // MB,
            "capability": f"{properties.major}.{properties.minor}"}
