"""AFD on Ray against the local executor (the oracle): greedy fp32 tokens identical for 1A1F with 1, 2 and 3
micro-batches over both transports, with requests of mixed lengths so steps mix prefill chunks and decodes."""
import pytest

from conftest import make_tiny_model
from engine import LLM, SamplingParams
from cluster.micro_batch import split_micro_batches

PROMPTS = [[5, 17, 99, 3, 250, 41, 8], list(range(10, 50)), [7], list(range(60, 90)), list(range(100, 117))]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(path, "llama")
    local = LLM(str(path), dtype="float32", max_num_batched_tokens=48)
    expected = [o.outputs[0].token_ids for o in local.generate(PROMPTS, GREEDY, use_tqdm=False)]
    return path, expected


@pytest.mark.parametrize("transport", ["gloo", "shm"])
@pytest.mark.parametrize("micro_batches", [1, 2, 3])
def test_afd_1a1f_equals_local(tiny_llama, transport, micro_batches):
    path, expected = tiny_llama
    # A small token budget makes steps that mix decodes with chunked prefills.
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=48, afd="1A1F", micro_batches=micro_batches,
              afd_transport=transport)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        assert got == expected
        assert llm.engine.core.kv.num_free_blocks == llm.engine.num_kv_blocks
        times = llm.engine.core.executor.stage_times()
        assert times["steps"] == llm.engine.core.num_steps
        assert times["attention_ms_per_layer"] > 0 and times["ffn_ms_per_layer"] > 0
        assert 0 <= times["attention_bubble"] < 1 and 0 <= times["ffn_bubble"] < 1
    finally:
        llm.engine.shutdown()


def test_afd_1a1f_moe_equals_local(tmp_path):
    """A tiny Mixtral: the routing computed on the attention side travels with ffn_input to the FFN worker."""
    make_tiny_model(tmp_path, "mixtral", num_local_experts=4, num_experts_per_tok=2)
    expected = [o.outputs[0].token_ids for o in
                LLM(str(tmp_path), dtype="float32").generate(PROMPTS, GREEDY, use_tqdm=False)]
    llm = LLM(str(tmp_path), dtype="float32", afd="1A1F", micro_batches=2, afd_transport="shm")
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == expected
    finally:
        llm.engine.shutdown()


def test_micro_batches_cover_every_request_once_in_order():
    from types import SimpleNamespace
    for tokens, m in [([1] * 32, 2), ([128] * 16, 3), ([2048], 2), ([1, 1, 2000], 2), ([1, 1], 3), ([100, 1, 1, 1], 3)]:
        groups = split_micro_batches([SimpleNamespace(num_tokens=t) for t in tokens], m)
        assert [i for g in groups for i in g] == list(range(len(tokens)))
        assert 1 <= len(groups) <= min(m, len(tokens)) and all(groups)
    # Equal sequences split evenly.
    assert [len(g) for g in split_micro_batches([SimpleNamespace(num_tokens=1)] * 32, 2)] == [16, 16]


@pytest.mark.parametrize("afd, message", [("3X", "must look like 1A1F"), ("0A1F", "must look like 1A1F"),
                                          ("2A1F", "1A1F only")])
def test_unsupported_afd_ratios_are_rejected_clearly(tiny_llama, afd, message):
    path, _ = tiny_llama
    with pytest.raises(ValueError, match=message):
        LLM(str(path), dtype="float32", afd=afd)
