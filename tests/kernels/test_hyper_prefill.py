"""HyperAttention's prefill (kernels/attention/sparse/hyper_prefill.py) against the paper's estimator written out in
float64: per query, the softmax's numerator and normalizer are the exact sum over its block plus nk / m times the sum
over the sampled keys outside its block (Han et al., ICLR 2024, Alg. 1-3); causal attention by the halves of Alg. 4.
"""
from __future__ import annotations

import math

import pytest
import torch

from afdserve.kernels.attention.sparse.hyper_prefill import (HyperParams, attention_lse, causal_hyper_attention,
                                                             hyper_attention, hyper_prefill, merge_attention)
from afdserve.kernels.attention.sparse.lsh import AngularLSH

D = 16
SCALE = D ** -0.5


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def softmax_reference(q, k, v, keep=None):
    """float64 (out, lse) with keep [.., nq, nk] masking keys out."""
    scores = q.double() @ k.double().transpose(-1, -2) * SCALE
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    lse = scores.logsumexp(-1)
    return (scores - lse[..., None]).exp().nan_to_num(0.0) @ v.double(), lse


def causal_keep(n, cached=0):
    return torch.arange(cached + n)[None, :] <= torch.arange(cached, cached + n)[:, None]


def estimator_reference(q, k, v, params, lsh, seed):
    """The core's estimate, float64, query by query: (out, lse) of [B, H, nq, d] / [B, H, nq]."""
    batch, heads, nq, _ = q.shape
    nk, b, m = k.shape[-2], params.block_size, params.sample_size
    num_blocks = -(-nk // b)
    q_block = -(-nq // num_blocks)
    # Where each query and key lands in its head's bucket order (stable), and so its block.
    q_place = torch.sort(lsh(q), dim=-1, stable=True).indices.argsort(-1)
    k_order = torch.sort(lsh(k), dim=-1, stable=True).indices
    k_block = k_order.argsort(-1) // b
    samples = torch.randint(nk, (batch, heads, m), generator=torch.Generator().manual_seed(seed))
    out = torch.empty(batch, heads, nq, v.shape[-1], dtype=torch.float64)
    lse = torch.empty(batch, heads, nq, dtype=torch.float64)
    for bi in range(batch):
        for h in range(heads):
            for i in range(nq):
                block = int(q_place[bi, h, i]) // q_block
                weights = {}
                for j in range(nk):
                    if k_block[bi, h, j] == block:
                        weights[j] = weights.get(j, 0.0) + 1.0
                for s in samples[bi, h].tolist():
                    if s // b != block:  # s indexes the sorted keys
                        j = int(k_order[bi, h, s])
                        weights[j] = weights.get(j, 0.0) + nk / m
                keys = torch.tensor(sorted(weights))
                w = torch.tensor([weights[j] for j in sorted(weights)], dtype=torch.float64)
                e = w * torch.exp(q[bi, h, i].double() @ k[bi, h, keys].double().T * SCALE)
                out[bi, h, i] = e @ v[bi, h, keys].double() / e.sum()
                lse[bi, h, i] = e.sum().log()
    return out, lse


def test_attention_lse_matches_softmax_and_empties_rows_without_keys():
    q, k, v = rand(1, 2, 5, D, seed=1), rand(1, 2, 7, D, seed=2), rand(1, 2, 7, D, seed=3)
    keep = rand(1, 2, 5, 7, seed=4) > 0
    keep[0, 1, 3] = False  # a row with nothing to attend to
    out, lse = attention_lse(q, k, v, SCALE, keep=keep)
    ref_out, ref_lse = softmax_reference(q, k, v, keep)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert lse[0, 1, 3] == float("-inf") and out[0, 1, 3].abs().max() == 0
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    out, lse = attention_lse(q, k[..., :5, :], v[..., :5, :], SCALE, causal=True)
    ref_out, ref_lse = softmax_reference(q, k[..., :5, :], v[..., :5, :], causal_keep(5))
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_merging_two_key_sets_is_the_softmax_over_both():
    q, k, v = rand(1, 2, 6, D, seed=5), rand(1, 2, 9, D, seed=6), rand(1, 2, 9, D, seed=7)
    first = attention_lse(q, k[..., :4, :], v[..., :4, :], SCALE)
    second = attention_lse(q, k[..., 4:, :], v[..., 4:, :], SCALE)
    empty = (torch.zeros_like(first[0]), torch.full_like(first[1], float("-inf")))
    ref_out, ref_lse = softmax_reference(q, k, v)
    out, lse = merge_attention(*first, *second)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    out, lse = merge_attention(*first, *empty)  # an empty side changes nothing
    torch.testing.assert_close(out, first[0])
    torch.testing.assert_close(lse, first[1])


@pytest.mark.parametrize("nq, nk, block, samples", [(24, 40, 8, 6), (37, 29, 8, 5), (10, 64, 16, 16)])
def test_the_core_is_the_block_plus_sampled_residual_estimator(nq, nk, block, samples):
    # Keys not a multiple of the block (padding), fewer and more queries than keys.
    lsh = AngularLSH(D, 3, torch.device("cpu"))  # 8 buckets: blocks mix buckets, as at scale
    q, k, v = rand(2, 2, nq, D, seed=8), rand(2, 2, nk, D, seed=9), rand(2, 2, nk, D, seed=10)
    params = HyperParams(block, samples, min_seq_len=0)
    out, lse = hyper_attention(q, k, v, SCALE, params, lsh, torch.Generator().manual_seed(11))
    ref_out, ref_lse = estimator_reference(q, k, v, params, lsh, seed=11)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    # And it is an estimate: not the softmax.
    assert (out.double() - softmax_reference(q, k, v)[0]).abs().max() > 1e-2


def test_the_core_is_exact_below_min_seq_len_keys_or_when_one_block_holds_every_key():
    lsh = AngularLSH(D, 7, torch.device("cpu"))
    q, k, v = rand(1, 3, 20, D, seed=12), rand(1, 3, 30, D, seed=13), rand(1, 3, 30, D, seed=14)
    ref_out, ref_lse = softmax_reference(q, k, v)
    for params in (HyperParams(4, 4, min_seq_len=31), HyperParams(32, 8, min_seq_len=0)):
        out, lse = hyper_attention(q, k, v, SCALE, params, lsh, torch.Generator().manual_seed(0))
        torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [32, 31])
def test_causal_attention_is_two_exact_halves_and_the_core_below_the_diagonal(n):
    # min_seq_len between n/2 and n: one level of Alg. 4. An odd n is padded at the end.
    lsh = AngularLSH(D, 3, torch.device("cpu"))
    q, k, v = rand(1, 2, n, D, seed=15), rand(1, 2, n, D, seed=16), rand(1, 2, n, D, seed=17)
    params = HyperParams(4, 5, min_seq_len=16)
    out, lse = causal_hyper_attention(q, k, v, SCALE, params, lsh, torch.Generator().manual_seed(3))
    half = 16
    first = softmax_reference(q[..., :half, :], k[..., :half, :], v[..., :half, :], causal_keep(half))
    torch.testing.assert_close(out[..., :half, :].double(), first[0], atol=1e-5, rtol=1e-5)
    diag_out, diag_lse = softmax_reference(q[..., half:, :], k[..., half:, :], v[..., half:, :], causal_keep(n - half))
    off_out, off_lse = estimator_reference(q[..., half:, :], k[..., :half, :], v[..., :half, :], params, lsh, seed=3)
    total = torch.logaddexp(diag_lse, off_lse)
    second = (diag_out * (diag_lse - total).exp()[..., None] + off_out * (off_lse - total).exp()[..., None])
    torch.testing.assert_close(out[..., half:, :].double(), second, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[..., half:].double(), total, atol=1e-5, rtol=1e-5)


def test_causal_recursion_with_blocks_over_every_key_is_causal_attention():
    lsh = AngularLSH(D, 7, torch.device("cpu"))
    q, k, v = rand(1, 2, 45, D, seed=18), rand(1, 2, 45, D, seed=19), rand(1, 2, 45, D, seed=20)
    out, lse = causal_hyper_attention(q, k, v, SCALE, HyperParams(64, 8, min_seq_len=0), lsh,
                                      torch.Generator().manual_seed(0))
    ref_out, ref_lse = softmax_reference(q, k, v, causal_keep(45))
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_a_chunk_after_a_cached_prefix_with_gqa():
    lsh = AngularLSH(D, 7, torch.device("cpu"))
    n, cached, heads, kv_heads = 12, 20, 4, 2
    q, k, v = rand(n, heads, D, seed=21), rand(kv_heads, cached + n, D, seed=22), rand(kv_heads, cached + n, D, seed=23)
    group = heads // kv_heads
    k_per_head, v_per_head = (x.repeat_interleave(group, dim=0) for x in (k, v))
    ref_out, _ = softmax_reference(q.transpose(0, 1), k_per_head, v_per_head, causal_keep(n, cached))
    covering = hyper_prefill(q, k, v, SCALE, HyperParams(64, 8, min_seq_len=0), lsh, torch.Generator())
    torch.testing.assert_close(covering.transpose(0, 1).double(), ref_out, atol=1e-5, rtol=1e-5)
    # Approximated: the chunk's own causal part is exact (n <= min_seq_len), the prefix is the core's estimate.
    params = HyperParams(8, 4, min_seq_len=n)
    out = hyper_prefill(q, k, v, SCALE, params, lsh, torch.Generator().manual_seed(5))
    qh = q.transpose(0, 1)[None]
    own_out, own_lse = softmax_reference(qh, k_per_head[None, :, cached:], v_per_head[None, :, cached:],
                                         causal_keep(n))
    pre_out, pre_lse = estimator_reference(qh, k_per_head[None, :, :cached], v_per_head[None, :, :cached], params,
                                           lsh, seed=5)
    total = torch.logaddexp(own_lse, pre_lse)
    expected = own_out * (own_lse - total).exp()[..., None] + pre_out * (pre_lse - total).exp()[..., None]
    torch.testing.assert_close(out.transpose(0, 1)[None].double(), expected, atol=1e-5, rtol=1e-5)
    assert not math.isclose(float((out.transpose(0, 1).double() - ref_out).abs().max()), 0.0, abs_tol=1e-3)
