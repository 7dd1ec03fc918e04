"""The decode-attention microbenchmark quoted in bench/results/README.md (issue 13): SmolLM2's heads (9 query, 3 KV,
head_dim 64), 32 sequences x 256 tokens, one query each, a [B, 1, 1, L] mask; median ms of 20 calls, 2 threads, for
SDPA with enable_gqa (the old decode), the query heads grouped per KV head (the new decode), and bf16 K/V widened to
fp32 first. Then causal prefill of one sequence. Output of the committed run: attention_probe.txt."""
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
B, H, KH, L, D = 32, 9, 3, 256, 64


def median_ms(fn, n=20):
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 2] * 1e3


q32, kv32, mask32 = torch.randn(B, H, D), torch.randn(2, B, KH, L, D), torch.zeros(B, 1, 1, L)
for dtype in (torch.bfloat16, torch.float32):
    q, kv, mask = q32.to(dtype), kv32.to(dtype), mask32.to(dtype)
    gqa = median_ms(lambda: F.scaled_dot_product_attention(q.unsqueeze(2), kv[0], kv[1], attn_mask=mask,
                                                           enable_gqa=True))
    grouped = median_ms(lambda: F.scaled_dot_product_attention(q.view(B, KH, H // KH, D), kv[0], kv[1],
                                                               attn_mask=mask))
    print(f"decode {str(dtype):15} enable_gqa {gqa:6.2f} ms   grouped {grouped:6.2f} ms")
qb, kvb = q32.bfloat16(), kv32.bfloat16()


def widened():
    k, v = kvb.float()
    return F.scaled_dot_product_attention(qb.float().view(B, KH, H // KH, D), k, v, attn_mask=mask32).bfloat16()


print(f"decode bf16 K/V widened to fp32, grouped {median_ms(widened):6.2f} ms")
for n in (128, 512, 2048):
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = torch.randn(1, H, n, D).to(dtype), torch.randn(1, KH, n, D).to(dtype), torch.randn(1, KH, n, D).to(dtype)
        ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), n=5)
        print(f"prefill {n:5} tokens {str(dtype):15} {ms:7.2f} ms")
