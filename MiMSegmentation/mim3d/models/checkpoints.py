"""Checkpoint files: mim3d's own format, safe reading of official MiM checkpoints, and loading pre-trained weights with
a report of what was loaded, ignored and left at initialisation (METHOD.md §9.4, §10; STYLE §10).

Formats read:
- "mim3d": a dict {"format": "mim3d-checkpoint", "format_version": 1, "method", "config", "model", ...}, written by
  `save_checkpoint` from tensors and plain data only.
- "official-mim": the official `checkpoint-final.pth`, a dict with the state dict under "model" (no `module.` prefix)
  beside "optimizer", "epoch", "scaler" and an argparse.Namespace "args" (§10.1).

Every file is unpickled with `weights_only=True`; argparse.Namespace is the only extra class allowed, so a file whose
unpickling would run code is refused before anything runs. Loading follows nanoGPT's `from_pretrained`: keys are
mapped explicitly, every shape is checked, every encoder tensor of the checkpoint must land in the model, and the
model is then loaded with strict=True.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import UNETR
from torch import Tensor, nn

from ..errors import BadInputError
from ..presets import PRETRAINING_METHODS
from .mim import MiMPretrainer
from .mim_unetr import MiMUNETR

FORMAT = "mim3d-checkpoint"
FORMAT_VERSION = 1
SAFE_GLOBALS = [argparse.Namespace]  # the official checkpoints pickle their command line under "args" (§10.1)

# Checkpoint keys of the MiM encoder (§10.2); everything else in a MiM checkpoint is pre-training only (§10.3).
MIM_ENCODER_KEY = re.compile(r"(patch_embed[1-5]|pos_embed|blocks[1-4])(\.|$)")
# Backbone keys that exist only when fine-tuning (§9.2): they stay at their initialisation.
FINE_TUNING_ONLY_KEY = re.compile(r"^fpn\.|\.gamma_[12]$|\.relative_position_(bias_table|index)$")
VIT_PREFIX = "vit."  # MONAI ViT of UNETR, and of the MAE / SimMIM pre-training models


@dataclass
class LoadReport:
    """What `load_pretrained` did. Model keys are the model's state-dict names; ignored keys are the checkpoint's."""

    path: Path
    source: str  # "official-mim" or "mim3d"
    method: str  # the pre-training method of the checkpoint: mim, mae or simmim
    loaded: list[str]  # model keys set from the checkpoint
    ignored: list[str]  # checkpoint keys not used (pre-training decoder, heads, …)
    missing: list[str]  # model keys left at their initialisation (decoder, fine-tuning additions)
    adapted: list[str] = field(default_factory=list)  # tensors changed to fit, e.g. interpolated positions

    def summary(self) -> str:
        text = (f"{self.path.name} ({self.source}, {self.method}): loaded {len(self.loaded)} tensors, ignored "
                f"{len(self.ignored)}, left at initialisation {len(self.missing)}")
        return text + (f"; {'; '.join(self.adapted)}" if self.adapted else "")


# ---- writing ------------------------------------------------------------------------------------------------------

def save_checkpoint(path: str | Path, *, method: str, config: dict, model_state: dict[str, Tensor],
                    **extra: object) -> Path:
    """Write a mim3d checkpoint atomically: a temporary file in the same folder, then `os.replace`.

    Args:
        method: what the weights are, e.g. "mim", "mae", "simmim" (pre-training) or a segmentation arch.
        config: the model's resolved config as plain JSON data (`mim3d.presets.config_to_dict`).
        model_state: the state dict.
        extra: further entries (optimizer / scaler state, epoch, …) made of tensors and plain data only.
    Returns:
        the path written. A reader never sees a partial file: it finds the old file or the complete new one.
    Raises:
        TypeError: an entry that `torch.load(weights_only=True)` could not read back (named by its place).
    """
    path = Path(path)
    clash = sorted(extra.keys() & {"format", "format_version", "model"})
    if clash:
        raise TypeError(f"save_checkpoint: extra entries {clash} would overwrite the format fields")
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": method, "config": config,
               "model": OrderedDict(model_state), **extra}
    _check_plain_data(payload, "checkpoint")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_plain_data(obj: object, where: str) -> None:
    """Raise TypeError at the first value a weights-only unpickler would refuse."""
    if isinstance(obj, Tensor) or obj is None or type(obj) in (str, int, float, bool):
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; use str or int keys")
            _check_plain_data(value, f"{where}[{key!r}]")
        return
    if type(obj) in (list, tuple, torch.Size):
        for i, value in enumerate(obj):
            _check_plain_data(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}; checkpoints hold only tensors and plain data "
                    "(dict, list, tuple, str, int, float, bool, None)")


# ---- reading ------------------------------------------------------------------------------------------------------

def read_checkpoint(path: str | Path) -> tuple[str, dict]:
    """Read a checkpoint without running code from it.

    Returns:
        (kind, payload): kind "mim3d" or "official-mim"; payload the whole dict, state dict under "model".
    Raises:
        BadInputError: missing file, unreadable or truncated file, a refused pickle global, or an unknown layout.
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path}: no such file")
    if path.is_dir():
        raise BadInputError(f"{path}: is a folder; expected a checkpoint file (e.g. checkpoint-final.pth)")
    payload = _load_weights_only(path)
    if not isinstance(payload, dict):
        raise BadInputError(f"{path}: holds a {type(payload).__name__}, expected a checkpoint dict with a 'model' "
                            "state dict (an official MiM checkpoint-final.pth or a mim3d checkpoint)")
    if payload.get("format") == FORMAT:
        _check_mim3d_fields(path, payload)
        kind = "mim3d"
    elif "model" in payload:
        kind = "official-mim"
    else:
        keys = ", ".join(sorted(map(str, payload))[:8]) or "none"
        raise BadInputError(f"{path}: no 'model' entry (top-level keys: {keys}); expected an official MiM "
                            "checkpoint-final.pth or a mim3d checkpoint")
    _check_state_dict(path, payload["model"])
    return kind, payload


