"""--kv-cache-dtype through the engine on a tiny random Llama: the flag reaches the runner's caches, a window that
covers everything reproduces the full-precision run exactly, and batching does not mix sequences' KV."""
import pytest
import torch

from conftest import make_tiny_model
from afdserve import LLM, SamplingParams
from afdserve.engine.arg_utils import add_engine_args, engine_config_from_args
from afdserve.kernels.attention.kv_quant import QuantizedKVCache

PROMPTS = [[5, 17, 99, 3, 250, 41, 8], list(range(10, 60)), [7], list(range(100, 137))]
NEW = 20
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(path, "llama")
    return path


@pytest.fixture(scope="module")
def full(tiny_dir):
    return run(tiny_dir, PROMPTS)


def run(tiny_dir, prompts, **kv):
    with LLM(str(tiny_dir), dtype="float32", block_size=16, max_num_seqs=8, num_kv_blocks=64, **kv) as llm:
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return [(o.outputs[0].token_ids, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]


def test_flag_reaches_the_runner_caches(tiny_dir):
    import argparse
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--model", str(tiny_dir), "--kv-cache-dtype", "saq", "--kv-staircase",
                              "32:16,64:4,inf:2", "--dtype", "float32", "--max-num-seqs", "4", "--num-kv-blocks", "64"])
    config = engine_config_from_args(args)
    assert (config.cache.kv_cache_dtype, config.cache.stairs) == ("saq", [(32, 16), (64, 4), (float("inf"), 2)])
    with LLM(config=config) as llm:
        runner = llm.engine.core.executor.runner
        assert all(isinstance(c, QuantizedKVCache) for c in runner.kv_caches)
        assert [type(s).__name__ for s in runner.kv_caches[0].stores] == ["FullPrecisionStore", "KiviStore",
                                                                         "KiviStore"]
    with LLM(str(tiny_dir), dtype="float32", num_kv_blocks=64) as llm:  # auto: the plain tensors, untouched
        assert all(type(c) is torch.Tensor for c in llm.engine.core.executor.runner.kv_caches)
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "int3"])


@pytest.mark.parametrize("kv", [dict(kv_cache_dtype="int4", kv_window=128),
                                dict(kv_cache_dtype="saq", kv_staircase="128:16,256:8,inf:2")])
def test_window_covering_every_token_is_exactly_full_precision(tiny_dir, full, kv):
    assert run(tiny_dir, PROMPTS, **kv) == full


@pytest.mark.parametrize("kv", [dict(kv_cache_dtype="int8"), dict(kv_cache_dtype="fp8_e4m3"),
                                dict(kv_cache_dtype="int4", kv_window=16),
                                dict(kv_cache_dtype="saq", kv_staircase="16:16,32:8,48:4,inf:2")])
def test_quantized_requests_batched_equal_each_alone(tiny_dir, full, kv):
    """Each prompt prefills in one chunk and decodes a token a step, so its KV is the same alone or batched: a
    batch that mixed up blocks, slots or stairs between sequences would show up as different tokens."""
    alone = [run(tiny_dir, [p], **kv)[0] for p in PROMPTS]
    batched = run(tiny_dir, PROMPTS, **kv)
    for (a_tok, a_lp), (b_tok, b_lp) in zip(alone, batched):
        assert a_tok == b_tok
        assert max(abs(x - y) for x, y in zip(a_lp, b_lp)) < 1e-4
    assert [lp for _, lp in batched] != [lp for _, lp in full]  # the quantized path really ran
