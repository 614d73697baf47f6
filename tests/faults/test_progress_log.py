"""The crash marks and attempt counts live in the store, so they survive the process."""

from __future__ import annotations

import pytest

from oclust.training_worker.lease import make_progress_log
from oclust.training_worker.store import open_store


@pytest.mark.parametrize("kind", ["redis", "file"])
def test_marks_and_counts_survive_a_new_handle(kind, redis_url, tmp_path):
    url = redis_url if kind == "redis" else f"file://{tmp_path}"
    log = make_progress_log(open_store(url, "ns"))
    assert log.read() == {}
    log.mark({"t:0": (5, 9), "t:1": (0, 3)})
    assert log.bump("range:t:0:5") == 1
    assert log.bump("msg:t:0:7") == 1

    again = make_progress_log(open_store(url, "ns"))  # what the next process sees
    assert again.read() == {"t:0": (5, 9), "t:1": (0, 3)}
    assert again.bump("msg:t:0:7") == 2
    again.forget_below("t:0", 6)  # a snapshot now covers offset 5
    assert again.bump("range:t:0:5") == 1  # forgotten
    assert again.bump("msg:t:0:7") == 3  # kept: not covered yet
    again.forget_below("t:1", 100)  # another partition: nothing of t:0 goes
    assert again.bump("msg:t:0:7") == 4
    again.clear()
    assert make_progress_log(open_store(url, "ns")).read() == {}
    # another namespace shares nothing
    assert make_progress_log(open_store(url, "other")).bump("msg:t:0:7") == 1


def test_a_garbled_mark_is_no_evidence(redis_url):
    store = open_store(redis_url, "ns")
    log = make_progress_log(store)
    for garbage in (b"{not json", b'{"t:0": "x"}', b"[1, 2]", b"abc"):
        store.client.set(store.key("inflight"), garbage)
        assert log.read() == {}
    store.client.hset(store.key("attempts"), "msg:t:0:1", "many")
    assert log.bump("msg:t:0:2") == 1
    log.forget_below("t:0", 10)  # garbage counts neither crash nor block the pruning
