"""`afdserve serve --afd xAyF` against the offline local executor (the oracle): greedy fp32 completions through the
HTTP server are identical, for SmolLM2 and for a tiny MoE, over 1A1F, 1A2F and 2A1F and 1, 2 and 3 micro-batches.
Every combination runs in CI (18 servers, ~20 s each on 2 cores).

The requests are sent concurrently so the engine batches them: the micro-batches split real batches and both
attention ranks of 2A1F get requests.

Faults: an FFN worker process killed mid-stream is replaced and the requests in flight recompute their KV on the new
workers: every stream and response ends with the offline text, the server stays up, every KV block comes back."""
from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from conftest import make_tiny_model
from afdserve.cluster.actors import process_alive
from afdserve import LLM, SamplingParams

from .server_process import MODEL_NAME, ServerProcess, command_line, descendant_pids, metric, wait_for

PROMPTS = [[5, 17, 99, 3, 250, 41, 8], list(range(10, 50)), [7, 7], list(range(60, 90))]
MAX_TOKENS = 12
LONG_TOKENS = 300  # the fault test's streams: long enough to be killed mid-way


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """Qwen2-MoE: routed experts (split over two FFN workers in 1A2F), a gated shared expert, one dense layer."""
    path = tmp_path_factory.mktemp("tiny-qwen2-moe")
    make_tiny_model(path, "qwen2_moe", num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                    moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=[1])
    return path


@pytest.fixture(scope="module")
def offline_texts():
    """The local executor's greedy texts, computed once per model."""
    cache: dict[str, list[str]] = {}

    def texts(model_dir) -> list[str]:
        if str(model_dir) not in cache:
            cache[str(model_dir)] = _generate_locally(model_dir)
        return cache[str(model_dir)]
    return texts


def _generate_locally(model_dir) -> list[str]:
    llm = LLM(str(model_dir), dtype="float32", max_model_len=2048)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


def served_texts(server: ServerProcess) -> list[str]:
    client = OpenAI(base_url=server.url("/v1"), api_key="unused")

    def complete(prompt: list[int]) -> str:
        return client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(complete, PROMPTS))


CASES = [(model, afd, m) for model in ("smollm2", "tiny-moe") for afd in ("1A1F", "1A2F", "2A1F") for m in (1, 2, 3)]


@pytest.mark.parametrize("model, afd, micro_batches", CASES)
def test_afd_server_greedy_equals_local(model, afd, micro_batches, smollm2_dir, tiny_moe, offline_texts, tmp_path):
    model_dir = smollm2_dir if model == "smollm2" else tiny_moe
    expected = offline_texts(model_dir)
    with ServerProcess(model_dir, tmp_path / "server.log", "--num-kv-blocks", "64", "--afd", afd,
                       "--micro-batches", str(micro_batches), "--afd-transport", "shm") as server:
        assert served_texts(server) == expected
        # Per-layer stage times reach /metrics (the first snapshot is asked for after the first step).
        samples = wait_for(lambda: (m := server.metrics()) and
                           metric(m, "afdserve:afd_attention_seconds_per_layer") > 0 and m, timeout=10)
        assert samples, "no AFD stage times in /metrics"
        for name in ("ffn_seconds_per_layer", "transfer_seconds_per_layer"):
            assert metric(samples, f"afdserve:afd_{name}") > 0, name
        assert 0 <= metric(samples, "afdserve:afd_ffn_bubble_ratio") < 1
        if model == "tiny-moe" and afd.endswith("2F"):  # sharded MoE passes, by how they ran
            assert metric(samples, "afdserve:afd_moe_layer_passes_total") > 0
            assert metric(samples, "afdserve:afd_moe_layer_pass_seconds_total") > 0
        x, y = int(afd[0]), int(afd[2])  # every worker reports, not worker 0 alone
        workers = {(dict(labels)["role"], dict(labels)["rank"]) for (name, labels) in samples
                   if name == "afdserve:afd_worker_compute_seconds_per_layer"}
        assert workers == {("attention", str(r)) for r in range(x)} | {("ffn", str(r)) for r in range(y)}
        if model == "tiny-moe":
            # Each token row of each MoE layer picks top_k = 2 experts: the prompts' tokens, then one row per decode
            # step but the last (11 of 12 tokens are fed back), and nothing else ran on this fresh server.
            rows = sum(len(p) for p in PROMPTS) + len(PROMPTS) * (MAX_TOKENS - 1)

            def expert_tokens(layer: str):
                return metric(server.metrics(), "afdserve:afd_expert_tokens_total", layer=layer)
            # the snapshot catches up within a few scrapes; layer 1 is dense (mlp_only_layers)
            assert wait_for(lambda: expert_tokens("0") == expert_tokens("2") == 2 * rows, timeout=10)
            assert expert_tokens("1") == 0


