"""HyperAttention (Han et al., ICLR 2024) for decodes: LSH buckets pick the keys near the query, uniformly sampled
pages estimate the rest.

Every key is hashed when it is written: r Gaussian projections (one fixed set, shared by queries and keys) give r
sign bits, and the bucket is the rank of those bits in the reflected Gray code, so that buckets next to each other
in rank differ in one bit (nearby directions). A decode query (the mean of a KV head's query heads) takes the
contiguous range of buckets around its own that holds at least `block_tokens` of the sequence's keys; the pages
holding those keys are read exactly. Of the other pages, ceil(sample_tokens / page) are drawn uniformly (seeded by
request seed, layer, step and head) and their logits get log(rest / drawn): the softmax's numerator and normalizer
are then the exact part plus (rest / drawn) times the sampled part, HyperAttention's estimator at page granularity.
Sequences of at most `min_seq_len` tokens read every page, as the paper's exact base case. The last page is always
read exactly. This decode adaptation is ours; the paper covers prefill and training. Prefill chunks run the paper's
algorithm (hyper_prefill.py) with the same b, m and min_seq_len.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from afdserve.kernels.attention.sparse.hyper_prefill import HyperParams, hyper_prefill
from afdserve.kernels.attention.sparse.lsh import LSH_BITS, AngularLSH
from afdserve.kernels.attention.sparse.policy import AttentionPolicy, KVLayout, PolicyState
from afdserve.kernels.attention.sparse.prflash import seeded_uniform
from afdserve.kernels.attention.sparse.selection import DecodeBatch, PageSelection, compact, last_page_mask
from afdserve.kernels.attention.torch_paged import gather_kv


class KeyBuckets(PolicyState):
    """Per layer, KV head, block and slot: the bucket of the key written there."""

    def __init__(self, layout: KVLayout, kv_caches: list):
        self.lsh = AngularLSH(layout.head_dim, LSH_BITS, layout.device)
        self.page_size = layout.page_size
        blocks = torch.arange(layout.num_blocks, device=layout.device)
        self.buckets = []
        for layer in range(layout.num_layers):  # what the cache holds already, hashed
            keys = gather_kv(kv_caches[layer], blocks)[0]  # [kv_heads, blocks * page, hd]
            self.buckets.append(self.lsh(keys).view(layout.kv_heads, layout.num_blocks, layout.page_size))

    def on_write(self, layer: int, k: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        buckets = self.buckets[layer].view(self.buckets[layer].shape[0], -1)
        buckets[:, slot_mapping] = self.lsh(k).transpose(0, 1)  # k [T, kv_heads, hd]


@dataclass
class HyperAttentionPolicy(AttentionPolicy):
    block_tokens: int = 256  # keys in the bucket range around the query (b)
    sample_tokens: int = 256  # tokens' worth of pages drawn from the rest (m)
    min_seq_len: int = 4096  # at most this many tokens: every page
    seed: int = 0  # mixed into every draw
    name = "hyperattention"
    state_type = KeyBuckets
    has_prefill = True

    def __post_init__(self) -> None:
        for key in ("block_tokens", "sample_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"hyperattention: {key} must be >= 1, got {getattr(self, key)}")
        if self.min_seq_len < 0:
            raise ValueError(f"hyperattention: min_seq_len must be >= 0, got {self.min_seq_len}")

    def bind(self, layout: KVLayout, state: KeyBuckets) -> None:
        self.buckets = state

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                seed: int) -> torch.Tensor:
        # The residual's draws: reproducible per (request seed, policy seed, layer, chunk end).
        generator = torch.Generator().manual_seed(hash((seed, self.seed, layer, k.shape[1])) & (2 ** 63 - 1))
        params = HyperParams(self.block_tokens, self.sample_tokens, self.min_seq_len)
        return hyper_prefill(q, k, v, scale, params, self.buckets.lsh, generator)

    def select(self, layer: int, q: torch.Tensor, kv_cache, decodes: DecodeBatch,
               scale: float) -> PageSelection | None:
        num_seqs, num_heads, head_dim = q.shape
        buckets = self.buckets.buckets[layer]
        kv_heads, page = buckets.shape[0], buckets.shape[2]
        query_bucket = self.buckets.lsh(q.view(num_seqs, kv_heads, -1, head_dim).mean(2))  # [B, kv_heads]
        key_buckets = buckets[:, decodes.block_tables].permute(1, 0, 2, 3)  # [B, kv_heads, max_pages, page]
        position = torch.arange(key_buckets.shape[2] * page, device=q.device).view(key_buckets.shape[2], page)
        holds = position < decodes.seq_lens[:, None, None, None]  # [B, 1, max_pages, page]
        distance = (key_buckets.long() - query_bucket[..., None, None].long()).abs()
        # The bucket range: the smallest radius whose keys number at least block_tokens (all keys if fewer).
        counts = torch.zeros(num_seqs, kv_heads, 1 << LSH_BITS, device=q.device)
        counts.scatter_add_(2, distance.flatten(2), holds.expand_as(distance).flatten(2).float())
        radius = (counts.cumsum(-1) < self.block_tokens).sum(-1)  # [B, kv_heads]
        in_range = ((distance <= radius[..., None, None]) & holds).any(-1)  # [B, kv_heads, max_pages]
        exact = in_range | last_page_mask(decodes)[:, None, :]
        valid = decodes.valid_pages()[:, None, :]
        rest = valid & ~exact
        # Uniform pages of the rest: the `draws` of them with the smallest seeded numbers.
        draws = math.ceil(self.sample_tokens / page)
        rest_count = rest.sum(-1, keepdim=True)  # [B, kv_heads, 1]
        noise = seeded_uniform(decodes.seeds + self.seed, layer, decodes.seq_lens, kv_heads, rest.shape[-1])
        order = noise.masked_fill(~rest, 2.0).argsort(-1).argsort(-1)  # each page's place among its row's draws
        sampled = rest & (order < draws)
        weight = torch.log(rest_count.float() / sampled.sum(-1, keepdim=True).clamp(min=1))
        short = (decodes.seq_lens <= self.min_seq_len)[:, None, None]
        kept = torch.where(short, valid, exact | sampled)
        log_weights = torch.where(sampled & ~short, weight, 0.0)
        return compact(kept, log_weights)
