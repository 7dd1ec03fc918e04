"""A killed worker, FFN or attention, at 1A1F, 1A2F and 2A1F, Ray actors or local processes: the workers are
replaced and the requests that were running recompute their KV on the new ones, so every request finishes with the
local executor's tokens; no KV block leaks. A worker step that raises is reported as an internal error. Neither
message carries the backend's internals."""
import pytest

from conftest import make_tiny_model
from afdserve import LLM, SamplingParams
from afdserve.engine.executor import WorkerFailedError
from afdserve.engine.scheduler import ScheduledRequest, SchedulerOutput

PROMPTS = [[5, 17, 99, 3, 250, 41, 8], list(range(10, 50)), [7], list(range(60, 90))]
GREEDY = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(path, "llama")
    expected = [o.outputs[0].token_ids for o in
                LLM(str(path), dtype="float32").generate(PROMPTS, GREEDY, use_tqdm=False)]
    return path, expected


@pytest.mark.parametrize("afd, killed, backend", [("1A1F", "ffn 0", "ray"), ("1A1F", "attention 0", "ray"),
                                                  ("1A2F", "ffn 1", "ray"), ("2A1F", "attention 1", "ray"),
                                                  ("1A1F", "ffn 0", "mp"), ("2A1F", "attention 1", "mp")])
def test_killed_worker_loses_no_request(tiny_llama, afd, killed, backend):
    path, expected = tiny_llama
    # max_num_seqs=2 per attention rank: two run, two wait at 1A1F; at 2A1F each rank runs two.
    llm = LLM(str(path), dtype="float32", afd=afd, afd_transport="shm", max_num_seqs=2,
              distributed_executor_backend=backend)
    engine = llm.engine
    try:
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(str(i), prompt, GREEDY)
        finished = {}
        for _ in range(3):
            finished.update({o.request_id: o for o in engine.step() if o.finished})
        assert engine.core.scheduler.stats().num_running >= 2 and not finished
        role, rank = killed.split()
        executor = engine.core.executor
        executor.actors.kill(getattr(executor, role)[int(rank)])  # Ray's is asynchronous: a step or two may complete
        while engine.has_unfinished():
            finished.update({o.request_id: o for o in engine.step() if o.finished})
        assert engine.core.executor.num_restarts == 1
        assert all(o.error is None and o.outputs[0].finish_reason == "length" for o in finished.values())
        assert [finished[str(i)].outputs[0].token_ids for i in range(len(PROMPTS))] == expected
        assert all(kv.num_free_blocks == engine.num_kv_blocks for kv in engine.core.kv_managers)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("backend", ["ray", "mp"])
def test_a_worker_step_that_raises_is_an_internal_error(tiny_llama, backend):
    """A step that raises inside a worker (a request it was never sent: a bug's stand-in) restarts the workers too
    (the FFN side is left waiting mid-step) and is reported as an internal error naming the exception."""
    path, expected = tiny_llama
    llm = LLM(str(path), dtype="float32", afd="1A1F", afd_transport="shm", distributed_executor_backend=backend)
    engine = llm.engine
    try:
        bogus = SchedulerOutput([ScheduledRequest("never-sent", 0, 1, [5], [0], samples=True)])
        with pytest.raises(WorkerFailedError) as info:
            engine.core.executor.execute(bogus)
        assert "raised KeyError" in str(info.value) and "internal error" in str(info.value)
        assert_no_internals(str(info.value))
        assert engine.core.executor.num_restarts == 1
        assert engine.core.scheduler.recover_from_worker_failure() == []  # as EngineCore.step does: the cache is gone
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        assert got == expected
    finally:
        llm.shutdown()


def assert_no_internals(message: str) -> None:
    """What a client sees: no traceback, file paths, ANSI colours, pids, addresses or actor ids (issue 19, item 7)."""
    assert len(message) < 300, message
    for leak in ("Traceback", 'File "', "\x1b[", "pid=", "ip=", "actor_id", "/work/", "site-packages"):
        assert leak not in message, (leak, message)
