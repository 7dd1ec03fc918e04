"""Read-ME's expert-aware batching (engine/expert_batching.py, --expert-batch-size): which ready decodes a step takes,
the aging bound, and an engine whose steps hold decodes back giving the same greedy tokens. The experts of a token
are checked against the saved router run in plain torch."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from afdserve.engine.expert_batching import ExpertBatching

TABLE = [(0,), (1,), (2,), (0,), (1,), (1,)]  # token id -> its expert


def _decode(name: str, token: int, held: int = 0):
    return SimpleNamespace(request_id=name, all_token_ids=[9, token], decode_steps_held=held)


def test_all_ready_decodes_run_while_they_fit():
    batching = ExpertBatching(TABLE, max_decodes=3, max_wait_steps=4)
    assert batching.held([_decode("a", 0), _decode("b", 1), _decode("c", 2)]) == set()


def test_the_largest_bucket_goes_first_then_the_next():
    batching = ExpertBatching(TABLE, max_decodes=3, max_wait_steps=4)
    decodes = [_decode("a", 0), _decode("b", 3), _decode("c", 1), _decode("d", 4), _decode("e", 5), _decode("f", 2)]
    assert batching.held(decodes) == {"a", "b", "f"}  # expert 1 has three tokens: c, d, e
    four = ExpertBatching(TABLE, max_decodes=4, max_wait_steps=4)
    assert four.held(decodes) == {"b", "f"}  # then expert 0's bucket, its first decode in queue order


def test_ties_go_to_the_bucket_holding_the_longest_held_decode():
    batching = ExpertBatching(TABLE, max_decodes=2, max_wait_steps=4)
    decodes = [_decode("a", 0), _decode("b", 3), _decode("c", 1, held=2), _decode("d", 4, held=1)]
    assert batching.held(decodes) == {"a", "b"}


def test_a_decode_held_max_wait_steps_goes_first():
    batching = ExpertBatching(TABLE, max_decodes=3, max_wait_steps=2)
    decodes = [_decode("c", 1), _decode("d", 4), _decode("e", 5), _decode("f", 2, held=2)]
    assert batching.held(decodes) == {"e"}  # f is overdue; then two of expert 1's bucket


@pytest.fixture(scope="module")
def readme_model(tmp_path_factory):
    from conftest import make_tiny_readme
    return make_tiny_readme(tmp_path_factory.mktemp("readme"), top_k=1)[1]


def test_the_router_table_is_the_saved_routers_choice(readme_model):
    from afdserve.models.readme import token_expert_table
    from safetensors.torch import load_file
    table = token_expert_table(readme_model)
    weights = {k.removeprefix("model.pre_gating_router."): v.float() for k, v in
               load_file(readme_model / "model.safetensors").items() if k.startswith("model.pre_gating_router.")}

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    ids = torch.arange(len(table))
    x = weights["embed.weight"][ids]
    x = x + torch.nn.functional.silu(rms(x, weights["mlp_norm.weight"]) @ weights["up.weight"].T) @ weights[
        "down.weight"].T
    logits = rms(x, weights["norm.weight"]) @ weights["head.weight"].T
    top1 = logits.argmax(-1).tolist()
    agree = sum(t == (e,) for t, e in zip(table, top1))
    assert agree >= len(table) - 2  # a near-tie may fall either way in another summation order


def test_an_engine_holding_decodes_back_gives_the_same_tokens(readme_model):
    """Five requests, at most two decodes per step: every request ends with the tokens it gets unbatched, no step
    runs more than two decodes, and none waits more than max_wait steps in a row."""
    from afdserve import LLM, SamplingParams
    prompts = [list(range(3, 20)), [9, 4, 200, 31], list(range(50, 70)), [7, 7, 7], list(range(100, 140))]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with LLM(str(readme_model), dtype="float32", block_size=8) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with LLM(str(readme_model), dtype="float32", block_size=8, expert_batch_size=2, expert_batch_max_wait=3) as llm:
        scheduler = llm.engine.core.scheduler
        schedule, decodes_per_step, longest_hold = scheduler.schedule, [], [0]

        def recording_schedule():
            out = schedule()
            decodes_per_step.append(sum(1 for item in out.scheduled if item.num_tokens == 1))
            longest_hold[0] = max([longest_hold[0], *(r.decode_steps_held for r in scheduler.running)])
            return out
        scheduler.schedule = recording_schedule
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    assert max(decodes_per_step) == 2 and longest_hold[0] == 3


def test_expert_batching_is_refused_without_a_pre_gating_router(tmp_path):
    from afdserve import LLM
    from afdserve.engine.config import SchedulerConfig, engine_config
    from conftest import make_tiny_model
    make_tiny_model(tmp_path, "llama")
    with pytest.raises(ValueError, match="expert_batch_size: set, but LlamaForCausalLM has no pre-gating router"):
        LLM(str(tmp_path), dtype="float32", expert_batch_size=2)
    with pytest.raises(ValueError, match="expert_batch_size must be >= 1"):
        SchedulerConfig(expert_batch_size=0)
    with pytest.raises(ValueError, match="picks one scheduler's decodes"):
        engine_config(device="cpu", expert_batch_size=2, afd="2A1F")
