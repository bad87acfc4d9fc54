"""Thread-pool discipline: small-tensor bookkeeping runs on the calling thread alone.

On a busy 2-core machine a 2-thread OpenMP region stalls whenever one of its threads is preempted, so work on small
tensors (compressing a plan, counting sizes, assembling a result) costs several times more on the pool than on one
thread. :func:`one_thread` runs a block with one intra-op thread and restores the calling thread's previous count
afterwards (``torch.set_num_threads`` acts on the calling thread, so each thread saves and restores its own);
:func:`full_pool` gives a big kernel inside such a block the saved count back.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_local = threading.local()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one intra-op thread on the calling thread (nested blocks are free)."""
    saved = torch.get_num_threads()
    stack = getattr(_local, "saved", None)
    if stack is None:
        stack = _local.saved = []
    stack.append(saved)
    if saved != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        stack.pop()
        if saved != 1:
            torch.set_num_threads(saved)


@contextlib.contextmanager
def full_pool() -> Iterator[None]:
    """Inside a :func:`one_thread` block, run a big kernel (a relevance pass) with the thread count from before
    the outermost block."""
    stack = getattr(_local, "saved", None) or []
    n = stack[0] if stack else torch.get_num_threads()
    cur = torch.get_num_threads()
    if n == cur:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(cur)
