"""The `mim3d` command line (also the Slicer worker: `PythonSlicer -m mim3d COMMAND ...`).

Each command lives in its own module with `add_arguments(parser)` and `run(args, emitter)`; only the chosen one is
imported. Errors become protocol events and exit codes (mim3d.protocol): bad input 2, cancelled 130, internal 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from .errors import BadInputError, Cancelled
from .protocol import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_INTERNAL, EXIT_OK, Emitter

COMMANDS = {
    "pretrain": ("mim3d.training.pretrain", "self-supervised pre-training (MiM, MAE, SimMIM) on folders of scans"),
    "finetune": ("mim3d.training.finetune", "fine-tune a segmenter on labelled cases; ends with a model package"),
    "segment": ("mim3d.inference.segment", "segment CT volumes with a model package (labels on the input grid)"),
    "models": ("mim3d.registry_cli", "list, show, import, download, verify and delete model packages"),
    "devices": ("mim3d.devices", "the torch version, CUDA GPUs with their free memory, and the recommended device"),
    "demo": ("mim3d.demo", "the whole loop on the example CT: pre-train, fine-tune, segment an unseen scan, report"),
    "clean": ("mim3d.clean", "list or remove downloaded models, the example data and the data cache"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        listing = "\n".join(f"  {name:10s} {about}" for name, (_, about) in COMMANDS.items())
        print(f"usage: mim3d COMMAND [options]\n\ncommands:\n{listing}\n\n'mim3d COMMAND --help' for the options.",
              file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        return EXIT_OK if argv and argv[0] in ("-h", "--help") else EXIT_BAD_INPUT
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    module = importlib.import_module(COMMANDS[argv[0]][0])
    parser = argparse.ArgumentParser(prog=f"mim3d {argv[0]}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    emitter = Emitter()
    try:
        module.run(args, emitter)
    except BadInputError as e:
        logging.error("%s", e)
        emitter.error("bad_input", str(e))
        return EXIT_BAD_INPUT
    except Cancelled as e:
        emitter.error("cancelled", str(e) or "cancelled")
        return EXIT_CANCELLED
    except Exception as e:  # noqa: BLE001 - the worker must always answer with a protocol event
        traceback.print_exc()
        emitter.error("internal", f"{type(e).__name__}: {e}")
        return EXIT_INTERNAL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