def is_ffn_worker(pid: int, backend: str) -> bool:
    """Ray names its actor processes ray::FFNWorker; a local worker process's command line ends with its class."""
    line = command_line(pid)
    return line.startswith("ray::FFNWorker") if backend == "ray" else line.split()[-1:] == ["FFNWorker"]


@pytest.mark.parametrize("backend", ["ray", "mp"])
def test_killed_ffn_worker_mid_stream_loses_no_request(tiny_moe, tmp_path, backend):
    long = SamplingParams(temperature=0, max_tokens=LONG_TOKENS, ignore_eos=True)
    expected = [o.outputs[0].text for o in LLM(str(tiny_moe), dtype="float32", max_model_len=2048).generate(
        PROMPTS[:3], long, use_tqdm=False)]
    with ServerProcess(tiny_moe, tmp_path / "server.log", "--num-kv-blocks", "64", "--afd", "1A1F",
                       "--afd-transport", "shm", "--distributed-executor-backend", backend) as server:
        client = OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)
        request = dict(model=MODEL_NAME, temperature=0, max_tokens=LONG_TOKENS, extra_body={"ignore_eos": True})
        started, texts, chunks_seen = threading.Barrier(3), {}, {}

        def stream(i, prompt):
            parts = []
            for chunk in client.completions.create(prompt=prompt, stream=True, **request):
                parts.append(chunk.choices[0].text if chunk.choices else "")
                chunks_seen[i] = len(parts)
                if len(parts) == 1:
                    started.wait()
            texts[i] = "".join(parts)

        def whole(i, prompt):
            texts[i] = client.completions.create(prompt=prompt, **request).choices[0].text

        threads = [threading.Thread(target=stream, args=(i, p)) for i, p in enumerate(PROMPTS[:2])]
        threads.append(threading.Thread(target=whole, args=(2, PROMPTS[2])))
        for t in threads:
            t.start()
        started.wait(timeout=60)  # both streams have tokens; the non-streaming request is in the same batches
        ffn = [pid for pid in descendant_pids(server.proc.pid) if is_ffn_worker(pid, backend)]
        assert len(ffn) == 1
        at_kill = dict(chunks_seen)
        os.kill(ffn[0], signal.SIGKILL)
        for t in threads:
            t.join(timeout=120)
        # Each request recomputed its KV on the new workers and went on: the same text as without the kill.
        assert [texts.get(i) for i in range(3)] == expected
        replacement = [pid for pid in descendant_pids(server.proc.pid) if is_ffn_worker(pid, backend)]
        assert len(replacement) == 1 and replacement != ffn
        assert max(at_kill.values()) < LONG_TOKENS / 2  # the kill came early in the streams
        assert httpx.get(server.url("/health")).status_code == 200
        samples = wait_for(lambda: (m := server.metrics()) and
                           metric(m, "afdserve:num_requests_running") == 0 and m, timeout=30)
        assert metric(samples, "afdserve:kv_cache_usage_perc") == 0
        assert metric(samples, "afdserve:request_success_total", finished_reason="length") == 3
        assert server.proc.poll() is None
        children = descendant_pids(server.proc.pid)
        assert any(command_line(pid).startswith("ray::") for pid in children) == (backend == "ray")
    # The server stops every process it started on exit: its worker processes, or the Ray it started (raylet, GCS,
    # workers and the raylet's agents, ray::DashboardAgent and ray::RuntimeEnvAgent, which outlived it before).
    assert server.proc.returncode == 0
    left = wait_for(lambda: not [pid for pid in children if process_alive(pid)] or None, timeout=30)
    assert left, [command_line(pid) for pid in children if process_alive(pid)]
