"""`afdserve bench moe` on a tiny shape: it runs, prints its table and writes one JSON row per (dtype, tokens)."""
import json

import pytest

from afdserve.engine.cli import main


def test_bench_moe_writes_a_row_per_dtype_and_token_count(tmp_path, capsys):
    path = tmp_path / "moe.json"
    assert main(["bench", "moe", "--hidden", "16", "--intermediate", "8", "--experts", "4", "--tokens", "1", "5",
                 "--repeats", "1", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert [(r["dtype"], r["tokens"]) for r in rows] == [(d, n) for d in ("bfloat16", "float32") for n in (1, 5)]
    for r in rows:  # the rates follow from the measured time: tokens, and a SwiGLU expert's 3 GEMMs per routed copy
        seconds = r["median_ms"] / 1e3
        assert seconds > 0 and r["tokens_per_s"] == pytest.approx(r["tokens"] / seconds)
        assert r["gflops"] == pytest.approx(r["tokens"] * 2 * 2 * 3 * 16 * 8 / seconds / 1e9)  # top-2 of 4, H16, I8
    assert "tokens/s" in capsys.readouterr().out
