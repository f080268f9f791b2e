"""The labelled cases of a fine-tuning run: source, label table, label map, the training / validation split, and the
check that reads every case once before anything is written.

Split rules: `--val-cases` names the validation cases; otherwise `--val-fraction` F holds out round(F × N) cases, at
least one when there are two or more, drawn with the run's seed. With a single case, or F = 0, the model is validated
on its training cases, and the log says so: the Dice then tells how well the model fits, not how well it generalises.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import cases_from_dataset_json, cases_from_folders, cases_from_segmentations, validate_cases
from ..data.finetune_sources import FinetuneCase
from ..errors import BadInputError
from ..labels import LabelTable
from ..protocol import Emitter
from ..run_options import FinetuneOptions
from .distributed import derive_seed

log = logging.getLogger("mim3d.training")


@dataclass(frozen=True)
class FinetuneData:
    """Checked cases and their label table; `train` and `val` are views of `cases` (they may share cases)."""

    cases: list[FinetuneCase]
    table: LabelTable
    train: list[FinetuneCase]
    val: list[FinetuneCase]
    source: str  # what the cases came from, for config.json and the package's provenance
    split_note: str

    def describe(self) -> str:
        return (f"{len(self.cases)} labelled cases from {self.source}; {len(self.train)} for training, "
                f"{len(self.val)} for validation ({self.split_note}); labels: {self.table.describe()}")

    def to_config(self) -> dict:
        """config.json "data": what --resume compares, and what the model package's provenance cites."""
        return {"source": self.source, "labels": self.table.to_dict()["labels"],
                "cases": [{"name": c.name, "image": str(c.image_path), "label": str(c.label)} for c in self.cases],
                "train": [c.name for c in self.train], "val": [c.name for c in self.val], "split": self.split_note}


def load_data(opts: FinetuneOptions) -> FinetuneData:
    """Find the cases, take the label table, apply the label map, check every case, and split.

    Raises:
        BadInputError: no case, a missing label, an invalid table or map, a grid mismatch, a label value outside the
            table (every problem of every case in one message), or an unknown --val-cases name.
    """
    cases, table, source = _cases_and_table(opts)
    if not cases:
        raise BadInputError(f"{source}: no labelled case found")
    if opts.label_map is not None:
        cases = [dataclasses.replace(c, label_map=_typed_map(c, opts.label_map)) for c in cases]
    elif opts.label_table and opts.segmentations:
        cases = [dataclasses.replace(c, label_map=_names_to_table(c, table)) for c in cases]
    validate_cases(cases, table)
    train, val, note = split(cases, opts)
    return FinetuneData(cases, table, train, val, source, note)


def label_table(opts: FinetuneOptions) -> LabelTable:
    """The run's label table from the source's file listing and headers alone, no image read (what --check-plan
    needs: the class count). Raises BadInputError as `load_data` does for a missing source or no case."""
    cases, table, source = _cases_and_table(opts)
    if not cases:
        raise BadInputError(f"{source}: no labelled case found")
    return table


def _cases_and_table(opts: FinetuneOptions) -> tuple[list[FinetuneCase], LabelTable | None, str]:
    table = LabelTable.load(opts.label_table) if opts.label_table else None
    if opts.images:
        return cases_from_folders(opts.images, opts.labels), table, f"{opts.images} + {opts.labels}"
    if opts.dataset:
        cases, own = cases_from_dataset_json(opts.dataset)
        return cases, table or own, opts.dataset
    cases, own = cases_from_segmentations(opts.segmentations)
    return cases, table or own, opts.segmentations


def _typed_map(case: FinetuneCase, label_map: dict[str, int]) -> dict:
    """--label-map keys as the case's labels hold them: segment names for .seg.nrrd, voxel values otherwise."""
    if case.is_segmentation:
        return dict(label_map)
    if bad := [k for k in label_map if not k.isdigit()]:
        raise BadInputError(f"--label-map: keys {', '.join(map(repr, bad))} are not label values; {case.label} is a "
                            "label map, so the keys are its voxel values (segment names only for .seg.nrrd files)")
    return {int(k): v for k, v in label_map.items()}


def _names_to_table(case: FinetuneCase, table: LabelTable) -> dict[str, int]:
    """A .seg.nrrd's segments onto a given --label-table, by name; a segment the table lacks is refused."""
    names = list(case.label_map or {})
    unknown = [n for n in names if table.by_name(n) is None]
    if unknown:
        raise BadInputError(f"{case.label}: case {case.name} has segments {', '.join(map(repr, unknown))} that are not "
                            f"in the label table {table.source} ({table.describe()}); add them, or map them with "
                            "--label-map")
    return {n: table.by_name(n).value for n in names}


def split(cases: list[FinetuneCase], opts: FinetuneOptions) -> tuple[list[FinetuneCase], list[FinetuneCase], str]:
    """(training cases, validation cases, a note saying how they were chosen); module docstring."""
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise BadInputError(f"case names repeat ({', '.join(repeated)}); each case needs a unique name")
    if opts.val_cases:
        unknown = [n for n in opts.val_cases if n not in names]
        if unknown:
            raise BadInputError(f"--val-cases: no case named {', '.join(unknown)}; the cases are {', '.join(names)}")
        val = [c for c in cases if c.name in opts.val_cases]
        train = [c for c in cases if c.name not in opts.val_cases]
        if not train:
            raise BadInputError("--val-cases: names every case, which leaves none to train on")
        return train, val, "--val-cases"
    count = max(1, round(opts.val_fraction * len(cases))) if opts.val_fraction > 0 else 0
    if len(cases) < 2 or count == 0:
        note = "validated on the training case(s): the Dice says how well the model fits them, not how it generalises"
        log.warning("%s", note)
        return cases, cases, note
    count = min(count, len(cases) - 1)
    order = torch.randperm(len(cases), generator=torch.Generator().manual_seed(derive_seed(opts.seed, "split")))
    held_out = set(order[:count].tolist())
    return ([c for i, c in enumerate(cases) if i not in held_out], [c for i, c in enumerate(cases) if i in held_out],
            f"--val-fraction {opts.val_fraction:g}: {count} of {len(cases)} held out at random (seed "
            f"{opts.seed})")


def check_resume_matches(config: dict, data: FinetuneData, run_dir: Path) -> None:
    """A resumed run must see the cases, labels and split it started with, or it would not continue exactly."""
    saved, found = config["data"], data.to_config()
    for key, what in (("cases", "the cases"), ("labels", "the label table"), ("train", "the training split"),
                      ("val", "the validation split")):
        if saved.get(key) != found[key]:
            raise BadInputError(f"--resume {run_dir}: {what} changed since the run started; a resumed run needs the "
                                "same data. Start a new run instead")


def prepare(data: FinetuneData, cached, emitter: Emitter) -> None:
    """Pre-process every case once through the on-disk cache (`cached`: case -> cache entry), so that an unreadable
    or degenerate volume is reported before the run starts, and the first epoch starts at once.

    Raises:
        BadInputError: naming every case that could not be pre-processed and why.
    """
    problems = []
    for i, case in enumerate(data.cases):
        emitter.progress("prepare", i / len(data.cases), f"pre-processing case {case.name} ({i + 1}/{len(data.cases)})")
        try:
            cached(case)
        except (BadInputError, OSError) as e:
            problems.append(f"case {case.name} ({case.image_path}): {e}")
    if problems:
        raise BadInputError(f"{len(problems)} case(s) could not be pre-processed:\n" + "\n".join(problems))
    emitter.progress("prepare", 1.0, f"{len(data.cases)} cases ready")
