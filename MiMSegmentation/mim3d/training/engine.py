"""The training loop shared by pre-training and fine-tuning: optimiser, learning-rate schedule, precision, the inner
`train_one_epoch`, the outer `fit`, and the training state a checkpoint holds (METHOD.md §8.3; STYLE §9).

- AdamW (0.9, 0.95), weight decay on weights only: biases, norms and every other 1-D parameter are not decayed, and
  frozen parameters are not given to the optimiser at all (timm 0.3.2 `add_weight_decay`, as the official code).
- The learning rate is a pure function of the optimiser step (`lr_at`): linear warm-up from 0, then a half-cycle
  cosine to min_lr, set before every optimiser step at fractional epochs. Nothing about it needs saving.
- Precision: fp32 on the CPU (bf16 autocast measured 1.6x slower than fp32 there); on CUDA with --amp, bf16 on GPUs
  that compute it natively (compute capability 8.0 and later), else fp16 with a GradScaler.
- Gradient accumulation over `accum` micro-batches; the loss of each micro-batch is divided by `accum`, so a step
  follows the mean over the step's volumes, whatever its split across micro-batches and processes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..devices import GpuProperties, native_precision
from ..models.checkpoints import save_checkpoint
from .distributed import World, all_reduce_sum, gather_objects, unwrap
from .run_writer import RunWriter, StopController

ADAMW_BETAS = (0.9, 0.95)  # METHOD.md §8.3


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and undecayed biases / norms / 1-D parameters. Frozen ones are left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: float, total_steps: int) -> float:
    """The learning rate of optimiser step `step` (0-based; the first step of a warm-up runs at 0 as in MAE)."""
    if step < warmup_steps:  # 1. linear warm-up from 0
        return lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # 2. half-cycle cosine from lr to min_lr
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def choose_precision(device: torch.device, amp: bool | None, gpu: GpuProperties | None = None) -> tuple[str, str]:
    """(precision, note): "fp32", "bf16" or "fp16" for the device and the --amp choice (None = the device default:
    on for CUDA, off for the CPU), and a note for the log when a request was not followed. On CUDA the lower
    precision is the one the GPU computes natively (``devices.native_precision``; ``gpu`` its properties, None: read
    from the selected ``device``), and float32 runs its matrix products in TF32 (``devices.use_fast_cuda_kernels``)."""
    if device.type != "cuda":
        note = "--amp ignored on the CPU: bf16 autocast is slower than fp32 there (measured 1.6x)" if amp else ""
        return "fp32", note
    if amp is False:
        return "fp32", ""
    return native_precision(device, gpu), ""


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Trainer:
    """Everything one optimisation step needs, and the step count it advances.

    loss_fn(model, micro_batch, epoch) -> {"loss": scalar, ...terms}: runs the forward pass (under autocast).
    """

    model: nn.Module  # DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[nn.Module, object, int], dict[str, Tensor]]
    schedule: Callable[[int], float]  # optimiser step -> learning rate
    device: torch.device
    precision: str
    accum: int
    world: World
    stop: StopController
    writer: RunWriter
    total_steps: int
    samples_per_step: int  # the global batch
    before_step: Callable[[int], None] | None = None  # called with the step number before each optimiser step
    step: int = 0  # optimiser steps done
    stopped: bool = False
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self):
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")


def train_one_epoch(t: Trainer, epoch: int, micro_batches: Iterable) -> dict[str, float]:
    """Optimiser steps over `micro_batches` (the rest of `epoch`) until it ends, a stop request, or t.total_steps.

    Returns the mean of every loss term over the steps run, averaged over all processes.
    """
    autocast = torch.autocast(t.device.type, dtype=AUTOCAST_DTYPES[t.precision], enabled=t.precision != "fp32")
    sums, totals, steps = {}, {}, 0
    t.optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(micro_batches):
        if i % t.accum == 0:
            if t.before_step:
                t.before_step(t.step)
            lr = t.schedule(t.step)
            for group in t.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # a group's share of the schedule (default all)
        last = (i + 1) % t.accum == 0
        with (t.model.no_sync() if isinstance(t.model, DistributedDataParallel) and not last else nullcontext()):
            with autocast:
                terms = t.loss_fn(t.model, batch, epoch)
            t.scaler.scale(terms["loss"] / t.accum).backward()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() / t.accum
        if not last:
            continue
        means, stop = _reduce_step(sums, t.stop.requested(), t.world)
        if not all(map(math.isfinite, means.values())):
            raise FloatingPointError(f"non-finite loss at step {t.step + 1} (epoch {epoch + 1}): {means}; lower the "
                                     "learning rate (--blr or --lr), or run without --amp")
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.optimizer.zero_grad(set_to_none=True)
        t.step, steps, sums = t.step + 1, steps + 1, {}
        totals = {k: totals.get(k, 0.0) + v for k, v in means.items()}
        t.writer.step(t.step, lr, means, t.samples_per_step)
        if stop or t.step >= t.total_steps:
            t.stopped = stop
            break
    return {k: v / max(steps, 1) for k, v in totals.items()}


def _reduce_step(sums: dict[str, Tensor], stop: bool, world: World) -> tuple[dict[str, float], bool]:
    """One collective per step: the loss terms averaged over the processes, and whether any process must stop."""
    names = sorted(sums)
    packed = torch.stack([sums[n] for n in names] + [torch.tensor(float(stop), device=sums[names[0]].device)])
    packed = all_reduce_sum(packed.double(), world).tolist()
    return {n: v / world.size for n, v in zip(names, packed, strict=False)}, packed[-1] > 0


def fit(t: Trainer, epoch_batches: Callable[[int, int], Iterable], *, steps_per_epoch: int, epochs: int,
        checkpoint_every: int, checkpoint_meta: dict) -> str:
    """Train from t.step to t.total_steps, saving `last` every epoch and `epoch-N` every `checkpoint_every` epochs.

    epoch_batches(epoch, first_step) yields this rank's micro-batches from optimiser step `first_step` of `epoch`.
    Returns "finished", or "stopped" after a stop request (last.pt then holds the step where it stopped).
    """
    t.writer.set_state("running")
    saved_at = t.step
    while t.step < t.total_steps and not t.stopped:
        epoch, first_step = divmod(t.step, steps_per_epoch)
        means = train_one_epoch(t, epoch, epoch_batches(epoch, first_step))
        if t.stopped:
            t.writer.set_state("stopping", t.stop.reason or "stop requested")
        if t.step % steps_per_epoch == 0:  # the epoch is complete
            t.writer.epoch_end(epoch, t.step, means)
            periodic = (epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs
            save(t, [f"epoch-{epoch + 1}"] * periodic + ["last"], checkpoint_meta, steps_per_epoch)
            saved_at = t.step
    if t.step != saved_at:
        save(t, ["last"], checkpoint_meta, steps_per_epoch)
    return "stopped" if t.stopped else "finished"


# ---- checkpoints: the training state -------------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's random generators as plain data (a checkpoint may hold only tensors and plain data)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(value):
    """random.setstate wants the tuples back that a checkpoint may have turned into lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def save(t: Trainer, names: list[str], meta: dict, steps_per_epoch: int) -> list[Path]:
    """Write checkpoints/<name>.pt for each name (rank 0), with every rank's RNG state (all ranks must call this)."""
    rng = gather_objects(rng_state(), t.world)
    if not t.writer.active:
        return []
    epoch, step_in_epoch = divmod(t.step, steps_per_epoch)
    extra = {"optimizer": t.optimizer.state_dict(), "scaler": t.scaler.state_dict(), "step": t.step,
             "epoch": epoch, "data_position": {"epoch": epoch, "step_in_epoch": step_in_epoch,
                                               "steps_per_epoch": steps_per_epoch}, "rng": rng}
    paths = []
    for name in names:
        path = save_checkpoint(t.writer.run.checkpoint(name), model_state=unwrap(t.model).state_dict(),
                               **meta, **extra)
        t.writer.checkpoint_written(path)
        paths.append(path)
    return paths


def restore(t: Trainer, payload: dict) -> None:
    """Continue from a checkpoint written by `save`: model, optimiser, scaler, step and this rank's RNG."""
    unwrap(t.model).load_state_dict(payload["model"], strict=True)
    t.optimizer.load_state_dict(payload["optimizer"])
    if t.scaler.is_enabled() and payload.get("scaler"):
        t.scaler.load_state_dict(payload["scaler"])
    t.step = int(payload["step"])
    rng = payload.get("rng") or []
    if len(rng) == t.world.size:  # same process count: each rank takes back its own generators
        set_rng_state(rng[t.world.rank])
