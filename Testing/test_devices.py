"""Which device a job uses and how it computes there: the precision a GPU computes natively (from its properties,
injected here as the GPUs users have), the CUDA speed settings, and the GPU and world each launcher gives a process
(torchrun, Slurm with one GPU per task, srun without torchrun)."""

from __future__ import annotations

import pytest
import torch

from mim3d.devices import GpuProperties, native_precision, use_fast_cuda_kernels
from mim3d.errors import BadInputError
from mim3d.inference import plans
from mim3d.models import build_pretrainer
from mim3d.training import engine
from mim3d.training.distributed import World, cuda_index, world_from_env

GIB = 2**30
CUDA = torch.device("cuda", 0)
# (name, capability, total memory): the laptop and data-centre cards users have
T4 = GpuProperties("Tesla T4", 7, 5, 15 * GIB)
V100 = GpuProperties("Tesla V100-SXM2-32GB", 7, 0, 32 * GIB)
RTX_2060 = GpuProperties("NVIDIA GeForce RTX 2060", 7, 5, 6 * GIB)
A100 = GpuProperties("NVIDIA A100-SXM4-80GB", 8, 0, 80 * GIB)
RTX_3070_LAPTOP = GpuProperties("NVIDIA GeForce RTX 3070 Laptop GPU", 8, 6, 8 * GIB)
H100 = GpuProperties("NVIDIA H100 80GB HBM3", 9, 0, 80 * GIB)


@pytest.mark.parametrize(("gpu", "precision", "dtype"), [
    (T4, "fp16", torch.float16),  # Turing: bf16 only emulated (torch.cuda.is_bf16_supported() is True there)
    (V100, "fp16", torch.float16),  # Volta
    (RTX_2060, "fp16", torch.float16),
    (A100, "bf16", torch.bfloat16),  # Ampere: bf16 tensor cores and cuDNN bf16 convolutions
    (RTX_3070_LAPTOP, "bf16", torch.bfloat16),
    (H100, "bf16", torch.bfloat16),  # Hopper
])
def test_a_gpu_computes_in_bf16_from_compute_capability_8_and_in_fp16_below(gpu, precision, dtype):
    assert native_precision(CUDA, gpu) == precision
    assert plans.amp_dtype(CUDA, gpu) == dtype  # segmentation
    assert engine.choose_precision(CUDA, True, gpu) == (precision, "")  # training
    assert engine.choose_precision(CUDA, None, gpu) == (precision, "")  # the CUDA default is on


def test_training_without_mixed_precision_runs_float32():
    assert engine.choose_precision(CUDA, False, T4) == ("fp32", "")
    assert engine.choose_precision(torch.device("cpu"), None) == ("fp32", "")


def test_a_segmentation_plan_on_a_turing_gpu_computes_in_fp16():
    plan = plans.Plan(CUDA, 2, CUDA, gpu=T4)
    assert plan.dtype == torch.float16
    assert plan.describe() == "cuda, 2 window(s) per pass, float16"
    assert plans.Plan(CUDA, 2, CUDA, amp=False, gpu=T4).dtype is None


@pytest.fixture
def cuda_flags():
    """Restores the global backend flags a test changes."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = False
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) = saved


def test_cuda_jobs_run_float32_products_in_tf32_and_autotune_convolutions(cuda_flags):
    use_fast_cuda_kernels(torch.device("cpu"))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
    use_fast_cuda_kernels(CUDA)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.benchmark


# ---- launchers ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("local_rank", "visible", "index"), [
    (0, 1, 0), (3, 1, 0),  # Slurm --gpus-per-task=1: every process sees only its own GPU, as cuda:0
    (0, 4, 0), (3, 4, 3),  # torchrun on a node whose 4 GPUs every process sees
])
def test_each_process_uses_its_own_gpu_whether_it_sees_one_or_all(local_rank, visible, index):
    assert cuda_index(local_rank, visible) == index


def test_more_processes_than_gpus_on_a_node_is_refused():
    with pytest.raises(BadInputError, match="LOCAL_RANK 4: this node has only 4 GPUs"):
        cuda_index(4, 4)


def test_torchrun_describes_the_world():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert world_from_env(env) == World(5, 8, 1)  # torchrun inside a Slurm job: torchrun's variables count
    assert world_from_env({}) == World(0, 1, 0)
    assert world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == World(0, 1, 0)


def test_srun_without_torchrun_takes_the_world_from_slurm():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "MASTER_ADDR": "node01",
           "MASTER_PORT": "29500"}
    assert world_from_env(env) == World(5, 8, 1)


def test_srun_without_torchrun_and_without_a_rendezvous_address_is_refused_with_what_to_export():
    with pytest.raises(BadInputError, match=r"srun started 8 tasks without torchrun, and MASTER_ADDR and "
                                            r"MASTER_PORT is not set: export MASTER_ADDR=\$\(scontrol"):
        world_from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"})


# ---- MiM's alignment under mixed precision --------------------------------------------------------------------------

def test_mim_alignment_logits_are_float32_under_bf16_autocast():
    model = build_pretrainer("mim", "small")
    generator = torch.Generator().manual_seed(0)
    child, parents = torch.randn(2, 4, 64, generator=generator), torch.randn(2, 8, 64, generator=generator)
    target = torch.randint(0, 8, (2, 4), generator=generator)
    exact = model.alignment_loss(child, parents, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.alignment_loss(child.bfloat16(), parents.bfloat16(), target)
        logits_in_bf16 = torch.einsum("mkc,mrc->mkr", child.bfloat16(), parents.bfloat16())
    assert mixed.dtype == torch.float32
    exact_on_bf16_inputs = model.alignment_loss(child.bfloat16().float(), parents.bfloat16().float(), target)
    assert mixed.item() == exact_on_bf16_inputs.item()  # the inputs rounded to bf16, nothing else
    assert logits_in_bf16.dtype == torch.bfloat16 and abs(mixed.item() - exact.item()) < 0.05
