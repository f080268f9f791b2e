"""Memory plans for training: whether one optimiser step of the requested run fits the memory the job may use
(``memory.budget``: free GPU memory, or RAM capped by the cgroup), with activation checkpointing if it must.

The peak of one step is estimated, not guessed from a table (``StepFootprint``):

- the weights, their gradients and AdamW's two float32 moments, for the parameters that train (a frozen encoder has
  no gradients and no optimiser state);
- the activations of one micro-batch: the peak of the tensors alive during its forward and backward pass, traced
  with fake tensors (no memory, no arithmetic; the same live-bytes count as ``inference.plans``), plus the loss's
  temporaries where the trace cannot run the loss (``CRITERION_COPIES``), all times ``ACTIVATION_MARGIN``. Measured
  on the CPU: one step of MiM `small` takes 2.41 GB where the trace finds 1.85 (+0.1 GB weights, gradients and
  moments), 1.05 GB with checkpointing where it finds 0.71; mim-unetr `small`, one 96³ crop, 2.77 GB for 1.97; default
fine-tuning (mim-unetr `small`, 4 crops of 96³, 3 classes) with checkpointing, 3.20 GB of resident memory over two
steps (weights to AdamW state included) where the estimate is 4.08 GB.

What a plan may choose is how the step is computed, never what: activation checkpointing (the same gradients, less
memory, about a third more time) is off when the step fits without it, else on. Batch, crop, crops per case and
preset are the user's: when even checkpointing does not fit, the run is refused (exit 2, nothing written) with what
would fit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import memory
from ..errors import BadInputError
from ..inference.plans import ACTIVATION_MARGIN, _LiveBytes

GB = 1e9
CRITERION_COPIES = 6  # DiceCE on (crops, classes, roi): softmax, one-hot target, squares, product, log-softmax, grad
ADAMW_STATE = 2  # exp_avg and exp_avg_sq, float32 like the weights


@dataclass(frozen=True)
class StepFootprint:
    """Bytes of one optimiser step (module docstring), with the activations of one micro-batch."""

    weights: int
    trained: int  # bytes of the parameters that train: as many for gradients, twice for AdamW
    activations: int  # margin included

    @property
    def total(self) -> int:
        return self.weights + self.trained * (1 + ADAMW_STATE) + self.activations

    def describe(self) -> str:
        state = self.weights + self.trained * (1 + ADAMW_STATE)
        return (f"{self.total / GB:.1f} GB ({state / GB:.2f} GB weights, gradients and AdamW state, "
                f"{self.activations / GB:.1f} GB activations)")


def step_footprint(model: nn.Module, inputs: tuple, loss_of: Callable, *, criterion_bytes: int = 0,
                   checkpointing: bool = False) -> StepFootprint:
    """The footprint of one step of ``model`` called with ``inputs`` (positional arguments; real tensors, of which
    only the shapes are used), with ``loss_of(output)`` a scalar computed from the output on the traced tensors,
    ``criterion_bytes`` what the real loss keeps alive beyond it, and activation checkpointing as chosen. Traced in
    float32: under bf16/fp16 autocast on a GPU the activations take less."""
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    prepare = use_activation_checkpointing if checkpointing else None
    activations = int((step_peak_bytes(model, inputs, loss_of, prepare) + criterion_bytes) * ACTIVATION_MARGIN)
    return StepFootprint(weights, trained, activations)


def step_peak_bytes(model: nn.Module, inputs: tuple, loss_of: Callable,
                    prepare: Callable[[nn.Module], None] | None = None) -> int:
    """Peak bytes of the tensors alive during a forward and backward pass of ``model`` (training mode as it is) on
    ``inputs``, traced with fake tensors on a copy (the model is not touched; ``prepare`` changes the copy). Fake
    tensors, not the meta device: they keep their device type, so device-specific code (autocast regions) runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    memo = {}
    for t in (*model.parameters(), *model.buffers()):
        f = fake.from_tensor(t)
        memo[id(t)] = nn.Parameter(f, t.requires_grad) if isinstance(t, nn.Parameter) else f
    clone = copy.deepcopy(model, memo)  # outside the mode: plain tensor attributes are copied as they are
    if prepare:
        prepare(clone)
    tracker = _LiveBytes()
    with fake:
        args = [_fake_tree(fake, v) for v in inputs]
        with tracker:
            loss_of(clone(*args)).backward()
    return tracker.peak


