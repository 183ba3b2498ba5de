"""mhattn.threads: a thread count for the kernels one Python thread starts."""

from __future__ import annotations

import contextlib

from . import _core


@contextlib.contextmanager
def threads(n):
    """with mhattn.threads(n): the kernels this (Python) thread starts use n threads, whatever
    set_num_threads says, and the setting before comes back at the end. Other threads keep
    their own: a server or a Dask worker whose threads each run calls can give each its count.
    n = None changes nothing."""
    if n is None:
        yield
        return
    from ._checks import as_int

    before = _core._set_threads_here(as_int(n, "n", 1))
    try:
        yield
    finally:
        _core._set_threads_here(before)
