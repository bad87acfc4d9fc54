"""Thread-pool discipline: small-tensor bookkeeping runs on the calling thread alone.

On a busy 2-core machine a 2-thread OpenMP region stalls whenever one of its threads is preempted, so work on small
tensors (compressing a plan, counting sizes, assembling a result) costs several times more on the pool than on one
thread. :func:`one_thread` runs a block with one intra-op thread and restores the previous count afterwards; nested
and concurrent blocks share one reference count, so the count is restored only when the last block ends.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_lock = threading.Lock()
_depth = 0
_saved = 0


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with ``torch.get_num_threads() == 1`` (the previous count is restored when the last block
    ends). The big kernels (the forward, relevance) run outside such blocks with the full pool."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = torch.get_num_threads()
            if _saved != 1:
                torch.set_num_threads(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved != 1:
                torch.set_num_threads(_saved)


@contextlib.contextmanager
def full_pool() -> Iterator[None]:
    """Inside a :func:`one_thread` block, run a big kernel (a relevance pass) with the previous thread count again."""
    with _lock:
        inside, n = _depth > 0, _saved
    if not inside or n == 1:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(1)
