"""Typed errors for things a user can fix.

Every error raised because of user input (a config key, a component name, a data file) is a
:class:`FusionkitError`. The CLI prints its message on one line and exits with code 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FusionkitError(Exception):
    """Base class of errors caused by user input; the message says how to fix it."""

    def __init__(self, *args):
        text = args[0] if len(args) == 1 and isinstance(args[0], str) else ""
        if text.startswith("Caught ") and "\nOriginal Traceback" in text:
            # raised again in the main process from a DataLoader worker's traceback text
            # ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...\nDataError: why"):
            # the message stays the worker's one line
            last = text.rstrip().splitlines()[-1]
            args = (last.split(": ", 1)[1] if ": " in last else last,)
        super().__init__(*args)


class ConfigError(FusionkitError):
    """A config value, key or override is invalid."""


class RegistryError(FusionkitError):
    """A component name is unknown, or a registration clashes with an existing one."""


class DataError(FusionkitError):
    """A data file is missing, unreadable or malformed, or a batch is unusable."""


class RunDirError(FusionkitError):
    """A run folder is missing, incomplete, or would be overwritten."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def unknown_choice(what: str, name: str, choices: Iterable[str]) -> str:
    """Format ``'atention' is not a fusion; did you mean 'attention'? (choices: ...)``."""
    choices = sorted(choices)
    return f"'{name}' is not {what}{did_you_mean(name, choices)} (choices: {', '.join(choices)})"
