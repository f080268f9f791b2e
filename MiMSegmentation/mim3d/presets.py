"""Model configurations and their named presets. Standard library only, so the Slicer GUI can read them.

One frozen dataclass per configured network; ``base`` follows the papers, ``small`` is a CPU-friendly size for tests
and the CPU demo. ``resolve(kind, preset, **overrides)`` is the one way to get a config: unknown presets and fields are
rejected by name, string options are checked against their Enum.

The vocabulary below (methods, architectures, preset names, devices, which architecture fine-tunes which encoder) is
defined here once; the command line's choices, the model builders and the Slicer panel all import it.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from enum import Enum, StrEnum

from .errors import BadInputError

PRETRAINING_METHODS = ("mim", "mae", "simmim")
SEGMENTATION_ARCHS = ("mim-unetr", "unetr")
CROP_CENTRES = ("pos-neg", "classes")  # mim3d finetune --crops
PRESET_NAMES = ("small", "base")  # small: CPU-sized; base: the papers
DEVICES = ("auto", "cpu", "cuda")  # auto: CUDA when available, else the CPU
ENCODER_ARCH = {"mim": "mim-unetr", "mae": "unetr", "simmim": "unetr"}  # the segmenter of each encoder (§9.4, §14.2)
# what fine-tuning trains of the pre-trained encoder (mim3d.training.encoder_modes), one line each for --help and panel
ENCODER_MODES = {
    "full": "train every weight from the first step (most memory; best with many labelled cases)",
    "frozen": "keep the pre-trained encoder fixed, train the decoder only (least memory and time per step)",
    "gradual": "start frozen, unfreeze the encoder deepest stage first after 1/4, 1/2, 3/4 of the steps, at 0.1x lr",
}


class AlignForm(StrEnum):
    """Cross-level alignment loss (METHOD.md §6.6)."""

    CE = "ce"  # softmax cross-entropy over the parent's regions, true source region positive (Variant A)
    BYOL = "byol"  # 2 - 2·cos(child, true source region)
    OFF = "off"


class Level1Grouping(StrEnum):
    """How level-1 tokens form the 8 masking groups (METHOD.md §4.4)."""

    OCTANT = "octant"  # 8 octant blocks of the token grid: the masked groups are exactly the level-2 crops
    RASTER = "raster"  # the official code: 8 runs of consecutive raster-order tokens (only 1/3 overlaps its octant)


@dataclass(frozen=True)
class MiMConfig:
    """MiM pre-training model (METHOD.md §2–§7). Each 2·input_size crop yields 1 + n2 + n2·n3 network passes."""

    in_channels: int = 1
    input_size: int = 96  # network input edge in voxels; token grid = input_size // 16 (§2.1)
    embed_dims: tuple[int, int, int, int] = (48, 96, 192, 384)  # conv stages 1–3, transformer (§2.1)
    depths: tuple[int, int, int, int] = (2, 2, 2, 11)  # CBlocks per conv stage, transformer blocks (§2.1)
    num_heads: int = 12  # transformer heads, head dim 32 (§2.1)
    mlp_ratio: float = 4.0
    decoder_dim: int = 576  # "dec512" in the official name, 576 in fact (§3)
    decoder_depth: int = 8
    decoder_heads: int = 16
    level1_mask_ratio: float = 0.5  # 4 of 8 groups masked (§4.2 mask_ratio_up)
    level1_grouping: Level1Grouping = Level1Grouping.OCTANT  # §4.4 recommendation; RASTER reproduces the code
    level2_count: int = 4  # masked octants re-encoded at native resolution (§4.2 sample_usual)
    level2_mask_ratio: float = 0.6  # §4.2 mask_ratio_mid
    level3_count: int = 4  # masked 16³ cubes per level-2 volume (§4.2 sample_down)
    level3_mask_ratio: float = 0.5  # §4.2 mask_ratio_down
    norm_pix_loss: bool = True  # per-patch normalised targets (§5)
    reconstruction_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # levels 1, 2, 3 (§7)
    alignment_form: AlignForm = AlignForm.CE  # §6.6, Variant A
    alignment_weights: tuple[float, float] = (0.1, 0.1)  # levels 1↔2, 2↔3; HEAD pretrain.sh (§6.4)
    alignment_l2_normalize: bool = False  # Variant A uses raw dot products
    alignment_temperature: float = 1.0  # no temperature in any official variant
    activation_checkpointing: bool = False  # recompute conv-block activations in backward: `base` on a CPU needs it

    @property
    def crop_size(self) -> int:
        """Edge of the sampled crop: its octants are the level-2 network inputs (§4.1)."""
        return 2 * self.input_size

    def validate(self) -> None:
        _check_hybrid_encoder(self.input_size, self.embed_dims, self.num_heads)
        grid = self.input_size // 16
        if grid % 2:
            raise BadInputError(f"input_size: {self.input_size} gives an odd token grid {grid}; level-1 octant "
                                "blocks need an even grid (input_size a multiple of 32)")
        _check_heads("decoder_dim", self.decoder_dim, self.decoder_heads)
        for name, dim in (("embed_dims[3]", self.embed_dims[3]), ("decoder_dim", self.decoder_dim)):
            if dim % 6:
                raise BadInputError(f"{name}: {dim} must be divisible by 6 (3D sin-cos positions: a sine and a cosine "
                                    "per axis)")
        masked_groups = self.level1_mask_ratio * 8
        if masked_groups != int(masked_groups) or not 0 < masked_groups < 8:
            raise BadInputError(f"level1_mask_ratio: {self.level1_mask_ratio} must mask a whole number of the 8 "
                                "groups (a multiple of 0.125 in (0, 1))")
        if not 1 <= self.level2_count <= masked_groups:
            raise BadInputError(f"level2_count: {self.level2_count} must be between 1 and the {int(masked_groups)} "
                                "masked level-1 groups")
        for name in ("level2_mask_ratio", "level3_mask_ratio"):
            if not 0 < getattr(self, name) < 1:
                raise BadInputError(f"{name}: {getattr(self, name)} must lie in (0, 1)")
        masked_level2_tokens = grid**3 - int(grid**3 * (1 - self.level2_mask_ratio))
        if not 1 <= self.level3_count <= masked_level2_tokens:
            raise BadInputError(f"level3_count: {self.level3_count} must be between 1 and the {masked_level2_tokens} "
                                "masked level-2 tokens")
        if self.alignment_temperature <= 0:
            raise BadInputError(f"alignment_temperature: {self.alignment_temperature} must be positive")


@dataclass(frozen=True)
class ViTMIMConfig:
    """MAE or SimMIM on a MONAI ViT (Chen et al. 2022, METHOD.md §14.2). Decoder fields are MAE-only."""

    in_channels: int = 1
    input_size: int = 96
    patch_size: int = 16  # UNETR fine-tuning needs 16 and 12 layers: MONAI fixes both
    hidden_size: int = 768  # ViT-B
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    mask_ratio: float = 0.75
    decoder_dim: int = 512  # MAE: 8 blocks × 512, 8 heads, learned positions
    decoder_depth: int = 8
    decoder_heads: int = 8

    def validate(self) -> None:
        if self.input_size % self.patch_size:
            raise BadInputError(f"input_size: {self.input_size} is not a multiple of patch_size {self.patch_size}")
        _check_heads("hidden_size", self.hidden_size, self.num_heads)
        _check_heads("decoder_dim", self.decoder_dim, self.decoder_heads)
        if not 0 < self.mask_ratio < 1:
            raise BadInputError(f"mask_ratio: {self.mask_ratio} must lie in (0, 1)")


@dataclass(frozen=True)
class MiMUNETRConfig:
    """The MiM encoder in a Swin-UNETR-style U-decoder (METHOD.md §9). feature_size = embed_dims[0]."""

    embed_dims: tuple[int, int, int, int] = (48, 96, 192, 384)  # must equal the pre-trained encoder's (§9.2)
    depths: tuple[int, int, int, int] = (2, 2, 2, 11)
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2  # linear over all 17 blocks (§9.2)
    layer_scale_init: float = 1.0  # gamma_1/gamma_2 (§9.2)

    def validate(self, roi_size: tuple[int, int, int]) -> None:
        _check_hybrid_encoder(16, self.embed_dims, self.num_heads)
        c = self.embed_dims[0]
        if tuple(self.embed_dims) != (c, 2 * c, 4 * c, 8 * c):
            raise BadInputError(f"embed_dims: {self.embed_dims} must be (f, 2f, 4f, 8f) for the U-decoder "
                                "(feature_size f = embed_dims[0])")
        _check_roi(roi_size)


@dataclass(frozen=True)
class UNETRConfig:
    """MONAI UNETR for ViT encoders pre-trained with MAE or SimMIM (METHOD.md §14.2)."""

    hidden_size: int = 768  # MONAI UNETR always builds 12 layers with 16³ patches
    mlp_dim: int = 3072
    num_heads: int = 12
    feature_size: int = 16

    def validate(self, roi_size: tuple[int, int, int]) -> None:
        _check_heads("hidden_size", self.hidden_size, self.num_heads)
        _check_roi(roi_size)


# Sizes of "small" chosen so one MiM step (21 passes) takes about a second on a 2-core CPU.
_SMALL_HYBRID = dict(embed_dims=(24, 48, 96, 192), depths=(1, 1, 1, 4), num_heads=6)
_SMALL_VIT = dict(hidden_size=192, mlp_dim=768, num_layers=12, num_heads=6)

PRESETS: dict[str, dict[str, object]] = {
    "mim": {
        "base": MiMConfig(),
        "small": MiMConfig(input_size=64, decoder_dim=192, decoder_depth=2, decoder_heads=6, **_SMALL_HYBRID),
    },
    "mae": {
        "base": ViTMIMConfig(),
        "small": ViTMIMConfig(input_size=64, decoder_dim=128, decoder_depth=2, decoder_heads=4, **_SMALL_VIT),
    },
    "simmim": {
        "base": ViTMIMConfig(),
        "small": ViTMIMConfig(input_size=64, **_SMALL_VIT),
    },
    "mim-unetr": {
        "base": MiMUNETRConfig(),
        "small": MiMUNETRConfig(**_SMALL_HYBRID),
    },
    "unetr": {
        "base": UNETRConfig(),
        "small": UNETRConfig(feature_size=8, hidden_size=192, mlp_dim=768, num_heads=6),
    },
}


def resolve(kind: str, preset: str = "base", **overrides: object):
    """The config for ``kind`` (mim, mae, simmim, mim-unetr, unetr) from a preset plus field overrides.

    Raises:
        BadInputError: unknown kind, preset or field (with the close matches), or a value of the wrong kind.
    """
    presets = PRESETS.get(kind) or _unknown("model", kind, PRESETS)
    config = presets.get(preset) or _unknown("preset", preset, presets)
    fields = {f.name: f for f in dataclasses.fields(config)}
    converted = {}
    for name, value in overrides.items():
        if name not in fields:
            _unknown(f"{kind} option", name, fields)
        converted[name] = _convert(name, value, getattr(config, name))
    return dataclasses.replace(config, **converted)


def config_to_dict(config) -> dict:
    """JSON-ready dict (Enums as their values, tuples as lists)."""
    return {k: (v.value if isinstance(v, Enum) else list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(config).items()}


def _convert(name: str, value: object, default: object) -> object:
    if isinstance(default, Enum):
        try:
            return type(default)(value.value if isinstance(value, Enum) else value)
        except ValueError:
            _unknown(f"value for {name}", str(value), [m.value for m in type(default)])
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple) or len(value) != len(default):
            raise BadInputError(f"{name}: expected {len(default)} values like {default}, got {value!r}")
        return tuple(type(d)(v) for d, v in zip(default, value, strict=True))
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise BadInputError(f"{name}: expected true or false, got {value!r}")
        return value
    try:
        return type(default)(value)
    except (TypeError, ValueError) as e:
        raise BadInputError(f"{name}: expected a {type(default).__name__}, got {value!r}") from e


def _unknown(what: str, name: str, valid) -> None:
    close = difflib.get_close_matches(name, list(valid), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise BadInputError(f"unknown {what} '{name}'.{hint} Valid: {', '.join(sorted(valid))}")


def _check_heads(name: str, dim: int, heads: int) -> None:
    if dim % heads:
        raise BadInputError(f"{name}: {dim} is not divisible by the number of heads {heads}")


def _check_hybrid_encoder(input_size: int, embed_dims: tuple, num_heads: int) -> None:
    if input_size % 16:
        raise BadInputError(f"input_size: {input_size} is not a multiple of 16 (four stride-2 stages)")
    _check_heads("embed_dims[3]", embed_dims[3], num_heads)


def _check_roi(roi_size: tuple[int, int, int]) -> None:
    if len(roi_size) != 3 or any(int(s) % 16 or int(s) <= 0 for s in roi_size):
        raise BadInputError(f"roi_size: {tuple(roi_size)} must be three positive multiples of 16")


__all__ = ["PRETRAINING_METHODS", "SEGMENTATION_ARCHS", "PRESET_NAMES", "DEVICES", "ENCODER_ARCH", "AlignForm",
           "Level1Grouping", "MiMConfig", "ViTMIMConfig", "MiMUNETRConfig", "UNETRConfig", "PRESETS", "resolve",
           "config_to_dict"]
