"""A killed FFN worker: the requests holding KV end with finish_reason "error" and a message, the workers are
replaced, no KV block leaks, waiting requests survive, and later requests produce the local executor's tokens."""
import ray

from conftest import make_tiny_model
from afdserve import LLM, SamplingParams

PROMPTS = [[5, 17, 99, 3, 250, 41, 8], list(range(10, 50)), [7], list(range(60, 90))]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_killed_ffn_worker_fails_running_requests_then_recovers(tmp_path):
    make_tiny_model(tmp_path, "llama")
    expected = [o.outputs[0].token_ids for o in
                LLM(str(tmp_path), dtype="float32").generate(PROMPTS, GREEDY, use_tqdm=False)]
    llm = LLM(str(tmp_path), dtype="float32", afd="1A1F", afd_transport="shm", max_num_seqs=2)
    engine = llm.engine
    try:
        for i, prompt in enumerate(PROMPTS):  # max_num_seqs=2: two run, two wait
            engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        for _ in range(3):
            engine.step()
        assert engine.core.scheduler.stats().num_running == 2
        ray.kill(engine.core.executor.ffn[0])  # asynchronous: a step or two may still complete
        for _ in range(50):
            failed = {o.request_id: o for o in engine.step() if o.error is not None}
            if failed:
                break
        assert set(failed) == {"0", "1"}
        for out in failed.values():
            assert out.finished and out.outputs[0].finish_reason == "error"
            assert "AFD worker failed" in out.error and "restarted" in out.error
        assert engine.core.executor.num_restarts == 1
        assert engine.core.kv.pool.num_cached_blocks == 0  # no prefix hit may read the lost KV
        # The waiting requests were never scheduled: they run on the new workers and finish normally.
        rest = {}
        while engine.has_unfinished():
            rest.update({o.request_id: o for o in engine.step() if o.finished})
        assert set(rest) == {"2", "3"} and all(o.outputs[0].finish_reason == "length" for o in rest.values())
        assert engine.core.kv.num_free_blocks == engine.num_kv_blocks
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        assert got == expected
    finally:
        llm.shutdown()
