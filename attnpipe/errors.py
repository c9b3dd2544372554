"""The one exception type for expected mistakes, and how a CLI reports it."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable


class AttnpipeError(Exception):
    """A mistake in the user's input or environment: reported as one line, never a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, Snakemake and `kill` send), raised like Ctrl-C's KeyboardInterrupt so
    that the same clean-up runs: temporary files removed, nothing half-written left behind."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a script's `main`, turning expected errors into one line on stderr and exit status 2.

    Ctrl-C: "error: interrupted", exit 130; SIGTERM: "error: terminated", exit 143 (128 + 15,
    what a shell reports for a process the signal ended), after the same clean-up.
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return main(argv)
    except AttnpipeError as err:
        print("error: " + " ".join(str(err).splitlines()), file=sys.stderr)  # always one line
        return 2
    except Terminated:
        print("error: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
