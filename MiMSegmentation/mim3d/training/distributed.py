"""One process or many (torchrun): the process group, device choice, and how each epoch's volumes are dealt out.

    torchrun --nproc_per_node 4 -m mim3d pretrain --data /scans --out runs/a ...          # one node, 4 GPUs
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m mim3d pretrain ...   # two nodes

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `srun` alone works too when the job script exports MASTER_ADDR and
MASTER_PORT (`world_from_env`). Each process uses GPU LOCAL_RANK, or GPU 0 when it sees only one (Slurm
--gpus-per-task=1). The backend is NCCL on CUDA and Gloo on the CPU. Sharding does what
DistributedSampler(shuffle=True, drop_last=True) does, with one more property: every optimiser step takes exactly the
same volumes (and, through `derive_seed`, the same masks) however its global batch is split across processes,
micro-batches and accumulation, so a 2-process run reproduces a 1-process run with the same global batch, and a
resumed run continues the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..devices import use_fast_cuda_kernels
from ..errors import BadInputError
from ..presets import DEVICES

log = logging.getLogger("mim3d.training")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(env=os.environ) -> World:
    """The World torchrun describes in the environment; under `srun` without torchrun (SLURM_PROCID and SLURM_NTASKS
    set, RANK not) the one Slurm describes, which needs MASTER_ADDR and MASTER_PORT for the rendezvous (refused
    without them: every process would otherwise train alone and write the same run folder); one process otherwise."""
    if "RANK" in env or int(env.get("SLURM_NTASKS", 1)) <= 1 or "SLURM_PROCID" not in env:
        return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing:
        raise BadInputError(f"srun started {env['SLURM_NTASKS']} tasks without torchrun, and {' and '.join(missing)} "
                            "is not set: export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | "
                            "head -n 1) and MASTER_PORT=29500 in the job script, or start one torchrun per node")
    return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))


def rank_zero_voice(world: World, emitter):
    """The emitter to use: rank 0's own; the other ranks write protocol events to nowhere and log only warnings."""
    if world.is_main:
        return emitter
    logging.getLogger().setLevel(logging.WARNING)
    return type(emitter)(open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115 - for the life of the process


def select_device(requested: str, world: World) -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cuda" is refused on a machine without a usable GPU."""
    if requested not in DEVICES:
        raise BadInputError(f"--device: '{requested}'; choose {', '.join(DEVICES)}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BadInputError("--device cuda: PyTorch sees no usable CUDA GPU here; use --device cpu or auto")
    device = torch.device("cuda", cuda_index(world.local_rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)  # before any other CUDA call, so that no rank opens a context on another's GPU
    use_fast_cuda_kernels(device)
    return device


def cuda_index(local_rank: int, visible: int) -> int:
    """The GPU of local process ``local_rank`` among the ``visible`` ones: its own index when the node's GPUs are
    all visible (torchrun), 0 when each process sees only its own (Slurm --gpus-per-task=1)."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise BadInputError(f"LOCAL_RANK {local_rank}: this node has only {visible} GPUs; start at most that many "
                            "processes per node, or give each process its own GPU (CUDA_VISIBLE_DEVICES)")
    return local_rank


def init_process_group(world: World, device: torch.device) -> None:
    """Join the other processes (blocks until all have arrived); nothing to do for a single process."""
    if not world.distributed:
        return
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=world.rank,
                            world_size=world.size)


def wrap_model(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DDP for several processes. A model whose ``has_unused_parameters`` is true (MiM pre-training only: its
    parent-side projection heads get no gradient from the CE / BYOL alignment forms, and none of the heads with
    alignment off) gets find_unused_parameters, without which DDP would wait on their gradients forever (the official
    code's `find_unused_parameters=False` defect, METHOD.md §12.7); DDP then searches the autograd graph after every
    forward, which the other models (MAE, SimMIM, the segmenters) need not pay."""
    if not world.distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids,
                                   find_unused_parameters=getattr(model, "has_unused_parameters", False))


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(values)
    return values


def gather_objects(obj: object, world: World) -> list:
    """[the object of rank 0, of rank 1, ...] on every rank."""
    if not world.distributed:
        return [obj]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed from any tuple of keys, the same on every machine and process (unlike Python's hash())."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass(frozen=True)
class Sharding:
    """Which volume each process takes at each micro-batch of an epoch.

    Every epoch shuffles the N volumes with a permutation drawn from (seed, epoch). Position p of that order goes to
    rank p % world_size; rank r's micro-batch m holds positions (m·batch + j)·world_size + r, j < batch. Optimiser
    step s of the epoch is micro-batches s·accum … s·accum + accum − 1 of every rank, i.e. exactly positions
    s·G … (s+1)·G − 1 with G = batch × accum × world_size. The N mod G volumes left over at the end of the epoch are
    not used in it (DistributedSampler's drop_last, and the official loop dropping leftover micro-batches).
    """

    num_items: int
    batch: int
    accum: int
    world: World
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch * self.accum * self.world.size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.global_batch

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
        return torch.randperm(self.num_items, generator=generator).tolist()

    def positions(self, first_step: int) -> list[int]:
        """This rank's epoch positions from optimiser step `first_step` of the epoch to its end, in loading order."""
        per_step = self.accum * self.batch  # this rank's volumes per optimiser step
        local = range(first_step * per_step, self.steps_per_epoch * per_step)
        return [i * self.world.size + self.world.rank for i in local]

    def indices(self, epoch: int, first_step: int) -> list[int]:
        """The dataset indices this rank loads, in order, from step `first_step` of `epoch` on."""
        order = self.order(epoch)
        return [order[p] for p in self.positions(first_step)]


def epoch_batches(dataset, sharding: Sharding, workers: int, device: torch.device, epoch: int, first_step: int, *,
                  collate_fn=None, items: str = "volumes"):
    """(micro-batch, its items' positions in the epoch) for this rank, from optimiser step `first_step` of `epoch`.

    `dataset` has `set_epoch` (its random crops depend only on seed, epoch and index) and counts in `skipped` the
    unreadable items it replaced by the next readable one.
    """
    dataset.set_epoch(epoch)  # before the loader starts, so its workers see the epoch's crops
    positions = sharding.positions(first_step)
    loader = DataLoader(dataset, batch_size=sharding.batch, sampler=sharding.indices(epoch, first_step),
                        num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=_ignore_stop_signals,
                        collate_fn=collate_fn)
    replaced = dataset.skipped
    for m, batch in enumerate(loader):
        yield batch, positions[m * sharding.batch:(m + 1) * sharding.batch]
    if dataset.skipped > replaced:
        log.warning("epoch %d: %d unreadable %s were replaced by the next readable ones (%d in all)", epoch + 1,
                    dataset.skipped - replaced, items, dataset.skipped)


def _ignore_stop_signals(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: loader workers must not die of it while the step finishes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run_on_every_rank(args, emitter, prepare, train) -> None:
    """A training command on every process: `prepare(args, world, emitter)` checks everything and builds the setup,
    then the process group starts and `train(setup, emitter)` runs; only rank 0 speaks and writes."""
    world = world_from_env()
    emitter = rank_zero_voice(world, emitter)
    setup = prepare(args, world, emitter)
    init_process_group(world, setup.device)  # all processes have validated everything: now write
    try:
        train(setup, emitter)
    finally:
        shutdown(world)
