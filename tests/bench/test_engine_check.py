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
                            "--input-len", "8", "--output-len", "3", "--num-kv-blocks", "64", "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["parity"]["passed"]
    assert [len(p["cpu"]) for p in result["parity"]["prompts"]] == [4] * len(engine_check.PROMPT_LENGTHS)
    rows = result["throughput"]
    assert [(r["mode"], r["spec"]["concurrency"], r["output_tokens"]) for r in rows] == [
        ("graphs", 2, 4 * 3), ("eager", 2, 4 * 3), ("graphs", 1, 2 * 3), ("eager", 1, 2 * 3)]
    assert all(r["device"] == "cpu" for r in rows) and result["host"]["torch"]


@pytest.mark.slow
def test_the_random_stand_in_has_smollm2s_shape(tmp_path):
    from afdserve.models.hf_config import load_transformer_config
    cfg = load_transformer_config(engine_check.random_smollm2_shaped(tmp_path))
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (576, 30, 9, 3, 49152)
