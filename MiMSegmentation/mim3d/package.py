"""Model packages: a folder (or a .zip of it) with `model.json` + `weights.safetensors`; no pickle anywhere.

Reading `model.json` needs only the standard library (the Slicer GUI lists models without torch); `save_package` and
`load_package` import torch and safetensors when called.

`model.json` schema (format_version 1)::

    {"format": "mim3d-model", "format_version": 1,
     "name": "abdomen-small", "version": "1.0.0", "description": "...", "license": "Apache-2.0",
     "architecture": {"arch": "mim-unetr", "preset": "small", "config": {...resolved fields...},
                      "num_classes": 7, "in_channels": 1},
     "preprocessing": {"orientation": "RAS", "spacing_mm": [1.5, 1.5, 2.0], "intensity_window_hu": [-175, 250],
                       "foreground_crop": true},
     "inference": {"roi_size": [96, 96, 96], "overlap": 0.5, "blend": "gaussian"},
     "labels": [{"value": 1, "name": "liver", "color": [221, 130, 101], "terminology": {...}}, ...],
     "provenance": {"pretrained_from": "...", "trained_on": "...", "validation_dice": {"liver": 0.93}, ...},
     "weights": {"file": "weights.safetensors", "sha256": "..."}}
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadInputError
from .labels import LabelTable
from .presets import SEGMENTATION_ARCHS

FORMAT, FORMAT_VERSION = "mim3d-model", 1
MODEL_JSON, WEIGHTS = "model.json", "weights.safetensors"


@dataclass(frozen=True)
class ModelInfo:
    """The parsed, checked content of a `model.json`."""

    name: str
    version: str
    architecture: dict[str, Any]  # arch, preset, config, num_classes, in_channels
    preprocessing: dict[str, Any]
    inference: dict[str, Any]
    labels: LabelTable
    weights_sha256: str
    description: str = ""
    license: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def roi_size(self) -> tuple[int, int, int]:
        return tuple(self.inference["roi_size"])

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "name": self.name, "version": self.version,
                "description": self.description, "license": self.license, "architecture": self.architecture,
                "preprocessing": self.preprocessing, "inference": self.inference,
                "labels": self.labels.to_dict()["labels"], "provenance": self.provenance,
                "weights": {"file": WEIGHTS, "sha256": self.weights_sha256}}


def read_model_json(folder: str | Path) -> ModelInfo:
    """Parse and check `folder/model.json`. Raises BadInputError naming the file and the field at fault."""
    path = Path(folder) / MODEL_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise BadInputError(f"{folder}: not a mim3d model package (no {MODEL_JSON})") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BadInputError(f"{path}: not a mim3d model description (\"format\" must be \"{FORMAT}\")")
    if data.get("format_version") != FORMAT_VERSION:
        raise BadInputError(f"{path}: format_version {data.get('format_version')!r} is not supported "
                            f"(this mim3d reads {FORMAT_VERSION})")

    def need(section: str, key: str | None = None, kind: type | tuple = dict):
        value = data.get(section) if key is None else (data.get(section) or {}).get(key)
        if not isinstance(value, kind):
            where = section if key is None else f"{section}.{key}"
            raise BadInputError(f"{path}: field {where} is missing or not a {getattr(kind, '__name__', kind)}")
        return value

    arch = need("architecture", "arch", str)
    if arch not in SEGMENTATION_ARCHS:
        raise BadInputError(f"{path}: architecture.arch '{arch}' is not one of {', '.join(SEGMENTATION_ARCHS)}")
    labels = LabelTable.from_dict({"labels": need("labels", kind=list)}, source=str(path))
    num_classes = need("architecture", "num_classes", int)
    if num_classes != labels.num_classes:
        raise BadInputError(f"{path}: architecture.num_classes {num_classes} does not match the labels "
                            f"(largest value {labels.num_classes - 1} needs {labels.num_classes} outputs)")
    roi = need("inference", "roi_size", list)
    if len(roi) != 3 or not all(isinstance(s, int) and s > 0 and s % 16 == 0 for s in roi):
        raise BadInputError(f"{path}: inference.roi_size {roi} must be three positive multiples of 16")
    need("preprocessing")
    return ModelInfo(name=need("name", kind=str), version=need("version", kind=str),
                     architecture=need("architecture"), preprocessing=data["preprocessing"],
                     inference=data["inference"], labels=labels, weights_sha256=need("weights", "sha256", str),
                     description=data.get("description", ""), license=data.get("license", ""),
                     provenance=data.get("provenance") or {})


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_package(folder: str | Path) -> ModelInfo:
    """The package's description after checking its weights' SHA-256 against `model.json` (standard library only)."""
    folder = Path(folder)
    info = read_model_json(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise BadInputError(f"{folder}: the package has no {WEIGHTS}")
    if file_sha256(weights) != info.weights_sha256:
        raise BadInputError(f"{weights}: SHA-256 does not match model.json; the package is corrupt or was altered")
    return info


def save_package(folder: str | Path, model, info: ModelInfo) -> ModelInfo:
    """Write `model`'s weights and `info` as a package at `folder`, atomically (a temporary sibling folder renamed
    into place; an existing package there is replaced only once the new one is complete). Returns the info with the
    weights' SHA-256 filled in."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, staging / WEIGHTS, metadata={"format": FORMAT})
        info = ModelInfo(**{**info.__dict__, "weights_sha256": file_sha256(staging / WEIGHTS)})
        (staging / MODEL_JSON).write_text(json.dumps(info.to_dict(), indent=1) + "\n", encoding="utf-8")
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            os.replace(folder, old)
            os.replace(staging, folder)
            shutil.rmtree(old)
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def load_package(folder: str | Path, device: str = "cpu"):
    """Build the network a package describes and load its weights (checksum and every tensor's name and shape
    checked). Returns (model in eval mode on `device`, ModelInfo)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import build_segmenter

    folder = Path(folder)
    info = verify_package(folder)
    weights = folder / WEIGHTS
    a = info.architecture
    model = build_segmenter(a["arch"], a["num_classes"], preset=a.get("preset", "base"), roi_size=info.roi_size,
                            in_channels=a.get("in_channels", 1), **_config_overrides(a))
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise BadInputError(f"{weights}: not a readable safetensors file ({e})") from e
    expected = model.state_dict()
    wrong = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if wrong or missing or extra:
        raise BadInputError(f"{weights}: weights do not match the {a['arch']} described in model.json "
                            f"(shape differs: {wrong[:3]}, missing: {missing[:3]}, unexpected: {extra[:3]})")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), info


def _config_overrides(architecture: dict[str, Any]) -> dict[str, Any]:
    """The stored config as overrides of its preset (lists back to tuples happen in presets.resolve)."""
    return dict(architecture.get("config") or {})


def is_package(path: str | Path) -> bool:
    """A package folder (with model.json) or a .zip file (standard library only)."""
    path = Path(path)
    return (path / MODEL_JSON).is_file() if path.is_dir() else path.suffix.lower() == ".zip" and path.is_file()


def load_package_start(model, path: str | Path, arch: str, in_channels: int, table: LabelTable) -> dict:
    """Start a fine-tuning `model` (built for `arch`, `in_channels` and the label table `table`) from the package at
    `path`, a folder or a .zip: every tensor but the output head's loads as it is; the head's row of each label of
    `table` whose name (case-insensitive) the package also has is copied, background's too, and the other rows keep
    their fresh initialisation. Returns what was loaded (config.json "pretrained").

    Raises:
        BadInputError: not a package, a failed checksum, or a package of another architecture, input channel count
            or network size (naming the package and the difference).
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .registry import _extract

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="mim3d-package-") as tmp:
        folder = _extract(path, Path(tmp)) if path.is_file() else path
        info = verify_package(folder)
        try:
            state = load_file(folder / WEIGHTS)
        except (SafetensorError, OSError) as e:
            raise BadInputError(f"--pretrained {path}: {WEIGHTS} is not a readable safetensors file ({e})") from e
    a = info.architecture
    if a["arch"] != arch:
        raise BadInputError(f"--pretrained {path}: a {a['arch']} model package, but this run fine-tunes {arch}; give "
                            f"--arch {a['arch']} to start from it")
    if a.get("in_channels", 1) != in_channels:
        raise BadInputError(f"--pretrained {path}: the package's network takes {a.get('in_channels', 1)} input "
                            f"channel(s), this run {in_channels}; it cannot start this run")
    expected = model.state_dict()
    head = {k for k in expected if k.startswith("out.")}  # the 1×1×1 output conv: one row per class
    missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = sorted(f"{k} {tuple(state[k].shape)} (this run: {tuple(v.shape)})" for k, v in expected.items()
                   if k in state and k not in head and state[k].shape != v.shape)
    if missing or extra or wrong:
        raise BadInputError(f"--pretrained {path}: the package's {a['arch']} ({a.get('preset')}, config "
                            f"{json.dumps(a.get('config'))}, roi {list(info.roi_size)}) differs from this run's "
                            f"network (missing: {missing[:3]}, unexpected: {extra[:3]}, shape differs: {wrong[:3]}); "
                            "give the package's --preset, --override values and --roi")
    old = {label.name.lower(): label.value for label in info.labels}
    rows = {0: 0} | {label.value: old[label.name.lower()] for label in table if label.name.lower() in old}
    with torch.no_grad():
        for key in head:
            target = expected[key].clone()
            for new, source in rows.items():
                target[new] = state[key][source]
            state[key] = target
    model.load_state_dict(state, strict=True)
    kept = [label.name for label in table if label.value in rows]
    new = [label.name for label in table if label.value not in rows]
    return {"from": str(path), "checkpoint": str(path), "source": "mim3d-package", "method": a["arch"],
            "package": {"name": info.name, "version": info.version, "labels": [label.name for label in info.labels]},
            "loaded": len(state), "kept_labels": kept, "new_labels": new,
            "summary": (f"{path.name} (mim3d model package {info.name} {info.version}): loaded all {len(state)} "
                        f"tensors; output rows kept for background and {len(kept)} label(s) of the same name "
                        f"({', '.join(kept) or 'none'}), initialised for {len(new)} ({', '.join(new) or 'none'})")}
