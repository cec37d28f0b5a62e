"""Pools of worker processes (encoding a corpus, a tokenizer's batches) that end with lmforge.

A worker forked from lmforge inherits its SIGTERM handler (``cli`` turns SIGTERM into
``config.Terminated`` so that a kill cleans up): in a worker, which has nothing to clean up, that
handler only keeps ``kill`` from ending it. And a worker whose parent is killed with SIGKILL is
never told: it would go on encoding, holding its memory, for ever. So each worker takes SIGTERM's
default action back and, on Linux, asks the kernel to send it SIGTERM when its parent ends.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def pool(workers: int, initializer: Callable[..., None], initargs: tuple = ()) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of ``workers`` processes, each set up by ``initializer(*initargs)``,
    that end when lmforge does, by SIGTERM or by SIGKILL."""
    return ProcessPoolExecutor(workers, initializer=_start, initargs=(initializer, initargs))


def _start(initializer: Callable[..., None], initargs: tuple) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _end_with_parent()
    initializer(*initargs)


def _end_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return  # (elsewhere the pool's own check, when its parent's pipe closes, is all there is)
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before the call: no signal will come
        os._exit(1)


__all__ = ["pool"]
