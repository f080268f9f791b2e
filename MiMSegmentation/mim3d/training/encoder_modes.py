"""What fine-tuning trains of the pre-trained encoder: `mim3d finetune --encoder full|frozen|gradual`.

- full: every weight trains from the first step (the BTCV recipe, METHOD.md §9.5).
  (The modes and their one-line help are the vocabulary `mim3d.presets.ENCODER_MODES`.)
- frozen: the pre-trained encoder stays as loaded: in eval mode (no drop-path), requires_grad False, not given to the
  optimiser (no AdamW state). Nothing upstream of it needs a gradient, so autograd records nothing inside it and keeps
  none of its activations: only the decoder's are kept for the backward pass.
- gradual: frozen first, then unfrozen stage by stage, deepest first, at fixed shares of the scheduled steps
  (--epochs × steps per epoch; --max-steps does not move them), with ENCODER_LR_FACTOR × the learning rate:

      mim-unetr:  transformer (patch_embed4/5, pos_embed, blocks4) at 25%, conv stage 3 at 50%, conv stages 1-2 at 75%
      unetr:      ViT blocks of the second half (and the final norm) at 25%, of the first half at 50%, patch
                  embedding at 75%

  The encoder's parameters sit in the optimiser from the start, in their own groups; AdamW skips a parameter until
  it has a gradient, so a stage's state starts when the stage is unfrozen. The mode is applied before every
  optimiser step from the step number alone (`EncoderMode.apply`), so a resumed run continues at the same point, and
  validation's switch to eval mode and back cannot unfreeze anything.

Encoder here means the pre-trained part: for mim-unetr the backbone without `fpn` (the fine-tuning-only stride-2 conv
of the fifth level, which always trains, §9.2), for unetr the MONAI ViT `vit.*`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .engine import param_groups

ENCODER_LR_FACTOR = 0.1  # gradual: the encoder's learning rate, as a share of --lr
UNFREEZE_AT = (0.25, 0.5, 0.75)  # gradual: the share of the scheduled steps at which each stage unfreezes


def encoder_stages(model: nn.Module, arch: str) -> list[tuple[str, tuple[str, ...]]]:
    """(stage name, parameter/module name prefixes), deepest stage first: the order gradual unfreezes them in."""
    if arch == "mim-unetr":
        b = "backbone."
        return [("transformer", (b + "patch_embed4", b + "patch_embed5", b + "pos_embed", b + "blocks4")),
                ("conv stage 3", (b + "patch_embed3", b + "blocks3")),
                ("conv stages 1-2", (b + "patch_embed1", b + "blocks1", b + "patch_embed2", b + "blocks2"))]
    blocks = len(model.vit.blocks)
    half = blocks // 2
    return [(f"ViT blocks {half + 1}-{blocks}", (*(f"vit.blocks.{i}" for i in range(half, blocks)), "vit.norm")),
            (f"ViT blocks 1-{half}", tuple(f"vit.blocks.{i}" for i in range(half))),
            ("patch embedding", ("vit.patch_embedding",))]


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@dataclass
class EncoderMode:
    """The mode of one run: which stages train at a given optimiser step."""

    mode: str
    stages: list[tuple[str, tuple[str, ...]]]
    unfreeze_steps: list[int]  # per stage: the first step it trains at (frozen: after the last one)
    fixed: frozenset[str]  # parameters the network itself keeps fixed (never unfrozen)

    @classmethod
    def of(cls, mode: str, model: nn.Module, arch: str, scheduled_steps: int) -> EncoderMode:
        stages = encoder_stages(model, arch)
        steps = {"full": [0] * len(stages), "frozen": [scheduled_steps + 1] * len(stages),
                 "gradual": [math.ceil(f * scheduled_steps) for f in UNFREEZE_AT]}[mode]
        return cls(mode, stages, steps, frozenset(n for n, p in model.named_parameters() if not p.requires_grad))

    def encoder_names(self, model: nn.Module) -> list[str]:
        everything = tuple(p for _, prefixes in self.stages for p in prefixes)
        return [n for n, _ in model.named_parameters() if _under(n, everything)]

    def apply(self, model: nn.Module, step: int) -> None:
        """Freeze (eval, no gradient) every stage not yet due at optimiser step `step`; the rest train."""
        if self.mode == "full":
            return
        for (_, prefixes), due in zip(self.stages, self.unfreeze_steps, strict=True):
            trainable = step >= due
            for name, param in model.named_parameters():
                if _under(name, prefixes) and name not in self.fixed:
                    param.requires_grad_(trainable)
            for name, module in model.named_modules():
                if name in prefixes:
                    module.train(trainable and model.training)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """AdamW groups: decayed weights and undecayed biases/norms/1-D parameters (engine.param_groups' rule), for
        the decoder and, unless frozen, the encoder at ENCODER_LR_FACTOR × the lr ("lr_scale", read by the engine).
        full: engine.param_groups, as before the modes existed."""
        if self.mode == "full":
            return param_groups(model, weight_decay)
        encoder = set(self.encoder_names(model))
        groups = []
        for part, scale in (("decoder", 1.0), ("encoder", ENCODER_LR_FACTOR if self.mode == "gradual" else 1.0)):
            if part == "encoder" and self.mode == "frozen":
                continue
            decay, no_decay = [], []
            for name, param in model.named_parameters():
                if (name in encoder) == (part == "encoder") and name not in self.fixed:
                    (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
            groups += [{"params": decay, "weight_decay": weight_decay, "lr_scale": scale},
                       {"params": no_decay, "weight_decay": 0.0, "lr_scale": scale}]
        return groups

    def describe(self, model: nn.Module) -> dict:
        """config.json "encoder": the mode, the schedule and the parameter counts."""
        encoder = set(self.encoder_names(model))
        counts = {"total": sum(p.numel() for p in model.parameters()),
                  "encoder": sum(p.numel() for n, p in model.named_parameters() if n in encoder)}
        counts["trained_from_start"] = counts["total"] - (0 if self.mode == "full" else counts["encoder"])
        stages = [{"stage": name, "parameters": sum(p.numel() for n, p in model.named_parameters()
                                                      if _under(n, prefixes)),
                   "unfrozen_at_step": due if self.mode == "gradual" else (0 if self.mode == "full" else None)}
                  for (name, prefixes), due in zip(self.stages, self.unfreeze_steps, strict=True)]
        return {"mode": self.mode, "lr_factor": ENCODER_LR_FACTOR if self.mode == "gradual" else 1.0,
                "parameters": counts, "stages": stages}

    def summary(self, model: nn.Module) -> str:
        """One line for log.txt."""
        d = self.describe(model)
        c = d["parameters"]
        text = (f"encoder {self.mode}: {c['trained_from_start']:,} of {c['total']:,} parameters train from the start "
                f"(encoder {c['encoder']:,})")
        if self.mode == "gradual":
            text += "; unfrozen " + ", ".join(f"{s['stage']} at step {s['unfrozen_at_step']}" for s in d["stages"])
            text += f", at {ENCODER_LR_FACTOR:g}× the lr"
        return text
