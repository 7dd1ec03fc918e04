"""CUDA graphs for decode steps (engine/cuda_graphs.py). On the CPU a plain call stands in for each graph
(capture=False), which checks what a graph depends on: the static buffers, the bucket choice, the padding rows and
their pad block, stale rows of a larger step. Oracle: transformers' greedy tokens and log-softmax. The last test
captures real graphs and runs only where torch sees a GPU (bench/gpu/check_all.sh runs it there)."""
import logging

import pytest
import torch

from afdserve import LLM, SamplingParams
from afdserve.engine.config import DEFAULT_CUDA_GRAPH_SIZES, ModelConfig, parse_cuda_graph_sizes
from afdserve.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from conftest import graphed_llm, hf_greedy, make_tiny_model

PROMPTS = [[5, 9, 13, 200, 7], list(range(40, 77)), [3] * 17, list(range(100, 109)), [11, 12]]
NEW_TOKENS = [12, 3, 9, 6, 1]  # requests finish at different steps: decode batches of 4, 3, 2 and 1 rows


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    return directory, make_tiny_model(directory, "llama")


def test_buckets_keep_what_a_step_can_fill_and_the_full_batch():
    assert graph_batch_sizes(DEFAULT_CUDA_GRAPH_SIZES, 256) == DEFAULT_CUDA_GRAPH_SIZES
    assert graph_batch_sizes(DEFAULT_CUDA_GRAPH_SIZES, 40) == (1, 2, 4, 8, 16, 24, 32, 40)
    assert graph_batch_sizes((1, 2, 4), 1000) == (1, 2, 4)  # bigger batches run eagerly
    assert graph_batch_sizes((8,), 3) == (3,)


def test_bucket_is_the_smallest_size_that_holds_the_batch():
    graphs = DecodeGraphs(lambda ids, pos, meta: ids, (1, 2, 4, 8), max_blocks=2, block_size=4, pad_block=9,
                          device=torch.device("cpu"), capture=False)
    assert [graphs.bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, None]


@pytest.mark.parametrize("sizes", ["1,x", "0,2", "", [1, -4]])
def test_bad_graph_sizes_are_refused_naming_them(sizes):
    with pytest.raises(ValueError, match="cuda_graph_sizes must be batch sizes"):
        ModelConfig(device="cpu", cuda_graph_sizes=sizes)
    assert parse_cuda_graph_sizes("8,1,2,2") == (1, 2, 8)


def test_no_graphs_on_a_cpu_device(tiny_llama):
    llm = LLM(str(tiny_llama[0]), dtype="float32", device="cpu", num_kv_blocks=32)
    runner = llm.engine.core.executor.runner
    assert runner.decode_graphs is None
    assert runner.kv_caches[0].shape[2] == 32 + 1 and runner.pad_block == 32  # the pad block past the pool


def test_graph_steps_give_transformers_tokens_and_logprobs(tiny_llama):
    directory, hf = tiny_llama
    llm, replayed = graphed_llm(directory, (1, 2, 4, 8))
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=3) for n in NEW_TOKENS]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, n, out in zip(PROMPTS, NEW_TOKENS, outs):
        tokens = out.outputs[0].token_ids
        assert tokens == hf_greedy(hf, prompt, n)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + tokens])).logits[0].log_softmax(-1)
        for j, reported in enumerate(out.outputs[0].logprobs):
            for token_id, lp in reported.items():
                assert abs(lp.logprob - ref[len(prompt) - 1 + j, token_id].item()) < 1e-4
    # Every bucket was used, and 3 rows ran in the 4-row graph with a padding row (after a step of 4).
    assert {1, 2, 4} <= set(replayed) and 8 not in replayed
    assert llm.engine.core.kv.num_free_blocks == llm.engine.num_kv_blocks  # no block held after the requests


def test_pad_rows_write_only_the_pad_block(tiny_llama):
    directory, _ = tiny_llama
    llm, replayed = graphed_llm(directory, (8,))
    runner = llm.engine.core.executor.runner
    llm.generate([[5, 9, 13]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert replayed == [8, 8, 8]  # one row and seven padding rows, three times
    blocks_written = [b for b in range(runner.pad_block + 1) if runner.kv_caches[0][:, :, b].abs().sum() > 0]
    assert blocks_written == [0, runner.pad_block]  # the request's block and the pad block


def test_larger_batches_than_any_graph_run_eagerly(tiny_llama):
    directory, hf = tiny_llama
    llm, replayed = graphed_llm(directory, (1, 2))
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    outs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 3) for p in PROMPTS[:3]]
    assert replayed == []  # three decodes per step, no bucket holds them


def test_a_failed_capture_leaves_the_engine_eager(tiny_llama, monkeypatch, caplog):
    directory, hf = tiny_llama
    llm = LLM(str(directory), dtype="float32", device="cpu", num_kv_blocks=32)
    runner = llm.engine.core.executor.runner

    def fail(self, size):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(DecodeGraphs, "_capture", fail)
    with caplog.at_level(logging.WARNING):
        runner.capture_decode_graphs((1, 2), capture=True)
    assert runner.decode_graphs is None and "decode steps run eagerly" in caplog.text
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf, PROMPTS[0], 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures real CUDA graphs")
def test_captured_graphs_match_eager_steps_on_a_gpu(tiny_llama):
    directory, _ = tiny_llama
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=2) for n in NEW_TOKENS]
    results = []
    for enforce_eager in (True, False):
        llm = LLM(str(directory), dtype="float32", device="cuda", num_kv_blocks=64, max_model_len=96,
                  enforce_eager=enforce_eager, cuda_graph_sizes="1,2,4,8")
        assert (llm.engine.core.executor.runner.decode_graphs is None) == enforce_eager
        results.append(llm.generate(PROMPTS, params, use_tqdm=False))
    for eager, graphed in zip(*results):
        assert eager.outputs[0].token_ids == graphed.outputs[0].token_ids
        for a, b in zip(eager.outputs[0].logprobs, graphed.outputs[0].logprobs):
            assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-3 for t in a)
