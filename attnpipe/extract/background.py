"""One writer thread that owns every call on an HDF5 writer, fed by a queue bounded in bytes.

h5py must not be used from two threads at once; here only this thread touches the file. The
chunk compression in the writer (ISA-L, libdeflate) releases the GIL, and so do torch operations,
which is why --metrics-only computes its per-head metrics here too (a callable instead of a
method name). The queue holds at most `max_bytes` of pending arrays (one item larger than that is
let in alone), so memory stays bounded however long the corpus.

Two ways to share the machine with the forward pass (the runner picks one: writer_plan):
- overlapped: calls run as they come, while the next layers and batches are computed. Right
  when the forward leaves cores free (a GPU, or fewer torch threads than cores).
- deferred: calls wait in the queue until the main thread asks for them (`run_queued`, after each
  batch) and then run with every core to themselves. Right when torch's threads fill every core:
  a writer thread beside them takes a core from one of torch's threads, and torch's evenly split
  matrix products then wait for that thread, so an overlapped writer cost the forward more than
  its own CPU time (MiniLM, 2 cores: bench/bench_extract.py). A deferred writer still runs calls
  when a submit waits for room in the queue, so a batch larger than the budget cannot stall.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class WriterPlan:
    deferred: bool  # calls wait for the end of each batch (see the module docstring)
    encode_threads: int  # threads compressing attention chunks side by side (store.packed)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a SLURM job's cores, not the node's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# The matrix-product work per token and layer (values) from which torch's threads, not Python, set
# the pace of the forward pass: MiniLM has 1.77 M weight-matrix values a layer; the bench's small
# BERT of 2 layers and 64 wide 49 k (bench/bench_extract.py, 2 cores, default threads). Deferring
# the writer made MiniLM (512 demo texts, in process) 3 % faster and the small BERT (20,000 short
# texts, whole process) 15 % slower, its Python then no longer beside the writer's work; and the
# small BERT's forward alone takes 1.10 s on one torch thread against 1.25 s on two.
HEAVY_LAYER_VALUES = 1 << 18


def is_heavy(layer_values: int, max_length: int) -> bool:
    """Whether a token costs a layer at least HEAVY_LAYER_VALUES multiply-adds: its weight matrices
    (`layer_values`, models.parts.layer_matrix_values) and, at `max_length` tokens, its attention
    (q·kᵀ and probs·v: 2 x length x width, the width taken as a standard layer's, 12 width² values)."""
    width = math.sqrt(layer_values / 12)
    return layer_values + 2 * max_length * width >= HEAVY_LAYER_VALUES


def writer_plan(on_cpu: bool, torch_threads: int, cpus: int, heavy: bool) -> WriterPlan:
    """Deferred, with every core compressing, when torch's threads fill the cores with a heavy
    model (is_heavy); otherwise overlapped, compressing on the cores the forward leaves free (a
    GPU run keeps one for the thread that drives it)."""
    if on_cpu and torch_threads >= cpus and heavy:
        return WriterPlan(deferred=True, encode_threads=cpus)
    return WriterPlan(deferred=False, encode_threads=max(1, cpus - (torch_threads if on_cpu else 1)))


class BackgroundWriter:
    """Call `target.<method>(*args)`, or `method(*args)` if it is callable, in one background thread,
    in submission order."""

    def __init__(self, target, max_bytes: int, *, deferred: bool = False):
        self._target = target
        self._max_bytes = max_bytes
        self._items: deque = deque()
        self._pending_bytes = 0
        self._error: BaseException | None = None
        self._closed = False
        self._deferred = deferred
        self._held = deferred  # queued calls wait (for run_queued, close or a full queue)
        self._waiting = 0  # submits waiting for room: a held queue runs calls for them
        self._running = False  # a call is in progress
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="attnpipe-writer", daemon=True)
        self._thread.start()

    @property
    def target(self):
        """The object the calls go to (read its interface only; its methods run in the thread)."""
        return self._target

    @property
    def deferred(self) -> bool:
        return self._deferred

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    def submit(self, method, *args, nbytes: int = 0) -> None:
        """Queue a call; blocks while the queue is over its byte budget; raises a writer error."""
        with self._cond:
            while (self._pending_bytes and self._pending_bytes + nbytes > self._max_bytes
                   and self._error is None):
                self._waiting += 1
                self._cond.notify_all()
                try:
                    self._cond.wait()
                finally:
                    self._waiting -= 1
            if self._error is not None:
                raise self._error
            self._items.append((method, args, nbytes))
            self._pending_bytes += nbytes
            self._cond.notify_all()

    def run_queued(self) -> None:
        """Run every queued call now and wait until they are done; re-raise the writer's error.
        A deferred writer then holds new calls again."""
        with self._cond:
            self._held = False
            self._cond.notify_all()
            while (self._items or self._running) and self._error is None:
                self._cond.wait()
            self._held = self._deferred and not self._closed
            if self._error is not None:
                raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._items and (not self._held or self._waiting)) and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                method, args, nbytes = self._items.popleft()  # its bytes count until it is done
                self._running = True
            try:
                (method if callable(method) else getattr(self._target, method))(*args)
            except BaseException as err:  # handed to the main thread, which re-raises it
                with self._cond:
                    self._error = err
                    self._items.clear()
                    self._running = False
                    self._cond.notify_all()
                return
            with self._cond:
                self._pending_bytes -= nbytes
                self._running = False
                self._cond.notify_all()

    def close(self) -> None:
        """Wait until every queued call has run; re-raise the writer's error, if any."""
        with self._cond:
            self._closed = True
            self._held = False
            self._cond.notify_all()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Drop what is queued and stop the thread (after an error in the main thread)."""
        with self._cond:
            self._items.clear()
            self._closed = True
            self._held = False
            self._cond.notify_all()
        self._thread.join()