def _fake_tree(fake, value):
    if isinstance(value, dict):
        return {k: _fake_tree(fake, v) for k, v in value.items()}
    return fake.from_tensor(value) if isinstance(value, torch.Tensor) else value


def use_activation_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward: where the model has an ``activation_checkpointing`` flag, its own way (the
    MiM encoder's conv blocks, mim-unetr's decoder blocks, a volume or two at a time); in MONAI's UNETR, every
    encoder/decoder block (torch's checkpoint wrapper, which keeps the state_dict keys as they were)."""
    from monai.networks.blocks import UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    for module in model.modules():
        if hasattr(module, "activation_checkpointing"):
            module.activation_checkpointing = True
    if not hasattr(model, "activation_checkpointing"):
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, UnetrBasicBlock | UnetrPrUpBlock |
                                                                              UnetrUpBlock))


@dataclass(frozen=True)
class TrainingPlan:
    """What the program chose for the memory it may use (config.json "plan")."""

    budget: memory.Budget
    footprint: StepFootprint
    activation_checkpointing: bool

    def describe(self) -> str:
        how = "with" if self.activation_checkpointing else "without"
        return (f"plan: one step {how} activation checkpointing needs about {self.footprint.describe()}; memory "
                f"{self.budget.describe()}")

    def to_config(self) -> dict:
        return {"budget_bytes": self.budget.bytes, "budget_source": self.budget.source,
                "estimate_bytes": self.footprint.total, "estimate": self.footprint.describe(),
                "activation_margin": ACTIVATION_MARGIN,
                "choices": {"activation_checkpointing": self.activation_checkpointing}}


def choose_plan(footprint: Callable[[bool], StepFootprint], budget: memory.Budget, *, requested: bool | None,
                can_checkpoint: bool, what: str, would_fit: Callable[[int], str]) -> TrainingPlan:
    """The first plan that fits ``budget``: without activation checkpointing, then with it (unless ``requested``
    fixes the choice, or the model ``can_checkpoint`` not).

    Args:
        footprint: checkpointing on? -> the step's footprint.
        what: the run in words, for the refusal ("MiM base pre-training, batch 1").
        would_fit: bytes the step may use -> what the user could change so that it fits, in words.

    Raises:
        PlanRefused (a BadInputError): no choice fits; the message gives the need, the budget and what would fit.
    """
    choices = [requested] if requested is not None else [False, True] if can_checkpoint else [False]
    for checkpointing in choices:
        needed = footprint(checkpointing)
        if needed.total <= budget.bytes:
            return TrainingPlan(budget, needed, checkpointing)
    how = " with activation checkpointing" if choices[-1] else ""
    fits = would_fit(budget.bytes - (needed.total - needed.activations))
    raise PlanRefused(f"not enough memory for {what}: one step{how} needs about {needed.describe()}, and this job may "
                      f"use {budget.describe()}. {fits}; or close other programs, or raise the job's memory limit",
                      TrainingPlan(budget, needed, choices[-1]), fits)


class PlanRefused(BadInputError):
    """No plan fits: ``plan`` is the closest one tried (its footprint exceeds its budget), ``would_fit`` what the
    user could change, in words."""

    def __init__(self, message: str, plan: TrainingPlan, would_fit: str):
        super().__init__(message)
        self.plan, self.would_fit = plan, would_fit


def report_plan(make_plan: Callable[[memory.Budget], TrainingPlan], device: torch.device, emitter) -> None:
    """`--check-plan`: the plan ``make_plan`` chooses for the memory free on ``device`` now, as one result event
    {"fits", "device", "description", "would_fit" (refused: what would fit, else null), TrainingPlan.to_config()'s
    fields}. A refusal is then raised again (exit 2, with the message), so that only a plan that fits exits 0."""
    budget = memory.budget(device)
    try:
        plan = make_plan(budget)
    except PlanRefused as refused:
        emitter.result(fits=False, device=str(device), description=str(refused), would_fit=refused.would_fit,
                       **refused.plan.to_config())
        raise
    emitter.result(fits=True, device=str(device), description=plan.describe(), would_fit=None, **plan.to_config())
