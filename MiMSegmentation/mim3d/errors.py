"""The one error type for bad user input (files, options, checkpoints). Standard library only.

The worker turns it into ``{"type": "error", "kind": "bad_input"}`` and exit code 2; every message names the file or
field, what was found, and what was expected.
"""


class BadInputError(ValueError):
    """User input that cannot be used as given; the message says which input and why."""


class Cancelled(Exception):
    """The user asked the worker to stop (SIGTERM, SIGINT or a STOP file) and it stopped cleanly."""
