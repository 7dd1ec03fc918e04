"""Paged attention kernel check on one CUDA GPU (H100 / H200): the Triton kernels (kernels/attention/triton_paged.py)
for correctness, then their bandwidth at the project's target decode shape (docs/architecture.md):
32K context, batch 64, 8 KV heads, head_dim 128, GQA 4 and 8, bf16, block size 16.

    python -m afdserve.bench.gpu.attention_kernel_check [--out results.json] [--skip-tests] [--no-sweep]

1. tests/kernels/test_triton_attention.py under pytest, compiled on the GPU (--noconftest: tests/conftest.py imports
   gguf, which the GPU image lacks; this file needs nothing from it, and its engine test skips itself on CUDA).
   The result records the passed / failed / skipped counts (`kernel_tests`, null with --skip-tests).
2. Agreement with the torch backend at sizes the tests cannot reach under the interpreter, on the GPU, bf16:
   decode at batch 8 x 8K (GQA 4, 8), batch 2 x 32K (the split heuristic picks several splits), prefill chunks
   of 512 after a 3.5K prefix. Max |triton - torch| must stay within 2e-2 (outputs are O(0.1)).
   Then the int8 / fp8_e4m3 caches (codes + per-token scales, dequantized in the kernel): decode at batch 8 x 8K and
   a prefill, against the torch backend's dequantize-on-gather over the same kv_quant.QuantizedKVCache.
3. Timings through bench/kernels.run_kernel_bench (do_bench medians, L2 cleared per call): the Triton decode at the
   target shape with a bf16, an fp8_e4m3 and an int8 cache, and both backends at batch 8 x 8K for decode and for
   prefill (the torch backend's GQA decode may copy K/V once per query head, too much memory at the target shape).
4. Unless --no-sweep: a few decode tile configs (BLOCK_N x warps x stages x key-tile orientation) at the target
   shape, bf16 and fp8 caches,
   best reported, as a starting point for tuning decode_config.
The peak HBM bandwidth comes from the device name (bench/kernels.HBM_PEAKS: H100 SXM 3350 GB/s, H200 4800 GB/s);
--peak-gbps overrides it. Ran in 46 s on an H100 before the quantized steps were added (budget: 8 minutes).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from xml.etree import ElementTree

import torch

from afdserve.bench.kernels import (KernelBenchSpec, format_kernel_result, kernel_operands, paged_inputs,
                                    run_kernel_bench, time_call, traffic)
from afdserve.kernels.attention.torch_paged import decode_attention, decode_mask_bias, prefill_attention

REPO = Path(__file__).resolve().parents[2]
TARGET = KernelBenchSpec(kernels=("decode",), batch=64, context=32768, kv_heads=8, head_dim=128, groups=(4, 8),
                         block_size=16, dtype="bfloat16", backends=("triton",), device="cuda")
COMPARE = replace(TARGET, kernels=("decode", "prefill"), batch=8, context=8192, chunk=512,
                  backends=("torch", "triton"))
DECODE_CHECKS = [(replace(TARGET, batch=8, context=8192), 4), (replace(TARGET, batch=8, context=8192), 8),
                 (replace(TARGET, batch=2), 8)]  # batch 2 x 32K: 16 programs, so several splits
QUANT_DECODE_CHECKS = [(replace(TARGET, batch=8, context=8192, kv_dtype=f), 8) for f in ("fp8_e4m3", "int8")]
QUANT_PREFILL_CHECKS = [(replace(TARGET, kernels=("prefill",), batch=4, context=4096, chunk=512, kv_dtype="fp8_e4m3"),
                         4)]
PREFILL_CHECKS = [(replace(TARGET, kernels=("prefill",), batch=4, context=4096, chunk=512), g) for g in (4, 8)]
SWEEP = [(64, 4, 3, False), (128, 4, 2, False), (128, 4, 3, False), (256, 4, 3, False),  # BLOCK_N, warps, stages,
         (64, 4, 3, True), (128, 4, 2, True), (128, 4, 3, True), (256, 4, 3, True)]  # keys loaded d-major


def run_kernel_tests() -> dict:
    """Runs the Triton attention tests compiled; their outcome counts, from pytest's JUnit report (an exit code of 0
    also means "every test skipped", which is no evidence that a kernel works)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "--noconftest", "-p", "no:cacheprovider",
               f"--junitxml={report}", "tests/kernels/test_triton_attention.py"]
        print("$", " ".join(cmd), flush=True)
        returncode = subprocess.run(cmd, cwd=REPO).returncode
        return kernel_test_counts(report.read_text() if report.exists() else "", returncode)


