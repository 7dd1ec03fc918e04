"""The engine's device is a config value (ModelConfig.device): model, KV cache, batch metadata and sampler live on
it, and the attention backend follows it. CPU here; bench/gpu/engine_check.py runs the same engine on CUDA."""
import pytest
import torch

from afdserve import LLM, SamplingParams
from afdserve.engine.config import ModelConfig
from afdserve.kernels.attention import TorchPagedAttention
from conftest import generate_and_compare, make_tiny_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    return directory, make_tiny_model(directory, "llama")


def test_engine_on_an_explicit_cpu_device_matches_transformers(tiny_llama):
    directory, hf = tiny_llama
    llm = LLM(str(directory), dtype="float32", device="cpu", num_kv_blocks=32)
    runner = llm.engine.core.executor.runner
    assert runner.device == torch.device("cpu")
    assert all(kv.device.type == "cpu" for kv in runner.kv_caches)
    assert all(p.device.type == "cpu" for p in runner.model.parameters())
    assert isinstance(runner.model.layers[0].self_attn.attn, TorchPagedAttention)  # auto on a CPU device
    generate_and_compare(llm, hf, [[5, 9, 13, 200, 7], list(range(40, 77))], new_tokens=6, top=3)
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=5, ignore_eos=True)
    first, again = (llm.generate([[5, 9, 13]], seeded, use_tqdm=False)[0].outputs[0].token_ids for _ in range(2))
    assert first == again  # a per-request generator on the device


def test_auto_device_is_cuda_only_when_torch_sees_a_gpu():
    assert ModelConfig().device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert ModelConfig(device="cpu").device == "cpu"


@pytest.mark.parametrize("name", ["tpu", "cuda:x", ""])
def test_a_bad_device_name_is_refused_naming_it(name):
    with pytest.raises(ValueError, match=f"device must be auto, cpu, cuda or cuda:N, got {name!r}"):
        ModelConfig(device=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a host without a GPU")
def test_cuda_on_a_host_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        ModelConfig(device="cuda")


def test_dtype_auto_runs_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    """An AVX2-only host has no oneDNN bf16 kernels (26 output tok/s against ~85 in fp32): auto picks fp32 there;
    an explicit dtype and a GPU keep what was asked."""
    import afdserve.models.hf_config as hf_config
    from types import SimpleNamespace
    checkpoint = SimpleNamespace(torch_dtype=torch.bfloat16)
    for native, expected in [(True, torch.bfloat16), (False, torch.float32)]:
        monkeypatch.setattr(hf_config, "onednn_runs_natively", lambda dtype, native=native: native)
        assert hf_config.resolve_dtype("auto", checkpoint, "cpu") == expected
        assert hf_config.resolve_dtype("bfloat16", checkpoint, "cpu") == torch.bfloat16
        assert hf_config.resolve_dtype("auto", checkpoint, "cuda:0") == torch.bfloat16
