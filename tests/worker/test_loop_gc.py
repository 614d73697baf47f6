"""While a training loop runs, the heap it started with is out of the cyclic GC's full passes."""

from __future__ import annotations

import gc
import sys

from oclust.training_worker import loop


def _tracked(obj: object) -> bool:
    """Whether a pass of the cyclic GC walks ``obj`` (frozen objects are left out)."""
    return any(o is obj for o in gc.get_objects())


def test_the_heap_is_frozen_while_loops_run_and_released_after() -> None:
    before = sys.getswitchinterval()
    old = [object()]  # a container alive when the loop starts, as the model and torch are
    assert gc.get_freeze_count() == 0 and _tracked(old)
    with loop._steady_process():
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # torch, the model library, the clients
        assert not _tracked(old)
        young = [object()]
        assert _tracked(young)  # what the loop allocates is collected as usual
        assert sys.getswitchinterval() <= loop.SWITCH_INTERVAL_S
        # a second loop in the process changes nothing: it freezes nothing more (the count
        # can only fall, when another thread of the test process frees a frozen object) and
        # its end thaws nothing
        with loop._steady_process():
            assert gc.get_freeze_count() <= frozen and _tracked(young)
        assert not _tracked(old) and _tracked(young)  # the first loop still runs
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0 and _tracked(old)
    assert sys.getswitchinterval() == before
