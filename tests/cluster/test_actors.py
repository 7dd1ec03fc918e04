"""The local-process actors (--distributed-executor-backend mp) on their own, with standard-library classes as the
workers: calls run in order, a raising method and a failed constructor come back with their message, a killed
worker fails its pending and later calls, and none of it needs Ray."""
import collections

import pytest

from afdserve.cluster.actors import ProcessActors, WorkerLostError, WorkerRaisedError


def test_calls_run_in_order_and_return_their_results():
    actors = ProcessActors()
    counter = actors.start(collections.Counter, "abracadabra", role="afd_ffn")
    try:
        futures = [actors.call(counter, "update", "aaa"), actors.call(counter, "most_common", 2)]
        assert actors.get(futures, timeout=60) == [None, [("a", 8), ("b", 2)]]
        assert actors.ready([actors.call(counter, "total")], timeout=60)[0].result() == 14
    finally:
        actors.kill(counter)


def test_a_raising_method_and_a_failed_constructor_say_what_raised():
    actors = ProcessActors()
    counter, broken = actors.start(collections.Counter, role="afd_ffn"), actors.start(int, "x1", role="afd_ffn")
    try:
        with pytest.raises(WorkerRaisedError) as info:
            actors.get([actors.call(counter, "most_common", "two")], timeout=60)
        assert info.value.cause == "TypeError" and "Traceback" in info.value.detail
        assert actors.get([actors.call(counter, "total")], timeout=60) == [0]  # the worker lives on
        with pytest.raises(WorkerRaisedError, match=r"ValueError: invalid literal for int\(\) .* 'x1'"):
            actors.get([actors.call(broken, "bit_length")], timeout=60)
    finally:
        actors.kill(counter)
        actors.kill(broken)


def test_a_killed_worker_fails_its_calls_as_lost():
    actors = ProcessActors()
    counter = actors.start(collections.Counter, role="afd_attention")
    assert actors.get([actors.call(counter, "total")], timeout=60) == [0]
    actors.kill(counter)
    with pytest.raises(WorkerLostError, match="the worker process (has exited|exited with code -9)"):
        actors.get([actors.call(counter, "total")], timeout=60)


@pytest.mark.parametrize("child, words", [("import sys; sys.exit(3)", "exited with code 3 before it started"),
                                          ("import time; time.sleep(60)", "did not start within 1 s")])
def test_a_worker_that_never_starts_is_named(monkeypatch, child, words):
    from afdserve.cluster import actors as module
    monkeypatch.setattr(module, "_CHILD_MAIN", child)
    monkeypatch.setattr(module, "WORKER_START_TIMEOUT_S", 1)
    with pytest.raises(WorkerLostError, match=words):
        ProcessActors().start(collections.Counter, role="afd_ffn")
