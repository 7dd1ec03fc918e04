"""AFD on Ray against the local executor (the oracle): greedy fp32 tokens identical for 1A1F, 1A2F and 2A1F with 1, 2
and 3 micro-batches, with requests of mixed lengths so steps mix prefill chunks and decodes."""
import json
import subprocess
import sys

import pytest

from conftest import make_tiny_model
from afdserve import LLM, SamplingParams
from afdserve.cluster.micro_batch import split_micro_batches
from afdserve.engine.config import engine_config

PROMPTS = [[5, 17, 99, 3, 250, 41, 8], list(range(10, 50)), [7], list(range(60, 90)), list(range(100, 117))]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    hf = make_tiny_model(path, "llama")
    local = LLM(str(path), dtype="float32", max_num_batched_tokens=48)
    expected = [o.outputs[0].token_ids for o in local.generate(PROMPTS, GREEDY, use_tqdm=False)]
    # The oracle of role-pruned loading: transformers' own parameters, the MLPs' on the FFN side (fp32 bytes).
    hf_bytes = {"ffn": 0, "attention": 0}
    for name, p in hf.named_parameters():
        hf_bytes["ffn" if ".mlp." in name else "attention"] += 4 * p.numel()
    return path, expected, hf_bytes


@pytest.mark.parametrize("transport", ["gloo", "shm"])
@pytest.mark.parametrize("micro_batches", [1, 2, 3])
def test_afd_1a1f_equals_local(tiny_llama, transport, micro_batches):
    path, expected, hf_bytes = tiny_llama
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
        assert times["transfer_ms_per_layer"] > 0
        assert 0 <= times["attention_bubble"] < 1 and 0 <= times["ffn_bubble"] < 1
        # Each worker loaded only its side of the checkpoint.
        assert core_bytes(llm) == {"attention": [hf_bytes["attention"]], "ffn": [hf_bytes["ffn"]]}
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


def core_bytes(llm: LLM) -> dict:
    return llm.engine.core.executor.worker_weight_bytes()


def test_micro_batches_cover_every_request_once_in_order():
    from types import SimpleNamespace
    for tokens, m in [([1] * 32, 2), ([128] * 16, 3), ([2048], 2), ([1, 1, 2000], 2), ([1, 1], 3), ([100, 1, 1, 1], 3)]:
        groups = split_micro_batches([SimpleNamespace(num_tokens=t) for t in tokens], m)
        assert [i for g in groups for i in g] == list(range(len(tokens)))
        assert 1 <= len(groups) <= min(m, len(tokens)) and all(groups)
    # Equal sequences split evenly.
    assert [len(g) for g in split_micro_batches([SimpleNamespace(num_tokens=1)] * 32, 2)] == [16, 16]


@pytest.mark.parametrize("afd, micro_batches, transport, backend", [
    ("1A2F", 1, "shm", "ray"), ("1A2F", 3, "gloo", "ray"), ("2A1F", 2, "shm", "ray"), ("2A1F", 3, "gloo", "ray"),
    ("2A2F", 2, "shm", "ray"), ("1A1F", 2, "shm", "mp"), ("1A2F", 2, "gloo", "mp"), ("2A1F", 2, "shm", "mp")])
