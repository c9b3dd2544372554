"""The one exception type for expected mistakes, and how a CLI reports it."""

from __future__ import annotations

import sys
from collections.abc import Callable


class AttnpipeError(Exception):
    """A mistake in the user's input or environment: reported as one line, never a traceback."""


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a script's `main`, turning expected errors into one line on stderr and exit status 2."""
    try:
        return main(argv)
    except AttnpipeError as err:
        print("error: " + " ".join(str(err).splitlines()), file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
