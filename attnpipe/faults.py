"""A test-only hook that kills this process at a named point, to prove a killed run loses nothing.

Set `ATTNPIPE_FAULT_AT=<point>:<n>` and the n-th time (1-based) the run reaches `<point>` the
process sends itself SIGKILL: no cleanup, no `finally`, exactly like `kill -9` or the OOM killer.
Unset (always, outside tests/test_faults.py) it costs one environment lookup per call.

Points:
    load     start of loading the model (attnpipe.extract.loading.load_model)
    loaded   model and tokenizer loaded, nothing computed yet
    batch    a batch's forward pass done, before it is checked and written (attnpipe.extract.guards)
    write    a text's attention dataset written to the temporary HDF5 file, its tokens not yet
    finish   every text written and the `ids` dataset made, provenance attributes not yet
    close    the temporary HDF5 file closed and checked, not yet renamed over the output
    json     the JSON document written to its temporary file, not yet flushed or renamed
"""

from __future__ import annotations

import os
import signal

ENV = "ATTNPIPE_FAULT_AT"
POINTS = ("load", "loaded", "batch", "write", "finish", "close", "json")
_arrivals: dict[str, int] = {}


def point(name: str, times: int = 1) -> None:
    """Mark that the run reached `name` (`times` times in a row: a batch of texts at once); SIGKILL
    this process if ATTNPIPE_FAULT_AT says so."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    before = _arrivals.get(name, 0)
    _arrivals[name] = before + times
    if before < int(nth or 1) <= before + times:
        os.kill(os.getpid(), signal.SIGKILL)
