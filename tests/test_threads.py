"""one_thread / full_pool restore each thread's own torch thread count, nested and from several threads."""

from __future__ import annotations

import threading

import torch

from xaicomp_core.threads import full_pool, one_thread


def test_nested_blocks_restore_the_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
            with one_thread():
                assert torch.get_num_threads() == 1
                with full_pool():
                    assert torch.get_num_threads() == 2
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_threads_do_not_leave_each_other_on_one_thread():
    seen: dict[str, int] = {}
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a() -> None:  # enters first, leaves first, while b is still inside its block
        torch.set_num_threads(2)
        with one_thread():
            a_in.set()
            b_in.wait(30)
        seen["a"] = torch.get_num_threads()
        a_out.set()

    def b() -> None:
        torch.set_num_threads(2)
        a_in.wait(30)
        with one_thread():
            b_in.set()
            a_out.wait(30)
        seen["b"] = torch.get_num_threads()

    ts = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert seen == {"a": 2, "b": 2}
