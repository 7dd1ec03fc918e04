"""MLA prefill: the decompressed form the engine runs (kernels/attention/mla_paged.mla_prefill_attention) against the
absorbed form decodes run, on one chunk of a DeepSeek-V2-Lite-shaped layer (16 heads, latent 512 + rope 64, nope and
v 128), both from the same paged cache; prints the medians, their largest difference and the host.

    python -m afdserve.bench.mla_prefill [--tokens 512 2048] [--dtypes float32 bfloat16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from afdserve.bench.host import host_info
from afdserve.kernels.attention.mla_paged import gather_latent, mla_prefill_attention

HEADS, LATENT, ROPE, NOPE, V = 16, 512, 64, 128, 128
BLOCK = 16


def absorbed_prefill(q_nope, q_pe, kv_cache, block_ids, seq_len, scale, w_uk, w_uv):
    """The absorbed form for a whole chunk (n == seq_len): every query moved into the latent space."""
    n, heads, _ = q_nope.shape
    q = torch.cat([torch.einsum("thn,hnl->thl", q_nope, w_uk), q_pe], dim=-1)
    keys = gather_latent(kv_cache, block_ids)[:seq_len].to(q.dtype)[None, None]
    q_pos = torch.arange(n).repeat_interleave(heads)
    visible = torch.arange(seq_len)[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(q.reshape(1, 1, n * heads, -1), keys, keys[..., :LATENT], attn_mask=visible,
                                         scale=scale).view(n, heads, LATENT)
    return torch.einsum("thl,hvl->thv", out, w_uv)


def run(tokens: int, dtype: torch.dtype, repeats: int = 5) -> dict:
    gen = torch.Generator().manual_seed(0)
    blocks = -(-tokens // BLOCK)
    kv_cache = torch.randn(1, 1, blocks, BLOCK, LATENT + ROPE, generator=gen).to(dtype)
    block_ids = torch.arange(blocks)
    q_nope = torch.randn(tokens, HEADS, NOPE, generator=gen).to(dtype)
    q_pe = torch.randn(tokens, HEADS, ROPE, generator=gen).to(dtype)
    w_uk, w_uv = (torch.randn(HEADS, NOPE + V, LATENT, generator=gen) * LATENT ** -0.5).to(dtype).split([NOPE, V], 1)
    args = (q_nope, q_pe, kv_cache, block_ids, tokens, (NOPE + ROPE) ** -0.5, w_uk, w_uv)
    row = {"tokens": tokens, "dtype": str(dtype).removeprefix("torch.")}
    outs = {}
    for name, fn in (("decompressed", mla_prefill_attention), ("absorbed", absorbed_prefill)):
        outs[name] = fn(*args)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*args)
            times.append(1e3 * (time.perf_counter() - start))
        row[f"{name}_ms_median"] = statistics.median(times)
    row["max_abs_difference"] = (outs["decompressed"].float() - outs["absorbed"].float()).abs().max().item()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    result = {"host": host_info("cpu"), "rows": []}
    for tokens in args.tokens:
        for dtype in args.dtypes:
            row = run(tokens, getattr(torch, dtype), args.repeats)
            result["rows"].append(row)
            print(f"{tokens:>6} tokens {row['dtype']:<9} decompressed {row['decompressed_ms_median']:8.1f} ms  "
                  f"absorbed {row['absorbed_ms_median']:8.1f} ms  max |difference| {row['max_abs_difference']:.2e}",
                  flush=True)
    print(json.dumps(result["host"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
