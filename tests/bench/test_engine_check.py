"""bench/gpu/engine_check.py on the CPU with a tiny model (CPU against CPU), so the GPU script cannot rot between
the sessions that have a GPU: it runs end to end and writes what it measured."""
import json

import pytest

from afdserve.bench.gpu import engine_check
from conftest import make_tiny_model


def test_engine_check_runs_parity_and_throughput(tmp_path):
    make_tiny_model(tmp_path / "tiny", "llama")
    out = tmp_path / "engine.json"
    rc = engine_check.main(["--model", str(tmp_path / "tiny"), "--device", "cpu", "--parity-tokens", "4",
                            "--num-requests", "4", "--concurrency", "2,1", "--batch-1-requests", "2",
                            "--modes", "graphs,eager,fp8,afd",
                            "--input-len", "8", "--output-len", "3", "--num-kv-blocks", "64", "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["parity"]["passed"]
    for key in ("prompts", "prompts_afd"):  # the afd mode's tokens are checked against the CPU's too
        assert [len(p["cpu"]) for p in result["parity"][key]] == [4] * len(engine_check.PROMPT_LENGTHS)
    rows = result["throughput"]
    assert [(r["mode"], r["spec"]["concurrency"], r["output_tokens"]) for r in rows] == [
        (mode, concurrency, requests * 3) for concurrency, requests in ((2, 4), (1, 2))
        for mode in ("graphs", "eager", "fp8", "afd")]
    assert all(r["device"] == "cpu" for r in rows) and result["host"]["torch"]
    afd_rows = [r for r in rows if r["mode"] == "afd"]
    assert all(r["afd"] == "1A1F" and r["afd_stage_times"]["steps"] > 0 for r in afd_rows)  # it really ran AFD


def test_engine_check_refuses_an_unknown_mode(tmp_path, capsys):
    with pytest.raises(SystemExit):
        engine_check.main(["--model", str(tmp_path), "--device", "cpu", "--modes", "eager,afd2"])
    assert "--modes: unknown afd2; choose from graphs, eager, fp8, afd" in capsys.readouterr().err


@pytest.mark.slow
def test_the_random_stand_in_has_smollm2s_shape(tmp_path):
    from afdserve.models.hf_config import load_transformer_config
    cfg = load_transformer_config(engine_check.random_smollm2_shaped(tmp_path))
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (576, 30, 9, 3, 49152)


TINY_MOE = dict(engine_check.MOE_SHAPE, vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                intermediate_size=128)


def test_random_moe_is_the_checkpoint_transformers_reads(tmp_path):
    """The hand-written MoE checkpoint (no transformers model built) loads in transformers' Qwen3MoeForCausalLM with
    every tensor used, and the engine's greedy tokens equal transformers' on it."""
    import torch
    import transformers
    from afdserve import LLM, SamplingParams
    from conftest import hf_greedy
    directory = engine_check.random_moe_shaped(tmp_path / "moe", TINY_MOE)
    hf, info = transformers.Qwen3MoeForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                               output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    prompt = [5, 17, 99, 3, 250, 41, 8]
    with LLM(str(directory), dtype="float32") as llm:
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf.eval(), prompt, 6)


def test_engine_check_runs_a_random_moe_without_parity(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_check, "MOE_SHAPE", TINY_MOE)
    out = tmp_path / "moe.json"
    rc = engine_check.main(["--random-moe", str(tmp_path / "moe"), "--parity-tokens", "0", "--device", "cpu",
                            "--num-requests", "2", "--concurrency", "2", "--modes", "eager,fp8", "--input-len", "8",
                            "--output-len", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["parity"]["skipped"] == "--parity-tokens 0"
    assert [(r["mode"], r["output_tokens"]) for r in result["throughput"]] == [("eager", 4), ("fp8", 4)]
