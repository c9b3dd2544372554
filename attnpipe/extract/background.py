"""One writer thread that owns every call on an HDF5 writer, fed by a queue bounded in bytes.

h5py must not be used from two threads at once; here only this thread touches the file while
the main thread runs the next batch. The chunk compression in the writer (ISA-L, libdeflate) releases the
GIL, so it overlaps with the forward pass; so do torch operations, which is why --metrics-only
computes its per-head metrics here too (a callable instead of a method name). The queue holds at most `max_bytes` of pending arrays
(one item larger than that is let in alone), so memory stays bounded however long the corpus.
"""

from __future__ import annotations

import threading
from collections import deque


class BackgroundWriter:
    """Call `target.<method>(*args)`, or `method(*args)` if it is callable, in one background thread,
    in submission order."""

    def __init__(self, target, max_bytes: int):
        self._target = target
        self._max_bytes = max_bytes
        self._items: deque = deque()
        self._pending_bytes = 0
        self._error: BaseException | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="attnpipe-writer", daemon=True)
        self._thread.start()

    @property
    def target(self):
        """The object the calls go to (read its interface only; its methods run in the thread)."""
        return self._target

    def submit(self, method, *args, nbytes: int = 0) -> None:
        """Queue a call; blocks while the queue is over its byte budget; raises a writer error."""
        with self._cond:
            while (self._pending_bytes and self._pending_bytes + nbytes > self._max_bytes
                   and self._error is None):
                self._cond.wait()
            if self._error is not None:
                raise self._error
            self._items.append((method, args, nbytes))
            self._pending_bytes += nbytes
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                method, args, nbytes = self._items.popleft()  # its bytes count until it is done
            try:
                (method if callable(method) else getattr(self._target, method))(*args)
            except BaseException as err:  # handed to the main thread, which re-raises it
                with self._cond:
                    self._error = err
                    self._items.clear()
                    self._cond.notify_all()
                return
            with self._cond:
                self._pending_bytes -= nbytes
                self._cond.notify_all()

    def close(self) -> None:
        """Wait until every queued call has run; re-raise the writer's error, if any."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Drop what is queued and stop the thread (after an error in the main thread)."""
        with self._cond:
            self._items.clear()
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
