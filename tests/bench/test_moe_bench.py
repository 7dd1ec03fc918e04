"""`afdserve bench moe` on a tiny shape: it runs, prints its table and writes one JSON row per (dtype, tokens)."""
import json

from afdserve.engine.cli import main


def test_bench_moe_writes_a_row_per_dtype_and_token_count(tmp_path, capsys):
    path = tmp_path / "moe.json"
    assert main(["bench", "moe", "--hidden", "16", "--intermediate", "8", "--experts", "4", "--tokens", "1", "5",
                 "--repeats", "1", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert [(r["dtype"], r["tokens"]) for r in rows] == [(d, n) for d in ("bfloat16", "float32") for n in (1, 5)]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert "tokens/s" in capsys.readouterr().out
