"""Plans for sliding-window prediction: where the network runs, how many windows per pass, where the blended logits
accumulate, how deep a slab of them may be, and in which precision; chosen from the memory the job may use
(``memory.budget``) and stepped down after an out-of-memory error.

What a plan needs is estimated, not guessed from a table (``Footprint``):

- the weights, on the compute device;
- per window in a pass: the peak of the tensors alive during one forward pass, traced on the meta device (no memory,
  no arithmetic; ``forward_peak_bytes``) in float32, times ``ACTIVATION_MARGIN`` for what the trace cannot see
  (allocator rounding, oneDNN/cuDNN workspaces), plus MONAI's window buffers;
- per K plane of a slab: the blended logits, MONAI's count map and the argmax temporaries on the output device, the
  input and its padded copy on the compute device.

The first plan that fits wins: on CUDA the largest window batch of ``CUDA_BATCH_SIZES`` with the output on the GPU,
then one window with the output in RAM, then the CPU; on the CPU one window (a larger batch gives a CPU no speed).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .. import memory
from ..devices import GpuProperties, native_precision
from ..errors import BadInputError

GB = 1e9
CUDA_BATCH_SIZES = (8, 4, 2, 1)  # windows per forward pass tried on a GPU, largest first
# Measured on the CPU: one 96³ window of mim-unetr small grows the resident memory by 0.77 GB; the trace finds 0.54.
ACTIVATION_MARGIN = 1.5
ARGMAX_BYTES = 4 + 8 + 1  # per voxel: torch.max's values (float32) and indices (int64), then the uint8 copy
INPUT_COPIES = 3  # the slab on the compute device, its padded copy, and a flipped copy under TTA
# The messages of out-of-memory errors that arrive as plain RuntimeErrors: cuBLAS and cuDNN allocation failures,
# older torch and MPS ("... out of memory"), and the CPU allocator.
OUT_OF_MEMORY_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                          "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", "can't allocate memory")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(device: torch.device, gpu: GpuProperties | None = None) -> torch.dtype | None:
    """The autocast dtype for inference on ``device``, None for float32: what the device computes natively
    (``devices.native_precision``: bf16 on GPUs of compute capability 8.0 and later, fp16 below; bf16 on CPUs with
    AMX or AVX512-BF16, where a mim-unetr window runs 1.8-2.2× as fast as in float32, docs/BENCHMARKS.md)."""
    return _DTYPES.get(native_precision(device, gpu))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says that memory ran out, in any of the forms torch, cuBLAS and cuDNN raise it."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in OUT_OF_MEMORY_MESSAGES)


@dataclass(frozen=True)
class Plan:
    """Where the network runs (``device``), how many windows per pass, where the blended logits accumulate, how
    many K planes one slab of them may hold (None: as ``windows.LOGITS_BUDGET_BYTES`` allows), and whether it runs
    in the device's native lower precision (``amp``, see ``amp_dtype``; ``gpu`` describes a CUDA device)."""

    device: torch.device
    sw_batch_size: int
    output_device: torch.device
    amp: bool = True
    slab_planes: int | None = None
    gpu: GpuProperties | None = None

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype of the forward passes; None: float32."""
        return amp_dtype(self.device, self.gpu) if self.amp else None

    def describe(self) -> str:
        where = self.device.type if self.output_device == self.device else f"{self.device.type}, output on cpu"
        precision = str(self.dtype).removeprefix("torch.") if self.dtype else "float32"
        return f"{where}, {self.sw_batch_size} window(s) per pass, {precision}"


def fallback(plan: Plan) -> Plan | None:
    """The next plan after an out-of-memory error: halve the window batch, then accumulate on the CPU, then run
    everything on the CPU; None when nothing is left to try."""
    cpu = torch.device("cpu")
    if plan.sw_batch_size > 1:
        return replace(plan, sw_batch_size=plan.sw_batch_size // 2)
    if plan.output_device.type == "cuda":
        return replace(plan, output_device=cpu)
    if plan.device.type == "cuda":
        return Plan(cpu, 1, cpu, plan.amp, plan.slab_planes)
    return None


def reduction(before: Plan, after: Plan) -> str:
    """What ``fallback`` reduced, in words."""
    if after.device != before.device:
        return "the network moves to the CPU"
    if after.output_device != before.output_device:
        return "the blended logits move to the CPU"
    return f"window batch {before.sw_batch_size} -> {after.sw_batch_size}"


# ---- what a plan needs -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Footprint:
    """Bytes a prediction needs (module docstring)."""

    shape: tuple[int, int, int]  # the model-space volume (I, J, K)
    weights: int
    window: int  # per window in a forward pass
    plane: int  # per K plane of a slab on the output device
    input_plane: int  # per K plane of a slab on the compute device
    min_planes: int  # the thinnest slab: a window deep plus its halo (or the whole volume when thinner)

    @classmethod
    def of(cls, model: nn.Module, shape: tuple[int, int, int], roi: tuple[int, int, int], num_classes: int,
           tta: bool) -> Footprint:
        """For ``model`` on a model-space volume of ``shape`` (I, J, K) with windows of ``roi``."""
        weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        voxels = roi[0] * roi[1] * roi[2]
        window = int(forward_peak_bytes(model, (1, 1, *roi)) * ACTIVATION_MARGIN) + voxels * 4 * (1 + 2 * num_classes)
        area = max(shape[0], roi[0]) * max(shape[1], roi[1])  # MONAI pads the volume to a window
        logits = num_classes * 4 * (2 if tta else 1) + 4  # + MONAI's count map
        return cls(tuple(shape), weights, window, area * (logits + ARGMAX_BYTES), area * 4 * INPUT_COPIES,
                   min(shape[2], 2 * roi[2]))

    def planes(self, plan: Plan, rooms: dict[str, int]) -> int:
        """The deepest slab ``plan`` can hold within ``rooms`` (device type -> bytes); below ``min_planes``: none."""
        room = rooms[plan.device.type] - self.weights - plan.sw_batch_size * self.window
        if plan.output_device == plan.device:
            return room // (self.plane + self.input_plane)
        return min(room // self.input_plane, rooms[plan.output_device.type] // self.plane)

    def need(self, plan: Plan) -> str:
        """What the thinnest slab of a plan that runs on one device needs, in words."""
        network = self.weights + plan.sw_batch_size * self.window
        slab = self.min_planes * (self.plane + self.input_plane)
        return (f"{(network + slab) / GB:.2f} GB ({network / GB:.2f} GB for the network and "
                f"{plan.sw_batch_size} window(s), {slab / GB:.2f} GB for a slab of {self.min_planes} planes)")


def choose_plan(device: torch.device, footprint: Footprint, *, sw_batch_size: int | None = None, amp: bool = True,
                gpu: GpuProperties | None = None,
                budget: Callable[[torch.device], memory.Budget] = memory.budget) -> tuple[Plan, str]:
    """The first plan that fits the memory ``budget`` gives (module docstring), and a sentence stating it.

    Args:
        sw_batch_size: windows per pass; None chooses from ``CUDA_BATCH_SIZES`` on a GPU, 1 on the CPU.
        gpu: the CUDA device's properties (None: read from the device when needed).
        budget: device -> the memory a job may use there (``memory.budget``; tests give fixed budgets).

    Raises:
        BadInputError: not even one window on the CPU fits; the message gives the need and the budget.
    """
    cpu = torch.device("cpu")
    budgets = {"cpu": budget(cpu)}
    if device.type == "cuda":
        budgets["cuda"] = budget(device)
        batches = (sw_batch_size,) if sw_batch_size else CUDA_BATCH_SIZES
        candidates = [Plan(device, b, device, amp, gpu=gpu) for b in batches]
        candidates += [Plan(device, 1, cpu, amp, gpu=gpu), Plan(cpu, 1, cpu, amp)]
    else:
        candidates = [Plan(cpu, sw_batch_size or 1, cpu, amp)]
    rooms = {kind: b.bytes for kind, b in budgets.items()}
    for plan in candidates:
        planes = footprint.planes(plan, rooms)
        if planes >= footprint.min_planes:
            plan = replace(plan, slab_planes=int(planes))
            depth = footprint.shape[2]
            slabs = "the whole volume at once" if planes >= depth else f"slabs of {planes} of its {depth} planes"
            return plan, f"plan: {plan.describe()}, {slabs}; memory {budgets[plan.device.type].describe()}"
    last = candidates[-1]
    raise BadInputError(f"not enough memory to segment a {'×'.join(map(str, footprint.shape))} model grid: even "
                        f"{last.describe()} needs {footprint.need(last)}, and this job may use "
                        f"{budgets['cpu'].describe()}; close other programs, raise the job's memory limit, or use "
                        "--fast or --roi.")


# ---- the activation trace ------------------------------------------------------------------------------------------

def forward_peak_bytes(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Peak bytes of the tensors alive during an inference forward pass of a float32 input of ``shape``, traced on
    a meta-device copy of ``model`` (the model itself is not touched)."""
    clone = _meta_copy(model)
    tracker = _LiveBytes()
    with torch.inference_mode(), tracker:
        clone(torch.empty(shape, device="meta"))
    return tracker.peak


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers are meta tensors of the same shapes (no copy of their data)."""
    memo = {}
    for t in (*model.parameters(), *model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor an operator creates until it is freed, and keeps the peak. Results that
    alias an input (views, in-place and out= results) own no new memory."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    n = t.untyped_storage().nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, n)
        return out

    def _free(self, n: int) -> None:
        self.live -= n
