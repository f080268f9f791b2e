"""Segment CT volumes with a model package; the labels land on exactly each input's grid.

    mim3d segment ct.nii.gz --model mim3d-demo/finetune/model --output ct.seg.nrrd
    mim3d segment dicom_folder/ a.nii.gz b.nrrd --model path/to/package --output results/ --device cuda
    mim3d segment ct.nrrd --model my-organs --output seg.nii.gz --fast --roi -120 -80 -400 140 150 -150

INPUT is a volume file (.nii.gz, .nii, .nrrd, .mha) or a folder holding one DICOM series; several inputs are a batch,
and --output is then a folder. --output FILE: the format follows its suffix: .seg.nrrd (a Slicer segmentation with
the model's segment names, colours and terminology), .nii.gz / .nii / .nrrd / .mha (a plain uint8 labelmap);
--output FOLDER: one <input name>.seg.nrrd per input. --model is an installed model id (`mim3d models list`) or a
package folder. --roi takes two opposite corners in RAS mm, as Slicer shows them. --keep-largest alone keeps the
largest connected component of every label; followed by label names, of those only.

Progress: stages load, preprocess, windows (one event per window batch), postprocess, write, for each input; then
one result event with the outputs, the device and the timings. SIGTERM or Ctrl-C stops between windows (exit code
130) and leaves no output file for the input in progress.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import io, registry
from ..errors import BadInputError, Cancelled
from ..package import ModelInfo, load_package
from ..presets import DEVICES
from ..protocol import Emitter
from ..runtime import keep_freed_memory
from ..training.run_writer import StopController
from .output import OUTPUT_SUFFIXES, output_suffix, write_labels
from .pipeline import segment_volume

log = logging.getLogger("mim3d.segment")
FOLDER_OUTPUT_SUFFIX = ".seg.nrrd"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="volume file or DICOM series folder")
    parser.add_argument("--model", required=True, help="installed model id or package folder")
    parser.add_argument("--output", required=True, help="output file (one input) or folder")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: the GPU when there is one (default)")
    parser.add_argument("--fast", action="store_true", help="predict at twice the model spacing (less accurate)")
    parser.add_argument("--overlap", type=float, help="window overlap in [0, 1) (default: the model's)")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation: average over axis flips (4×)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="mixed precision where the device computes it natively: bf16/fp16 on a GPU, bf16 on CPUs "
                             "with AMX or AVX512-BF16 (default); --no-amp: float32 everywhere")
    parser.add_argument("--keep-largest", nargs="*", metavar="LABEL",
                        help="keep only the largest connected component (of every label, or of the named ones); "
                             "put it after the inputs")
    parser.add_argument("--roi", nargs=6, type=float, metavar=("R0", "A0", "S0", "R1", "A1", "S1"),
                        help="compute only inside this box: two opposite corners in RAS mm")


def run(args: argparse.Namespace, emitter: Emitter) -> None:
    """Segment every input (module docstring); a stop request ends it with ``Cancelled``."""
    stop = StopController(None)  # first, so that a SIGTERM during start-up also ends with exit code 130
    try:
        _run(args, emitter, stop.requested)
    finally:
        stop.close()


@dataclass(frozen=True)
class _Job:
    """What every input of a run shares: the model, the device and the user's options."""

    model: torch.nn.Module
    info: ModelInfo
    device: torch.device
    fast: bool
    overlap: float | None
    tta: bool
    amp: bool
    keep_largest: bool | set[str]
    roi_lps: tuple | None
    cancel: Callable[[], bool]


def _run(args: argparse.Namespace, emitter: Emitter, cancel: Callable[[], bool]) -> None:
    inputs = [Path(p) for p in args.inputs]
    for path in inputs:
        _check_input(path)
    outputs = _output_paths(inputs, Path(args.output))
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise BadInputError(f"--overlap {args.overlap:g}: must be at least 0 and below 1 (0.5: windows overlap by "
                            "half).")
    device = _device(args.device)
    if device.type == "cpu":
        keep_freed_memory()
    folder = registry.resolve_model(args.model)
    model, info = load_package(folder, "cpu")
    job = _Job(model, info, device, args.fast, args.overlap, args.tta, args.amp,
               False if args.keep_largest is None else (set(args.keep_largest) or True),
               None if args.roi is None else _ras_box_to_lps(args.roi), cancel)
    cases, warnings = [], []
    for n, (source, target) in enumerate(zip(inputs, outputs, strict=True), start=1):
        if cancel():
            raise Cancelled(f"stopped before {source}")
        prefix = f"[{n}/{len(inputs)}] " if len(inputs) > 1 else ""
        cases.append(_segment_one(source, target, job, emitter, prefix, warnings))
    emitter.result(outputs=[c["output"] for c in cases], cases=cases, device=cases[-1]["device"],
                   model={"name": info.name, "version": info.version, "path": str(folder)}, warnings=warnings)


