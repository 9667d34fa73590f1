"""perprocess: one value per process, made anew after a fork, never pickled."""

from __future__ import annotations

import multiprocessing
import pickle

from xr_datamodule.perprocess import PerProcess, thread_pool


def _pid_in_child(holder, queue):
    import os

    queue.put((holder.get(), os.getpid()))


def test_a_forked_child_makes_its_own_value():
    import os

    holder = PerProcess(os.getpid)
    assert holder.get() == os.getpid()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_pid_in_child, args=(holder, queue))
    child.start()
    made, pid = queue.get(timeout=30)
    child.join(timeout=30)
    assert made == pid != os.getpid()


def test_pickles_without_its_value_and_closes_what_it_made():
    pool = thread_pool(2)
    first = pool.get()
    assert pool.get() is first
    copy = pickle.loads(pickle.dumps(pool))
    assert copy.held() is None and copy.get() is not first
    copy.close()
    pool.close()
    assert pool.held() is None and first._shutdown