def _load_weights_only(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused:
            raise BadInputError(
                f"{path}: refused to unpickle '{refused.group(1)}': unpickling it could run code, and mim3d only "
                "reads checkpoints made of tensors and plain data (argparse.Namespace allowed). Re-save the weights "
                "from a trusted environment, or use a file from a source you trust.") from e
        raise BadInputError(f"{path}: not a readable PyTorch checkpoint ({_first_sentence(e)})") from e
    except MemoryError:
        raise
    except Exception as e:  # zip reader, legacy unpickler and storage errors all mean the same to the user
        hint = (" A .safetensors file holds bare weights; load_pretrained needs a pre-training checkpoint (.pth)."
                if path.suffix == ".safetensors" else "")
        raise BadInputError(f"{path}: cannot be read as a PyTorch checkpoint; it is truncated, corrupt or another "
                            f"kind of file ({type(e).__name__}: {_first_sentence(e)}).{hint}") from e


def _first_sentence(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.split(r"(?<=\w)\. ", text, maxsplit=1)[0][:200]  # torch appends paragraphs of advice


def _check_mim3d_fields(path: Path, payload: dict) -> None:
    version = payload.get("format_version")
    if not isinstance(version, int):
        raise BadInputError(f"{path}: mim3d checkpoint without an integer format_version (found {version!r})")
    if version > FORMAT_VERSION:
        raise BadInputError(f"{path}: written by a newer mim3d (format_version {version}, this one reads up to "
                            f"{FORMAT_VERSION}); update mim3d")
    for name, kind in (("method", str), ("config", dict), ("model", dict)):
        if not isinstance(payload.get(name), kind):
            raise BadInputError(f"{path}: mim3d checkpoint whose '{name}' is {type(payload.get(name)).__name__}, "
                                f"expected {kind.__name__}")


def _check_state_dict(path: Path, state: object) -> None:
    if not isinstance(state, dict) or not state:
        raise BadInputError(f"{path}: 'model' is {'empty' if isinstance(state, dict) else type(state).__name__}, "
                            "expected a state dict of named tensors")
    bad = [str(k) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise BadInputError(f"{path}: 'model' holds {len(bad)} entries that are not named tensors, e.g. {bad[:3]}")


# ---- loading pre-trained weights ------------------------------------------------------------------------------------

def load_pretrained(model: nn.Module, path: str | Path) -> LoadReport:
    """Load pre-trained weights from `path` into `model` and say exactly what happened.

    - MiM pre-training model <- official or mim3d "mim" checkpoint; MAE / SimMIM pre-training model <- mim3d
      checkpoint of the same method: exact, every key and shape must match (continued pre-training).
    - mim-unetr <- MiM encoder (§9.4): patch_embed1–5, pos_embed and blocks1–4 go to `backbone.*`; positions are
      interpolated to the ROI's grid, the first conv tiled to the input channels; the pre-training decoder, fusion
      convs and final norm are ignored; layer-scale, relative position bias, fpn and the U-decoder stay as built.
    - MONAI UNETR <- MAE / SimMIM ViT: the checkpoint's `vit.*` tensors, positions interpolated to the ROI's grid.

    Raises:
        BadInputError: an unreadable or unsafe file, a checkpoint of another method or size, or any encoder tensor of
            the checkpoint that would not land in the model.
    """
    path = Path(path)
    kind, payload = read_checkpoint(path)
    method = payload["method"] if kind == "mim3d" else "mim"
    state = payload["model"]
    target = _target_of(model)
    if method not in PRETRAINING_METHODS:
        raise BadInputError(f"{path}: holds '{method}' weights, not a pre-training checkpoint; load_pretrained takes "
                            f"{', '.join(PRETRAINING_METHODS)} checkpoints")
    if target in PRETRAINING_METHODS:
        if method != target:
            raise BadInputError(f"{path}: a {method} checkpoint cannot continue {target} pre-training; "
                                f"build the {method} pre-training model instead")
        return _load_exact(model, path, kind, method, state)
    if target == "mim-unetr":
        if method != "mim":
            raise BadInputError(f"{path}: a {method} checkpoint holds a ViT encoder; fine-tune it with arch 'unetr', "
                                "not 'mim-unetr'")
        backbone = {k: "backbone." + k for k in model.backbone.state_dict() if not FINE_TUNING_ONLY_KEY.search(k)}
        encoder = {k for k in state if MIM_ENCODER_KEY.match(k)}
        return _load_encoder(model, path, kind, method, state, backbone, encoder, model.backbone.grid,
                             pos_key="pos_embed", input_key="patch_embed1.proj.weight")
    if method == "mim":
        raise BadInputError(f"{path}: a MiM checkpoint holds the hybrid MiM encoder; fine-tune it with arch "
                            "'mim-unetr', not 'unetr'")
    vit = {k: k for k in model.state_dict() if k.startswith(VIT_PREFIX)}
    encoder = {k for k in state if k.startswith(VIT_PREFIX)}
    first = next(k for k in ("vit.patch_embedding.patch_embeddings.weight",  # proj_type "conv"
                             "vit.patch_embedding.patch_embeddings.1.weight") if k in vit)  # "perceptron"
    return _load_encoder(model, path, kind, method, state, vit, encoder, tuple(model.feat_size),
                         pos_key="vit.patch_embedding.position_embeddings", input_key=first,
                         patch_voxels=math.prod(model.patch_size))


def _target_of(model: nn.Module) -> str:
    """What `model` is: a pre-training method (mim, mae, simmim) or a segmentation arch (mim-unetr, unetr)."""
    if isinstance(model, MiMPretrainer):
        return "mim"
    if isinstance(model, MiMUNETR):
        return "mim-unetr"
    if isinstance(model, UNETR):
        return "unetr"
    # recognised by class name, which keeps this module free of imports of the MAE and SimMIM models
    by_name = {"MAEPretrainer": "mae", "SimMIMPretrainer": "simmim"}
    if type(model).__name__ in by_name:
        return by_name[type(model).__name__]
    raise TypeError(f"load_pretrained: cannot load into a {type(model).__name__}; expected a mim3d pre-training "
                    "model, MiMUNETR or MONAI UNETR")


def _load_exact(model: nn.Module, path: Path, kind: str, method: str, state: dict[str, Tensor]) -> LoadReport:
    """Every key and shape must match; then a strict load."""
    expected = model.state_dict()
    problems = [f"{k} missing from the checkpoint" for k in sorted(expected.keys() - state.keys())]
    problems += [f"{k} not in the model" for k in sorted(state.keys() - expected.keys())]
    problems += [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        raise BadInputError(f"{path}: does not match this {method} model ({len(problems)} differences, e.g. "
                            f"{'; '.join(problems[:4])}); build the model with the preset and input size it was "
                            "pre-trained with")
    model.load_state_dict(state, strict=True)
    return LoadReport(path, kind, method, loaded=sorted(state), ignored=[], missing=[])


def _load_encoder(model: nn.Module, path: Path, kind: str, method: str, state: dict[str, Tensor],
                  targets: dict[str, str], encoder: set[str], grid: tuple[int, int, int], *, pos_key: str,
                  input_key: str, patch_voxels: int = 1) -> LoadReport:
    """Copy the checkpoint's encoder into a segmenter.

    Args:
        targets: checkpoint key -> model key, for every model encoder tensor that pre-training provides.
        encoder: the checkpoint's encoder keys; each must be a key of `targets` (none may be dropped).
        grid: the model's token grid; the positions `pos_key` are interpolated to it, the first layer `input_key`
            tiled to the model's input channels (patch_voxels: voxels per patch of a perceptron patch embedding).
    """
    if not encoder:
        raise BadInputError(f"{path}: holds no encoder weights this {method} loader recognises; is it a {method} "
                            "pre-training checkpoint?")
    absent, surplus = sorted(targets.keys() - state.keys()), sorted(encoder - targets.keys())
    if absent or surplus:
        problems = [f"{len(absent)} model tensors missing from the checkpoint (e.g. {', '.join(absent[:3])})"] * bool(
            absent) + [f"{len(surplus)} checkpoint encoder tensors the model has no place for (e.g. "
                       f"{', '.join(surplus[:3])})"] * bool(surplus)
        raise BadInputError(f"{path}: its encoder does not match this model: {'; '.join(problems)}; use the preset "
                            "the encoder was pre-trained with")
    model_state = model.state_dict()
    mapped, adapted, mismatched = {}, [], []
    for key, model_key in targets.items():
        tensor = state[key]
        if key == pos_key:
            tensor, note = _resize_positions(path, tensor, grid)
        elif key == input_key:
            tensor, note = _tile_input_channels(path, tensor, model_state[model_key].shape, patch_voxels)
        else:
            note = None
        if tensor.shape != model_state[model_key].shape:
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)}, model {tuple(model_state[model_key].shape)}")
        if note:
            adapted.append(f"{model_key} {note}")
        mapped[model_key] = tensor
    if mismatched:
        raise BadInputError(f"{path}: {len(mismatched)} encoder tensors have other shapes than the model's (e.g. "
                            f"{'; '.join(mismatched[:3])}); use the preset the encoder was pre-trained with")
    if len(mapped) != len(encoder):  # every encoder tensor of the checkpoint lands in the model (§15.3)
        raise BadInputError(f"{path}: loaded {len(mapped)} of its {len(encoder)} encoder tensors")
    model.load_state_dict({**model_state, **mapped}, strict=True)
    return LoadReport(path, kind, method, loaded=sorted(mapped), ignored=sorted(state.keys() - targets.keys()),
                      missing=sorted(model_state.keys() - mapped.keys()), adapted=adapted)


def _resize_positions(path: Path, positions: Tensor, grid: tuple[int, int, int]) -> tuple[Tensor, str | None]:
    """(1, g³, C) on a cubic pre-training grid -> (1, gh·gw·gd, C), trilinear, align_corners=False (§9.4).

    Tokens are in H·W·D raster order, D fastest, on both sides.
    """
    tokens, channels = positions.shape[-2], positions.shape[-1]
    side = round(tokens ** (1 / 3))
    if positions.ndim != 3 or side**3 != tokens:
        raise BadInputError(f"{path}: positional embedding of shape {tuple(positions.shape)} is not (1, g³, C) for a "
                            "cubic token grid")
    if (side,) * 3 == tuple(grid):
        return positions, None
    x = positions.reshape(1, side, side, side, channels).permute(0, 4, 1, 2, 3).float()  # (1, C, g, g, g)
    x = F.interpolate(x, size=tuple(grid), mode="trilinear", align_corners=False)  # (1, C, gh, gw, gd)
    resized = x.permute(0, 2, 3, 4, 1).reshape(1, -1, channels).to(positions.dtype)  # (1, gh·gw·gd, C)
    return resized, f"interpolated from the {side}×{side}×{side} to the {'×'.join(map(str, grid))} token grid"


def _tile_input_channels(path: Path, weight: Tensor, shape: torch.Size,
                         patch_voxels: int) -> tuple[Tensor, str | None]:
    """First-layer weight -> the model's input channels by repetition, as the official loader does (§9.4).

    A conv weight (O, c, k, k, k) repeats along dim 1. MONAI's "perceptron" patch embedding is a Linear (O, k³·c) on
    patches flattened with channels innermost, so there the c columns of each of the k³ = patch_voxels voxels repeat.
    """
    if weight.shape == shape or weight.ndim != len(shape) or weight.shape[0] != shape[0]:
        return weight, None  # equal, or a mismatch that the caller's shape check reports
    perceptron = weight.ndim == 2
    grouped = weight.reshape(shape[0], patch_voxels, -1) if perceptron else weight  # (O, k³, c) or (O, c, k, k, k)
    axis = 2 if perceptron else 1
    have, want = grouped.shape[axis], shape[1] // patch_voxels if perceptron else shape[1]
    if want % have:
        raise BadInputError(f"{path}: the first layer takes {have} input channels, which cannot be tiled to the "
                            f"model's {want}")
    repeats = [1] * grouped.ndim
    repeats[axis] = want // have
    return grouped.repeat(*repeats).reshape(shape), f"tiled from {have} to {want} input channels"
