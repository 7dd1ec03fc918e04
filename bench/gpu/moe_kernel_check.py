"""MoE kernel check on one CUDA GPU: the Triton path (kernels/moe/triton_moe.py) against the naive reference and the
torch path, then timings of both paths for a Mixtral-8x7B-like layer (E=8, k=2, H=4096, I=14336, bf16).

    python -m afdserve.bench.gpu.moe_kernel_check [--tokens 1 16 64 256 1024 4096] [--sweep] [--out results.json]

Correctness runs the cases of tests/kernels/test_triton_moe.py compiled (not interpreted): T=1, T*k not a multiple of
BLOCK_M, ragged N/K tiles, idle experts, tied router scores, fp32 and bf16. Timings use triton.testing.do_bench
(median ms); TFLOP/s counts 6*T*k*H*I (gate_up 2*T*k*H*2I plus down 2*T*k*I*H) against the bf16 dense peak, and GB/s
counts the weights of the experts that received tokens (decode is bandwidth-bound) against HBM peak. Peaks default
to H100 SXM (989 TFLOP/s, 3350 GB/s); pass --peak-tflops / --peak-gbps for other cards. --sweep also times a few
block configs per T and reports the best, as a starting point for a tuned table.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from afdserve.kernels.moe import fused_experts_torch, moe_reference
from afdserve.models.layers.moe_router import RouterConfig, select_experts

SWEEP = [(16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3),
         (128, 256, 64, 8, 3)]


def _weights(num_experts, hidden, inter, dtype, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g, device=device) * hidden ** -0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g, device=device) * inter ** -0.5
    return w13.to(dtype), w2.to(dtype)


def _routing(logits, top_k):
    return select_experts(logits, RouterConfig(logits.shape[1], top_k, renormalize=True))


def _check_case(name, x, w13, w2, ids, weights, config=None) -> bool:
    from afdserve.kernels.moe.triton_moe import fused_experts_triton
    out, counts = fused_experts_triton(x, w13, w2, ids, weights, config)
    ref = moe_reference(*(t.cpu() for t in (x, w13, w2, ids, weights)))
    torch_out, torch_counts = fused_experts_torch(x, w13, w2, ids, weights)
    tol = dict(atol=1e-4, rtol=1e-4) if x.dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    ok = True
    for other_name, other in (("reference", ref), ("torch", torch_out.cpu())):
        try:
            torch.testing.assert_close(out.cpu(), other, **tol)
        except AssertionError as e:
            ok = False
            print(f"FAIL {name} vs {other_name}: {str(e).splitlines()[:4]}")
    ok &= counts.tolist() == torch_counts.tolist()
    print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return ok


def check_correctness() -> bool:
    from afdserve.kernels.moe.triton_moe import MoEBlockConfig
    hidden, inter, ok = 32, 24, True
    small = MoEBlockConfig(block_m=16, block_n=32, block_k=16)
    for dtype in (torch.float32, torch.bfloat16):
        for num_tokens, top_k in ((1, 1), (1, 2), (7, 2), (19, 3), (300, 2)):
            g = torch.Generator().manual_seed(num_tokens)
            x = torch.randn(num_tokens, hidden, generator=g).to(dtype).cuda()
            logits = torch.full((num_tokens, 8), -30.0)
            logits[:, [1, 2, 4, 6]] = torch.randn(num_tokens, 4, generator=g)
            routing = _routing(logits.cuda(), top_k)
            w13, w2 = _weights(8, hidden, inter, dtype)
            for cfg in (small, None):
                ok &= _check_case(f"{dtype} T={num_tokens} k={top_k} cfg={cfg}", x, w13, w2, *routing, config=cfg)
        logits = torch.tensor([[0.0] * 6, [1.0, 2.0, 2.0, 0.0, 2.0, 1.0], [3.0, 1.0, 3.0, 3.0, 1.0, 0.0],
                               [0.0, 0.0, 0.0, 0.0, 5.0, 5.0], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]]).cuda()
        routing = select_experts(logits, RouterConfig(6, 2))
        x = torch.randn(5, hidden).to(dtype).cuda()
        ok &= _check_case(f"{dtype} tied scores", x, *_weights(6, hidden, inter, dtype, seed=2), *routing, config=small)
    # One Mixtral-sized case, against the torch path only (the per-token reference would be slow).
    w13, w2 = _weights(8, 4096, 14336, torch.bfloat16)
    x = torch.randn(97, 4096, device="cuda").bfloat16()
    routing = _routing(torch.randn(97, 8, device="cuda"), 2)
    from afdserve.kernels.moe.triton_moe import fused_experts_triton
    out, _ = fused_experts_triton(x, w13, w2, *routing)
    torch_out, _ = fused_experts_torch(x, w13, w2, *routing)
    err = (out.float() - torch_out.float()).abs().max().item()
    scale = torch_out.float().abs().max().item()
    big_ok = err <= 2e-2 * max(scale, 1.0)
    print(f"{'ok  ' if big_ok else 'FAIL'} Mixtral-sized bf16 T=97: max |triton - torch| = {err:.3e}"
          f" (max |out| {scale:.3e})")
    return ok and big_ok


def time_paths(tokens, sweep, peak_tflops, peak_gbps, num_experts=8, top_k=2, hidden=4096, inter=14336):
    from triton.testing import do_bench

    from afdserve.kernels.moe.triton_moe import MoEBlockConfig, default_config, fused_experts_triton
    w13, w2 = _weights(num_experts, hidden, inter, torch.bfloat16)
    rows = []
    print(f"\nE={num_experts} k={top_k} H={hidden} I={inter} bf16; peak {peak_tflops} TFLOP/s, {peak_gbps} GB/s")
    print(f"{'T':>6} {'path':>8} {'config':>24} {'ms':>9} {'TFLOP/s':>8} {'%peak':>6} {'GB/s':>7} {'%bw':>5}")
    for num_tokens in tokens:
        x = torch.randn(num_tokens, hidden, device="cuda").bfloat16()
        routing = _routing(torch.randn(num_tokens, num_experts, device="cuda"), top_k)
        flops = 6 * num_tokens * top_k * hidden * inter
        used = int((torch.bincount(routing.topk_ids.flatten(), minlength=num_experts) > 0).sum())
        weight_bytes = used * 3 * hidden * inter * 2
        configs = [default_config(num_tokens * top_k, num_experts)]
        if sweep:
            configs += [MoEBlockConfig(*c) for c in SWEEP]
        candidates = [("torch", None, do_bench(lambda: fused_experts_torch(x, w13, w2, *routing)))]
        for cfg in configs:
            candidates.append(("triton", cfg, do_bench(lambda c=cfg: fused_experts_triton(x, w13, w2, *routing, c))))
        best_triton = min((c for c in candidates if c[0] == "triton"), key=lambda c: c[2])
        for path, cfg, ms in (candidates[0], candidates[1], *([best_triton] if sweep else [])):
            tflops, gbps = flops / ms / 1e9, weight_bytes / ms / 1e6
            label = "-" if cfg is None else "x".join(map(str, cfg))
            print(f"{num_tokens:>6} {path:>8} {label:>24} {ms:>9.4f} {tflops:>8.1f} {100 * tflops / peak_tflops:>5.1f}%"
                  f" {gbps:>7.0f} {100 * gbps / peak_gbps:>4.0f}%")
            rows.append(dict(tokens=num_tokens, path=path, config=None if cfg is None else list(cfg), ms=ms,
                             tflops=tflops, gbps=gbps))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--peak-gbps", type=float, default=3350.0)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--out", default=None, help="write the timing rows as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", __import__("triton").__version__)
    ok = args.skip_check or check_correctness()
    rows = time_paths(args.tokens, args.sweep, args.peak_tflops, args.peak_gbps)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), correct=ok, rows=rows), f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