def test_afd_xayf_equals_local(tiny_llama, afd, micro_batches, transport, backend):
    """1A2F: each FFN worker holds half of every MLP's intermediate dimension and the attention side sums the two
    partials. 2A1F: requests split over two attention workers with their own KV caches; the FFN worker batches both.
    Workers as Ray actors or as local processes (--distributed-executor-backend mp)."""
    path, expected, hf_bytes = tiny_llama
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=48, afd=afd, micro_batches=micro_batches,
              afd_transport=transport, distributed_executor_backend=backend)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        assert got == expected
        x, y = int(afd[0]), int(afd[2])
        assert core_bytes(llm) == {"attention": [hf_bytes["attention"]] * x, "ffn": [hf_bytes["ffn"] // y] * y}
        core = llm.engine.core
        assert core.num_free_blocks == len(core.kv_managers) * llm.engine.num_kv_blocks
        if afd.startswith("2A"):  # both attention workers served requests
            workers = core.executor.stage_times()["workers"]["attention"]
            assert all(w["steps"] > 0 for w in workers)
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("afd, micro_batches", [("1A1F", 2), ("2A1F", 3)])
def test_afd_int4_kv_staircase_equals_local(tiny_llama, afd, micro_batches):
    """int4 with a 16-token window: the scheduler's staircase moves reach each attention rank's cache, once per
    step, shared by its micro-batches. Every sequence's KV is its own, so the tokens equal the local int4 run."""
    path = tiny_llama[0]
    kv = dict(dtype="float32", max_num_batched_tokens=48, kv_cache_dtype="int4", kv_window=16)
    with LLM(str(path), **kv) as local:
        expected = [o.outputs[0].token_ids for o in local.generate(PROMPTS, GREEDY, use_tqdm=False)]
        assert expected != tiny_llama[1]  # the int4 floor really ran
    llm = LLM(str(path), afd=afd, micro_batches=micro_batches, **kv)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == expected
    finally:
        llm.engine.shutdown()


def test_afd_1a2f_int8_weights_match_local(tiny_llama):
    """--quantization int8 under AFD: each FFN worker quantizes, then keeps its slice of every MLP with the whole
    layer's per-channel scales, so the two partial sums add up to the local int8 product, up to the kernel rounding
    each partial to bf16 (kernels/quant_linear.py). Prompt logprobs: within 5e-3 of the local int8 run, and at most
    half as far from it as from the unquantized run (measured: 2.0e-3 against 5.3e-3)."""
    path = tiny_llama[0]
    kw = dict(dtype="float32", max_num_batched_tokens=48)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)

    def prompt_logprobs(llm):
        return [lp[t].logprob for o, prompt in zip(llm.generate(PROMPTS, params, use_tqdm=False), PROMPTS)
                for lp, t in zip(o.prompt_logprobs[1:], prompt[1:])]

    def distance(a, b):
        return max(abs(x - y) for x, y in zip(a, b))
    with LLM(str(path), quantization="int8", **kw) as local:
        local_int8 = prompt_logprobs(local)
    with LLM(str(path), **kw) as local:
        unquantized = prompt_logprobs(local)
    llm = LLM(str(path), afd="1A2F", micro_batches=2, quantization="int8", **kw)
    try:
        got = prompt_logprobs(llm)
    finally:
        llm.engine.shutdown()
    assert distance(got, local_int8) < 5e-3
    assert distance(got, local_int8) <= distance(got, unquantized) / 2


@pytest.mark.parametrize("afd, moe_parallel, transport", [("1A2F", "ep", "shm"), ("1A2F", "sliced", "shm"),
                                                          ("2A2F", "adaptive", "gloo")])
def test_afd_sharded_moe_equals_local(tmp_path, afd, moe_parallel, transport):
    """A tiny Qwen2-MoE (routed experts + gated shared expert, one dense layer) over two FFN workers, each holding
    half of every expert: experts run expert-parallel (gathered whole from the peer for the pass), expert-sliced,
    or either per pass; the shared expert / dense MLP are sliced. The adaptive run's 120-token prompt is a pass big
    enough for the gather to pay (cluster/moe_parallel.gather_pays_off: 192 copies here), its decodes are not."""
    make_tiny_model(tmp_path, "qwen2_moe", num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                    moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=[1])
    prompts = PROMPTS + [list(range(130, 250))]
    expected = [o.outputs[0].token_ids for o in
                LLM(str(tmp_path), dtype="float32").generate(prompts, GREEDY, use_tqdm=False)]
    llm = LLM(str(tmp_path), dtype="float32", afd=afd, micro_batches=2, afd_transport=transport,
              moe_parallel=moe_parallel)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
        times = llm.engine.core.executor.stage_times()
        ep, sliced = times["moe_ep_passes"], times["moe_sliced_passes"]
        assert {"ep": ep > 0 and sliced == 0, "sliced": sliced > 0 and ep == 0,
                "adaptive": ep > 0 and sliced > 0}[moe_parallel], (ep, sliced)
        assert (times["moe_gathered_bytes"] > 0) == (ep > 0)
        # Each FFN worker holds half of the routed experts' bytes (their slices are equal here), not a second copy.
        # The per-token shared-expert gate (H -> 1) is whole on both; the router stays on the attention side.
        sizes = {name: t.numel() * 4 for name, t in _checkpoint(tmp_path).items() if ".mlp." in name}
        whole = sum(n for name, n in sizes.items() if ".shared_expert_gate." in name)
        halved = sum(n for name, n in sizes.items() if ".shared_expert_gate." not in name and ".mlp.gate." not in name)
        assert core_bytes(llm)["ffn"] == [halved // 2 + whole] * 2
    finally:
        llm.engine.shutdown()


def _checkpoint(directory) -> dict:
    from safetensors.torch import load_file
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("afd", ["3X", "0A1F", "1A0F", "A1F"])
def test_malformed_afd_ratios_are_rejected_clearly(tiny_llama, afd):
    path, _, _ = tiny_llama
    with pytest.raises(ValueError, match="must look like 1A1F"):
        LLM(str(path), dtype="float32", afd=afd)


def test_local_processes_start_from_a_script_without_a_main_guard(tiny_llama, tmp_path):
    """A script that builds an LLM at its top level, as users write them: worker processes must not re-run it (what
    multiprocessing's spawn would do) and need no Ray."""
    path, expected, _ = tiny_llama
    script = tmp_path / "offline.py"
    script.write_text(f"""import json, sys
from afdserve import LLM, SamplingParams
llm = LLM({str(path)!r}, dtype="float32", max_num_batched_tokens=48, afd="1A1F", afd_transport="shm",
          distributed_executor_backend="mp")
params = SamplingParams(temperature=0, max_tokens={GREEDY.max_tokens}, ignore_eos=True)
outputs = llm.generate({PROMPTS!r}, params, use_tqdm=False)
print(json.dumps([o.outputs[0].token_ids for o in outputs]))
print("ray imported:", "ray" in sys.modules)
llm.shutdown()
""")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    tokens, ray_line = run.stdout.strip().splitlines()[-2:]
    assert json.loads(tokens) == expected
    assert ray_line == "ray imported: False"


def test_each_worker_gets_its_own_gpu_when_there_is_one_per_worker(monkeypatch):
    import torch
    from afdserve.cluster.afd_executor import worker_config
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for gpus, devices in [(3, ["cuda:0", "cuda:1", "cuda:2"]), (2, ["cuda"] * 3)]:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        config = engine_config(afd="1A2F", device="cuda", distributed_executor_backend="mp")
        assert [worker_config(config, rank).model.device for rank in range(3)] == devices
    config = engine_config(afd="1A1F", device="cuda:1", distributed_executor_backend="mp")
    assert [worker_config(config, rank).model.device for rank in range(2)] == ["cuda:1", "cuda:1"]
    assert worker_config(engine_config(afd="1A1F", device="cpu"), 1).model.device == "cpu"