def kernel_test_counts(junit_xml: str, returncode: int) -> dict:
    """{"passed", "failed", "skipped", "ok"} from a JUnit report; ok only when some test ran and none failed."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    if junit_xml:
        for suite in ElementTree.fromstring(junit_xml).iter("testsuite"):
            total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
            failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            counts["passed"] += total - skipped - failed
            counts["failed"] += failed
            counts["skipped"] += skipped
    counts["ok"] = returncode == 0 and counts["passed"] > 0 and counts["failed"] == 0
    return counts


def _agree(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float = 2e-2) -> bool:
    err = (out.float() - ref.float()).abs().max().item()
    ok = bool(torch.isfinite(out).all()) and err <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max |triton - torch| = {err:.3e} (max |torch| "
          f"{ref.float().abs().max().item():.3e})", flush=True)
    return ok


def _kv_label(spec: KernelBenchSpec) -> str:
    return "" if spec.kv_dtype == "auto" else f", KV {spec.kv_dtype}"


def check_decode(spec: KernelBenchSpec, group: int, device: torch.device) -> bool:
    """Triton decode (default config and split count) against the torch backend on the same device."""
    from afdserve.kernels.attention.triton_paged import decode_config, decode_num_splits, paged_decode
    inp = paged_inputs(spec, group, device)
    kv, tables, seq_lens, q = inp["kv"], inp["tables"], inp["seq_lens"], inp["q_decode"]
    codes, kv_scale, q_kernel = kernel_operands(kv, q)
    scale = spec.head_dim ** -0.5
    bias = decode_mask_bias(seq_lens, tables.shape[1] * spec.block_size)
    splits = decode_num_splits(spec.batch, codes, tables,
                               decode_config(group, spec.head_dim, kv_scale is not None).block_n)
    return _agree(f"decode batch {spec.batch} x {spec.context} GQA {group} ({splits} splits){_kv_label(spec)}",
                  paged_decode(q_kernel, codes, tables, seq_lens, scale, kv_scale=kv_scale),
                  decode_attention(q, kv, tables, bias, scale))


def check_prefill(spec: KernelBenchSpec, group: int, device: torch.device) -> bool:
    """Triton varlen prefill (chunks of spec.chunk after the rest of spec.context) against the torch backend."""
    from afdserve.kernels.attention.triton_paged import paged_attention
    inp = paged_inputs(spec, group, device)
    kv, tables, seq_lens, q = inp["kv"], inp["tables"], inp["seq_lens"], inp["q_prefill"]
    codes, kv_scale, q_kernel = kernel_operands(kv, q)
    scale = spec.head_dim ** -0.5
    starts = torch.arange(0, spec.batch * spec.chunk + 1, spec.chunk, dtype=torch.int32, device=device)
    out = paged_attention(q_kernel, codes, tables, seq_lens, starts, spec.chunk, scale, kv_scale=kv_scale)
    rows = [slice(s * spec.chunk, (s + 1) * spec.chunk) for s in range(spec.batch)]
    ref = torch.cat([prefill_attention(q[r], kv, tables[s], spec.context, scale) for s, r in enumerate(rows)])
    return _agree(f"prefill batch {spec.batch} x chunk {spec.chunk} after {spec.context - spec.chunk} cached, "
                  f"GQA {group}{_kv_label(spec)}", out, ref)


def sweep_decode(spec: KernelBenchSpec, configs: list[tuple[int, int, int, bool]], device: torch.device,
                 peak_gbps: float | None) -> list[dict]:
    """Triton decode time per (group, BLOCK_N, warps, stages, keys_d_major); BLOCK_M stays decode_config's."""
    from afdserve.kernels.attention.triton_paged import AttentionKernelConfig, decode_config, paged_decode
    rows = []
    for group in spec.groups:
        inp = paged_inputs(spec, group, device)
        codes, kv_scale, q = kernel_operands(inp["kv"], inp["q_decode"])
        tables, seq_lens = inp["tables"], inp["seq_lens"]
        del inp
        nbytes, _ = traffic("decode", spec, group)
        block_m = decode_config(group, spec.head_dim).block_m
        for block_n, warps, stages, d_major in configs:
            cfg = AttentionKernelConfig(block_m, block_n, warps, stages, d_major)
            ms = time_call(lambda c=cfg: paged_decode(q, codes, tables, seq_lens, spec.head_dim ** -0.5, config=c,
                                                      kv_scale=kv_scale), device, spec.repeats)
            gbps = nbytes / ms / 1e6
            rows.append(dict(group=group, kv_dtype=spec.kv_dtype, config=list(cfg), ms=ms, gbps=gbps,
                             peak_fraction=gbps / peak_gbps if peak_gbps else None))
            pct = f"{100 * gbps / peak_gbps:.1f}%" if peak_gbps else "-"
            print(f"sweep GQA {group}{_kv_label(spec)} BLOCK_M {block_m} BLOCK_N {block_n} warps {warps} "
                  f"stages {stages}{' keys d-major' if d_major else ''}: {ms:.3f} ms {gbps:.0f} GB/s {pct}",
                  flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--peak-gbps", type=float, default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    import triton
    name = torch.cuda.get_device_name()
    print(name, "torch", torch.__version__, "triton", triton.__version__, flush=True)
    start = time.perf_counter()
    device = torch.device("cuda")
    kernel_tests = None if args.skip_tests else run_kernel_tests()  # None: not run (--skip-tests)
    tests_ok = kernel_tests is None or kernel_tests["ok"]
    large_ok = all([check_decode(spec, g, device) for spec, g in DECODE_CHECKS + QUANT_DECODE_CHECKS]
                   + [check_prefill(spec, g, device) for spec, g in PREFILL_CHECKS + QUANT_PREFILL_CHECKS])
    print(f"correctness done after {time.perf_counter() - start:.0f} s", flush=True)
    target = run_kernel_bench(TARGET, args.peak_gbps)
    print(format_kernel_result(target), flush=True)
    quantized = {}
    for kv_dtype in ("fp8_e4m3", "int8"):
        quantized[kv_dtype] = run_kernel_bench(replace(TARGET, kv_dtype=kv_dtype), args.peak_gbps)
        print(format_kernel_result(quantized[kv_dtype]), flush=True)
        for full, quant in zip(target["results"], quantized[kv_dtype]["results"]):
            print(f"decode GQA {full['group']}: {kv_dtype} {quant['ms']:.3f} ms vs bf16 {full['ms']:.3f} ms "
                  f"({full['ms'] / quant['ms']:.2f}x faster)", flush=True)
    compare = run_kernel_bench(COMPARE, args.peak_gbps)
    print(format_kernel_result(compare), flush=True)
    peak = target["peak"]["gbps"] if target["peak"] else None
    sweep = [] if args.no_sweep else [row for kv_dtype in ("auto", "fp8_e4m3")
                                      for row in sweep_decode(replace(TARGET, kv_dtype=kv_dtype), SWEEP, device, peak)]
    for key in sorted({(r["kv_dtype"], r["group"]) for r in sweep}):
        best = max((r for r in sweep if (r["kv_dtype"], r["group"]) == key), key=lambda r: r["gbps"])
        print(f"best decode config KV {key[0]} GQA {key[1]}: {best['config']} {best['gbps']:.0f} GB/s", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, triton=triton.__version__, kernel_tests=kernel_tests,
                           large_shapes_ok=large_ok, peak=target["peak"], target=target, quantized=quantized,
                           compare=compare,
                           sweep=sweep), f, indent=1)
    return 0 if tests_ok and large_ok else 1


if __name__ == "__main__":
    sys.exit(main())
