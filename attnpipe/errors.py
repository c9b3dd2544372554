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


# How an allocation that the memory limit (ulimit -v, a cgroup, the machine) refuses is reported
# besides MemoryError (numpy's _ArrayMemoryError is one): torch's CPU allocator, a CUDA
# OutOfMemoryError, a shared library that cannot be mapped while importing, an OS call (ENOMEM).
OUT_OF_MEMORY_TEXTS = ("can't allocate memory", "not enough memory", "out of memory", "failed to map segment",
                       "Cannot allocate memory")
OUT_OF_MEMORY_HINT = ("the run needs more memory than the limit allows (ulimit -v, a SLURM --mem, the machine's RAM): "
                      "use a smaller --batch-size or --max-length, fewer texts per file, or raise the limit")


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocation refused for lack of memory (not a bug to show as a traceback)."""
    if isinstance(err, MemoryError):
        return True
    text = str(err)
    return isinstance(err, (RuntimeError, ImportError, OSError)) and any(t in text for t in OUT_OF_MEMORY_TEXTS)


def _terminate(signum, frame) -> None:
    raise Terminated()


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a script's `main`, turning expected errors into one line on stderr and exit status 2.

    Ctrl-C: "error: interrupted", exit 130; SIGTERM: "error: terminated", exit 143 (128 + 15,
    what a shell reports for a process the signal ended), after the same clean-up. An allocation
    refused for lack of memory (ulimit -v, MemoryError, torch's allocator): "error: out of memory
    (...)" with a hint, exit 2; outputs are discarded by the same clean-up as any other error.
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return main(argv)
    except AttnpipeError as err:
        print("error: " + " ".join(str(err).splitlines()), file=sys.stderr)  # always one line
        return 2
    except (MemoryError, RuntimeError, ImportError, OSError) as err:
        if not out_of_memory(err):
            raise
        what = " ".join(str(err).split())[:120] or type(err).__name__
        print(f"error: out of memory ({what}): {OUT_OF_MEMORY_HINT}", file=sys.stderr)
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
