"""`afdserve bench kernels` on tiny shapes (CPU: the torch backend only), and the bytes/FLOPs it divides by."""
import json

import pytest

from afdserve.bench.kernels import KernelBenchSpec, hbm_peak, traffic
from afdserve.engine.cli import main


def test_bench_kernels_writes_a_row_per_kernel_and_group(tmp_path, capsys):
    path = tmp_path / "kernels.json"
    assert main(["bench", "kernels", "--device", "cpu", "--batch", "2", "--context", "40", "--chunk", "8",
                 "--kv-heads", "2", "--head-dim", "16", "--groups", "1", "3", "--repeats", "1",
                 "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["device"] == "cpu" and result["peak"] is None
    rows = result["results"]
    assert [(r["kernel"], r["backend"], r["group"]) for r in rows] == [
        (k, "torch", g) for g in (1, 3) for k in ("decode", "prefill")]
    assert all(r["ms"] > 0 and r["gbps"] > 0 and r["peak_fraction"] is None for r in rows)
    assert "GB/s" in capsys.readouterr().out


def test_traffic_counts_kv_once_plus_q_and_out():
    spec = KernelBenchSpec(batch=2, context=10, chunk=4, kv_heads=3, head_dim=8, dtype="bfloat16")
    # decode: K and V of 2 x 10 tokens x 3 heads x 8 dims in bf16, q and out of 2 x 6 heads x 8 dims; each of the
    # 6 query heads of a sequence sees all 10 keys, 4 * 8 FLOPs per (head, key).
    assert traffic("decode", spec, group=2) == (2 * 10 * 3 * 8 * 2 * 2 + 2 * 2 * 6 * 8 * 2, 4 * 8 * 6 * 2 * 10)
    # prefill: 4 queries at positions 6..9 see 7 + 8 + 9 + 10 = 34 keys.
    assert traffic("prefill", spec, group=2) == (2 * 10 * 3 * 8 * 2 * 2 + 2 * 2 * 4 * 6 * 8 * 2, 4 * 8 * 6 * 2 * 34)


def test_bench_kernels_on_a_quantized_cache(tmp_path):
    path = tmp_path / "kernels.json"
    assert main(["bench", "kernels", "--device", "cpu", "--batch", "2", "--context", "40", "--chunk", "8",
                 "--kv-heads", "2", "--head-dim", "16", "--groups", "2", "--repeats", "1", "--kv-dtype", "fp8_e4m3",
                 "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["spec"]["kv_dtype"] == "fp8_e4m3"
    assert [(r["kernel"], r["backend"]) for r in result["results"]] == [("decode", "torch"), ("prefill", "torch")]


def test_traffic_of_a_quantized_cache_counts_codes_and_scales():
    spec = KernelBenchSpec(batch=2, context=10, chunk=4, kv_heads=3, head_dim=8, dtype="bfloat16", kv_dtype="int8")
    # K and V: one byte per element plus a 2-byte scale per (token, head); q and out stay bf16.
    assert traffic("decode", spec, group=2)[0] == 2 * 10 * 3 * (8 + 2) * 2 + 2 * 2 * 6 * 8 * 2


def test_hbm_peak_by_device_name():
    assert hbm_peak("NVIDIA H100 80GB HBM3") == ("H100 SXM", 3350.0)
    assert hbm_peak("NVIDIA H100 PCIe") == ("H100 PCIe", 2000.0)
    assert hbm_peak("NVIDIA H200") == ("H200", 4800.0)
    assert hbm_peak("NVIDIA A10G") is None


def test_bad_spec_is_rejected():
    with pytest.raises(ValueError, match="chunk"):
        KernelBenchSpec(context=8, chunk=16)
    with pytest.raises(ValueError, match="kernels"):
        KernelBenchSpec(kernels=("encode",))
    with pytest.raises(ValueError, match="kv_dtype"):
        KernelBenchSpec(kv_dtype="int4")
