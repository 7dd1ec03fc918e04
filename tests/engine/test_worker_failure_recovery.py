"""When the executor's workers fail mid-step (AFD: a dead worker, replaced), the running requests recompute their KV on
the new workers and finish with the tokens they would have had; a request in a second failed step ends with an
error, so one that keeps making workers fail cannot restart them forever. The executor is a fake whose next token
depends only on the request's history (tests/engine/test_scheduler.fake_token), so outputs can be compared with an
uninterrupted run."""
from __future__ import annotations

from afdserve.engine.config import EngineConfig, SchedulerConfig
from afdserve.engine.engine_core import EngineCore
from afdserve.engine.executor import WorkerFailedError
from afdserve.engine.model_runner import ModelRunnerOutput
from afdserve.engine.request import Request
from afdserve.engine.request_state import RequestStates
from afdserve.engine.sampling_params import SamplingParams
from test_scheduler import EOS, fake_token, prompt_of


class FailingExecutor:
    """Fails the steps numbered in `fail_at` (0-based), dropping what it held as replaced workers would."""

    def __init__(self, fail_at=()):
        self.fail_at = set(fail_at)
        self.states = RequestStates()
        self.num_steps = 0
        self.failed_step_requests: list[set[str]] = []

    def execute(self, out):
        step, self.num_steps = self.num_steps, self.num_steps + 1
        if step in self.fail_at:
            self.states = RequestStates()  # the new workers know nothing
            self.failed_step_requests.append({s.request_id for s in out.scheduled})
            raise WorkerFailedError("AFD worker failed: a worker died (test); the workers were restarted")
        self.states.update(out)
        sampled = []
        for s in out.scheduled:
            state = self.states[s.request_id]
            sampled.append(fake_token(state.token_ids(0, state.num_tokens)) if s.samples else None)
        return ModelRunnerOutput(sampled, [None] * len(sampled))

    def latest_stage_times(self):
        return None

    def expert_cache_totals(self):
        return None

    def shutdown(self):
        pass


def collect_tokens(fail_at=()):
    """request id -> (finish reason, error, every token streamed)."""
    core = EngineCore(EngineConfig(scheduler=SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=24)),
                      FailingExecutor(fail_at), num_kv_blocks=64, max_model_len=512)
    for i in range(6):
        core.add_request(Request(f"r{i}", prompt_of(i, 10 + 7 * i), SamplingParams(max_tokens=9), frozenset({EOS})))
    streamed: dict[str, list[int]] = {}
    ended = {}
    for _ in range(500):
        if not core.has_unfinished():
            break
        for out in core.step():
            streamed.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                ended[out.request_id] = (out.finish_reason, out.error)
    assert core.num_free_blocks == 64 and not core.scheduler.requests  # nothing leaked, nothing left behind
    return core.executor, {rid: (*ended[rid], streamed.get(rid, [])) for rid in ended}


def test_one_failed_step_loses_no_request_and_no_token():
    _, clean = collect_tokens()
    executor, recovered = collect_tokens(fail_at=[4])
    assert executor.failed_step_requests and executor.failed_step_requests[0]  # the failure hit running requests
    assert recovered == clean
    assert all(reason == "length" and error is None and len(tokens) == 9 for reason, error, tokens in clean.values())


def test_a_request_in_two_failed_steps_ends_with_the_error():
    _, clean = collect_tokens()
    executor, outcome = collect_tokens(fail_at=[4, 5])
    twice = executor.failed_step_requests[0] & executor.failed_step_requests[1]
    assert twice  # the requeued requests were scheduled again in the next step
    for rid, (reason, error, tokens) in outcome.items():
        if rid in twice:
            assert reason == "error" and "AFD worker failed" in error
            assert tokens == clean[rid][2][:len(tokens)]  # what it streamed before was right
        else:
            assert outcome[rid] == clean[rid]
