"""Report the compute devices this Python can use, so the Slicer panel can show them without importing torch.

    mim3d devices

One result event: {"torch": "2.5.1+cu124" (None when torch cannot be imported), "cuda_build": "12.4" or None,
"cuda": [{"index": 0, "name": "NVIDIA ...", "total_mb": 81559, "free_mb": 80011, "capability": "9.0"}, ...],
"recommended": "cuda" | "cpu", "cpu_threads": 16, "cpu_bf16": true (``cpu_computes_bf16``)}. Free memory is what
the driver reports now, other processes included; asking for it starts a CUDA context in this short-lived process
only.

Also the one home of what a device computes natively (``native_precision``) and of the CUDA speed settings every job
turns on (``use_fast_cuda_kernels``). Standard library only at import time: torch is imported where it is used.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

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
            "capability": f"{properties.major}.{properties.minor}", "precision": native_precision_of_gpu(
                GpuProperties.of(index))}


# ---- what a device computes natively -----------------------------------------------------------------------------

BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bf16 tensor cores and cuDNN bf16 convolutions


@dataclass(frozen=True)
class GpuProperties:
    """What the precision and memory choices need to know of a CUDA GPU (injectable: tests describe a T4 or an H100)."""

    name: str
    major: int  # compute capability major.minor
    minor: int
    total_bytes: int

    @classmethod
    def of(cls, device) -> GpuProperties:
        """The properties of CUDA ``device`` (a torch.device or an index); no CUDA context is opened."""
        import torch

        p = torch.cuda.get_device_properties(device)
        return cls(p.name, p.major, p.minor, p.total_memory)


def native_precision_of_gpu(gpu: GpuProperties) -> str:
    """"bf16" from compute capability 8.0 (A100, H100, RTX 30xx and later), "fp16" below it (V100, T4, RTX 20xx).
    ``torch.cuda.is_bf16_supported()`` is not the test: it is true below 8.0 too, where bf16 is emulated and cuDNN
    has no bf16 convolutions, so every 3-D convolution would fall back to slow, memory-hungry native kernels."""
    return "bf16" if (gpu.major, gpu.minor) >= BF16_MIN_CAPABILITY else "fp16"


def native_precision(device, gpu: GpuProperties | None = None) -> str | None:
    """The lower precision ``device`` computes natively: "bf16", "fp16", or None (float32 only).

    Args:
        device: a torch.device, already selected (for CUDA: after ``torch.cuda.set_device``, so that no context is
            opened on another process's GPU).
        gpu: the GPU's properties; None reads them from ``device``.
    """
    if device.type == "cuda":
        return native_precision_of_gpu(gpu or GpuProperties.of(device))
    if device.type == "cpu" and cpu_computes_bf16():
        return "bf16"
    return None


def use_fast_cuda_kernels(device) -> None:
    """On CUDA: TF32 for float32 matrix products and convolutions (10-bit mantissa inputs, float32 accumulation; the
    1×1×1 and patch convolutions and every linear layer are matrix products), and cuDNN autotuning, which pays once
    per input shape and suits the fixed-shape crops and windows of every mim3d job. Nothing on other devices."""
    import torch

    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
