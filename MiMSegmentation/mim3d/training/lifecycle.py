"""The life of a run folder, the same for `mim3d pretrain` and `mim3d finetune`.

    check_new_run_folder(out)                            # before anything is written: --out is new or empty
    with run_lifecycle(writer, config) as stop:          # creates the folder and config.json (a new run)
        ... train, asking stop.requested() ...           # bad input: a half-made new run is removed; other errors:
    finish(writer, trainer, state, plan, emitter)        #   the run is marked failed; then the final state and result

Only rank 0 writes (`writer.active`). An empty --out folder that the user made is kept when bad input removes the run.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import BadInputError
from ..protocol import Emitter
from ..runs import RunDir, read_status, write_json_atomic
from .run_writer import RunWriter, StopController


def check_new_run_folder(out: Path) -> None:
    """--out must be new or an empty folder, so that a run never mixes with another one's files."""
    run = RunDir(out)
    if run.holds_run():
        state = read_status(out)["state"]
        raise BadInputError(f"--out {out}: already holds a run (state {state}); continue it with --resume {out}, or "
                            "choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"--out {out}: exists and is not an empty folder; choose a new folder for the run")


@contextmanager
def run_lifecycle(writer: RunWriter, config: dict | None) -> Iterator[StopController]:
    """Write a new run's folder and config.json (`config`; None when resuming), and listen for stop requests.

    An exception inside ends the run: bad input (BadInputError) removes what a new run wrote, unless it has saved a
    checkpoint, so that fixing the input and starting again just works; anything else marks the run "failed" with
    "<ExceptionType>: <message>" in status.json. Either way the writer is closed and the exception re-raised.
    """
    run, created = writer.run, config is not None
    existed = run.path.exists()
    if created and writer.active:
        run.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run.config, config)
    stop = StopController(run.stop_file if writer.active else None)
    try:
        yield stop
    except BadInputError:
        writer.close()
        if created and writer.active and not run.checkpoint("last").exists():
            _remove_run(run.path, keep_folder=existed)
        raise
    except BaseException as e:
        writer.set_state("failed", f"{type(e).__name__}: {e}".rstrip(": "))
        writer.close()
        raise
    finally:
        stop.close()


def _remove_run(path: Path, keep_folder: bool) -> None:
    """Delete what this process wrote; an empty --out folder the user made stays."""
    for child in path.iterdir() if keep_folder else [path]:
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def finish(writer: RunWriter, trainer, state: str, plan: dict, emitter: Emitter, **fields) -> None:
    """Record the final state ("finished" or "stopped") and emit the result event, with the command's own `fields`."""
    message = writer.end(state, trainer.step, trainer.stop.reason, plan)
    emitter.result(state=state, run_dir=str(writer.run.path), step=trainer.step, total_steps=plan["total_steps"],
                   epoch=writer.status["epoch"], loss=writer.status["loss"],
                   last_checkpoint=writer.status["last_checkpoint"], **fields, message=message)