def _segment_one(source: Path, target: Path, job: _Job, emitter: Emitter, prefix: str, warnings: list[str]) -> dict:
    """Read, segment and write one input; the case's entry of the result event."""
    stage = {"name": "load"}

    def progress(name: str, fraction: float, message: str) -> None:
        stage["name"] = name
        emitter.progress(name, fraction, prefix + message)

    def warn(message: str) -> None:
        log.warning("%s: %s", source, message)
        warnings.append(f"{source}: {message}")
        emitter.progress(stage["name"], 0.0, f"{prefix}warning: {message}")

    started = time.perf_counter()
    progress("load", 0.0, f"reading {source}")
    image = io.read_volume(source)
    timings = {"load": time.perf_counter() - started}
    progress("load", 1.0, f"{'×'.join(map(str, image.GetSize()))} voxels of "
                          f"{'×'.join(f'{s:.3g}' for s in image.GetSpacing())} mm")
    report: dict = {}
    labels = segment_volume(image, job.model, job.info, device=job.device, fast=job.fast, overlap=job.overlap,
                            tta=job.tta, amp=job.amp, keep_largest=job.keep_largest, roi_lps=job.roi_lps,
                            progress=progress, cancel=job.cancel, warn=warn, report=report)
    del image
    timings.update(report["timings_s"])
    if job.cancel():
        raise Cancelled("stopped before writing")
    written = time.perf_counter()
    progress("write", 0.0, f"writing {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_labels(labels, job.info.labels, target)
    if job.cancel():  # the stop came while writing: this input's output must not remain
        target.unlink(missing_ok=True)
        raise Cancelled("stopped while writing; the output was removed")
    timings["write"] = time.perf_counter() - written
    timings["total"] = time.perf_counter() - started
    progress("write", 1.0, f"wrote {target}")
    return {"input": str(source), "output": str(target), "device": report["device"], "plan": report.get("plan"),
            "windows": report["windows"], "empty_windows": report["empty_windows"],
            "model_grid": report["model_grid"], "timings_s": {k: round(v, 3) for k, v in timings.items()}}


def _check_input(path: Path) -> None:
    """Refuse an input before any work: missing, unreadable header, not 3-D, or a folder without one series."""
    if path.is_dir():
        series = io.list_dicom_series(path)
        if len(series) != 1:
            found = "no readable DICOM series" if not series else f"{len(series)} DICOM series"
            raise BadInputError(f"{path}: holds {found}; give a folder with exactly one series, or a volume file.")
    elif not path.exists():
        raise BadInputError(f"{path}: no such file or folder.")
    else:
        io.check_geometry(io.read_geometry(path), path)


def _output_paths(inputs: list[Path], output: Path) -> list[Path]:
    """One output path per input: ``output`` itself for one input and a format suffix, else files in a folder."""
    if output_suffix(output) is not None and not output.is_dir():
        if len(inputs) > 1:
            raise BadInputError(f"--output {output}: with {len(inputs)} inputs, give a folder (one "
                                f"<name>{FOLDER_OUTPUT_SUFFIX} per input), not a file.")
        return [output]
    if output.exists() and not output.is_dir():
        raise BadInputError(f"--output {output}: exists and is not a folder, and its suffix is not an output format "
                            f"({', '.join(OUTPUT_SUFFIXES)}).")
    if not output.exists() and "." in output.name and not output.name.startswith("."):
        raise BadInputError(f"--output {output}: '{output.name}' is not an output format ({', '.join(OUTPUT_SUFFIXES)})"
                            "; or give a folder name without a dot.")
    names = [(io.volume_stem(p) if p.is_file() else p.resolve().name) + FOLDER_OUTPUT_SUFFIX for p in inputs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise BadInputError(f"inputs: several inputs would write the same output {repeated} in {output}; rename them "
                            "or run them separately.")
    return [output / name for name in names]


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"--device cuda: no CUDA GPU is usable here (torch {torch.__version__}, CUDA build "
                            f"{torch.version.cuda or 'none'}); use --device cpu or auto.")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _ras_box_to_lps(corners: list[float]) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """--roi R0 A0 S0 R1 A1 S1 (RAS, Slicer's frame) -> two corners in LPS (SimpleITK's): x and y change sign."""
    r0, a0, s0, r1, a1, s1 = corners
    return (-r0, -a0, s0), (-r1, -a1, s1)
